"""Database engine and schema migrations (SQLite in the data dir by default, PostgreSQL by URL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, create_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
AUTOCHECKPOINT_PAGES = 10_000


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy issue BEGIN itself (see _sqlite_begin) instead of pysqlite's lazy BEGIN.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Checkpoints copy the WAL into the database and fsync it (~20 ms on these disks). The
    # `checkpoint` loop does that off the request path; this larger threshold is only a
    # safety net for processes that run no loop (the CLI, tests).
    cursor.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
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


def checkpoint(engine: Engine) -> None:
    """Copy the SQLite write-ahead log into the database without waiting for anyone."""
    if engine.dialect.name != "sqlite":
        return
    raw = engine.raw_connection()  # autocommit (see _sqlite_pragmas): no BEGIN, no write lock
    try:
        raw.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        raw.close()


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


_WRITER_LOCKS: dict[str, threading.RLock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(engine: Engine) -> threading.RLock | None:
    """SQLite writers of this process queue here, first come first served, instead of in
    SQLite's busy handler, which sleeps in growing steps (up to 100 ms) while it polls."""
    if engine.dialect.name != "sqlite" or engine.get_execution_options().get("shopfloor_read_only"):
        return None
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(str(engine.url), threading.RLock())


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    lock = _writer_lock(engine)
    with lock or nullcontext(), Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A Core connection in a write transaction, for hot paths that skip the ORM (leases).

    It queues on the same writer lock and begins the same way as :func:`session_scope`.
    """
    lock = _writer_lock(engine)
    with lock or nullcontext(), engine.begin() as conn:
        yield conn
