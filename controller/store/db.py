"""Database engine and schema migrations (SQLite in the data dir by default, PostgreSQL by URL)."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio.to_thread
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

P = ParamSpec("P")
T = TypeVar("T")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
AUTOCHECKPOINT_PAGES = 10_000
RESTART_FRAMES = 20_000
"""A log this long (80 MB) is started over (see :func:`checkpoint`)."""


def make_engine(url: str, *, checkpoint_loop: bool = False) -> Engine:
    """``checkpoint_loop``: this process runs :func:`checkpoint` in a background loop, so its
    commits never checkpoint themselves (see there)."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20
        )
        pages = 0 if checkpoint_loop else AUTOCHECKPOINT_PAGES
        event.listen(engine, "connect", lambda conn, _record: _sqlite_pragmas(conn, pages))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, autocheckpoint_pages: int) -> None:
    # Let SQLAlchemy issue BEGIN itself (see _sqlite_begin) instead of pysqlite's lazy BEGIN.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Checkpoints copy the WAL into the database and fsync both. In the controller the
    # `checkpoint` loop does that off the request path (0: commits never do it themselves);
    # other processes (the CLI, tests) checkpoint in the commit that passes this many pages.
    cursor.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint_pages}")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock at BEGIN: read-then-write transactions (lease grants,
    # state changes) cannot interleave, and busy_timeout queues the waiters. Readers
    # (engines from `reader`) take no lock at all: WAL lets them run beside a writer.
    read_only = conn.get_execution_options().get("shopfloor_read_only", False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def reader(engine: Engine) -> Engine:
    """The same database and pool, for transactions that only read."""
    return engine.execution_options(shopfloor_read_only=True)


def checkpoint(engine: Engine, *, restart_frames: int = RESTART_FRAMES) -> None:
    """Copy the SQLite write-ahead log into the database, off the request path.

    A PASSIVE checkpoint waits for no one, and the controller's commits never checkpoint
    themselves (``make_engine(checkpoint_loop=True)``): SQLite's autocheckpoint, run inside
    a request's COMMIT, fsynced the log and stalled a whole wave of fifty lease requests for
    100-200 ms. But under steady writes a PASSIVE checkpoint never lets the log start over
    (each new write begins while frames are still in it), so the log would grow without
    bound. Once it is ``restart_frames`` long, a RESTART checkpoint waits for the readers
    to finish and lets the next writer start the log over. It holds this process's writer
    queue meanwhile, so the event loop never blocks on it (``run_write`` hands writes to a
    thread while the queue is taken).
    """
    if engine.dialect.name != "sqlite":
        return
    raw = engine.raw_connection()  # autocommit (see _sqlite_pragmas): no BEGIN, no write lock
    try:
        cursor = raw.cursor()
        _busy, frames, _copied = cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames >= restart_frames:
            with writer_lock(engine) or nullcontext():
                cursor.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    finally:
        raw.close()


def private_sqlite_files(url: str) -> None:
    """The SQLite database and its -wal/-shm files readable by the controller's user only:
    the file is made 0600 before SQLite first opens it, and SQLite gives its -wal and -shm
    files the database file's mode; files of an older install are narrowed here."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if name.exists():
            name.chmod(0o600)


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision."""
    private_sqlite_files(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


class WriterQueue:
    """A reentrant lock that hands itself to waiting threads in arrival order.

    ``threading.RLock`` is not fair: a thread that releases and at once re-acquires (the
    event loop granting lease after lease, see :func:`run_write`) can starve a waiting
    worker thread for seconds. Here a release hands the lock to the longest waiter, and a
    non-blocking attempt fails while anyone waits.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._waiting: deque[tuple[int, threading.Lock]] = deque()

    def acquire(self, blocking: bool = True) -> bool:
        me = threading.get_ident()
        with self._guard:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._waiting:
                self._owner, self._depth = me, 1
                return True
            if not blocking:
                return False
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append((me, turn))
        turn.acquire()  # released by the owner that hands over to us
        return True

    def release(self) -> None:
        with self._guard:
            self._depth -= 1
            if self._depth:
                return
            if not self._waiting:
                self._owner = None
                return
            self._owner, turn = self._waiting.popleft()
            self._depth = 1
            turn.release()

    def __enter__(self) -> WriterQueue:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


_WRITER_QUEUES: dict[str, WriterQueue] = {}
_WRITER_QUEUES_GUARD = threading.Lock()


def writer_lock(engine: Engine) -> WriterQueue | None:
    """SQLite writers of this process queue here, first come first served, instead of in
    SQLite's busy handler, which sleeps in growing steps (up to 100 ms) while it polls."""
    if engine.dialect.name != "sqlite" or engine.get_execution_options().get("shopfloor_read_only"):
        return None
    with _WRITER_QUEUES_GUARD:
        return _WRITER_QUEUES.setdefault(str(engine.url), WriterQueue())


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Session]:
    """One database transaction (`tx`): commits on success, rolls back on error."""
    lock = writer_lock(engine)
    with lock or nullcontext(), Session(engine, expire_on_commit=False) as tx:
        try:
            yield tx
            tx.commit()
        except BaseException:
            tx.rollback()
            raise


async def run_write(engine: Engine, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a short write from the event loop: inline when this process's SQLite writer queue
    is empty (a sub-millisecond transaction costs less than a hop to a worker thread and
    back), else in a worker thread, which takes its turn in the queue.

    For statement-only work (the lease group commits, see ``rawsql.GroupCommit``): never for
    anything that calls the engine. PostgreSQL writes always go to a thread: they wait on
    the network and on row locks.
    """
    lock = writer_lock(engine)
    if lock is not None and lock.acquire(blocking=False):
        try:
            return work(*args, **kwargs)
        finally:
            lock.release()
    return await anyio.to_thread.run_sync(lambda: work(*args, **kwargs))


async def run_read(engine: Engine, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a short read from the event loop: inline on SQLite, where WAL readers never wait
    for a writer; in a worker thread on PostgreSQL, which answers over the network."""
    if engine.dialect.name == "sqlite":
        return work(*args, **kwargs)
    return await anyio.to_thread.run_sync(lambda: work(*args, **kwargs))
