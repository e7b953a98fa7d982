"""Plain SQL on the driver's own connection, for the few statements every agent request runs.

SQLAlchemy Core costs 100-150 µs per statement on these hosts (pool events, execution
context, result objects); sqlite3 runs the same statement in 5-10 µs. The lease hot paths
(grant, renew, release, expiry) and the fence check before a session command run their
statements here; everything else uses SQLAlchemy.

On PostgreSQL the event loop also holds a few connections of its own (:class:`LoopConnections`)
for the lease statements that are one round trip each (see ``leases.LeaseLane``).

One text serves both databases: ``:name`` parameters (rewritten to ``%(name)s`` for
psycopg), and ``{skip_locked}``, which becomes ``FOR UPDATE SKIP LOCKED`` on PostgreSQL.
Values are stored as SQLAlchemy stores them (on SQLite: timestamps in its text format, JSON
as text), and rows come back as dicts with timestamps aware and JSON parsed, so both layers
read and write the same rows.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import JSON
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from controller.store.db import run_write, writer_lock
from controller.store.models import UTCDateTime

Row = dict[str, Any]
T = TypeVar("T")

_COLUMNS = [column for table in SQLModel.metadata.tables.values() for column in table.columns]
TIMESTAMP_COLUMNS = frozenset(c.name for c in _COLUMNS if isinstance(c.type, UTCDateTime))
JSON_COLUMNS = frozenset(c.name for c in _COLUMNS if isinstance(c.type, JSON))


class Sql:
    """One statement, as text for each database."""

    def __init__(self, text: str) -> None:
        self.sqlite = text.replace("{skip_locked}", "")
        locked = text.replace("{skip_locked}", "FOR UPDATE SKIP LOCKED")
        self.postgres = re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", locked)


class Tx:
    """A transaction on the driver's connection; see :func:`transaction`."""

    def __init__(self, cursor: Any, postgres: bool) -> None:
        self._cursor = cursor
        self._postgres = postgres

    def rows(self, sql: Sql, **params: Any) -> list[Row]:
        self._cursor.execute(self._text(sql), self._values(params))
        if self._cursor.description is None:
            return []
        names = [column[0] for column in self._cursor.description]
        # Fetch all: a statement with RETURNING is only done once its rows are read.
        return [self._row(names, values) for values in self._cursor.fetchall()]

    def one(self, sql: Sql, **params: Any) -> Row | None:
        found = self.rows(sql, **params)
        return found[0] if found else None

    def run(self, sql: Sql, **params: Any) -> int:
        """Run a statement without rows; answer how many rows it changed."""
        self._cursor.execute(self._text(sql), self._values(params))
        return int(self._cursor.rowcount)

    def run_many(self, sql: Sql, params: list[dict[str, Any]]) -> None:
        self._cursor.executemany(self._text(sql), [self._values(p) for p in params])

    def apart(self, work: Callable[[Tx], T]) -> T:
        """Run ``work`` inside a savepoint: if it raises, only its own writes are undone."""
        self._cursor.execute("SAVEPOINT apart")
        try:
            result = work(self)
        except BaseException:
            self._cursor.execute("ROLLBACK TO SAVEPOINT apart")
            raise
        finally:
            self._cursor.execute("RELEASE SAVEPOINT apart")
        return result

    def _text(self, sql: Sql) -> str:
        return sql.postgres if self._postgres else sql.sqlite

    def _values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self._value(value) for name, value in params.items()}

    def _value(self, value: Any) -> Any:
        kind = type(value)
        if kind is str or kind is int or kind is float or value is None:
            return value  # most values: checked first, as this runs for every parameter
        if isinstance(value, Enum):
            return value.value
        if kind is dict or kind is list:
            return json.dumps(value)
        if kind is datetime and not self._postgres:
            # SQLAlchemy's text for a DATETIME on SQLite (isoformat is C, strftime is slow)
            return value.astimezone(UTC).isoformat(" ", "microseconds")[:26]
        return value

    def _row(self, names: list[str], values: tuple[Any, ...]) -> Row:
        row = dict(zip(names, values, strict=True))
        if self._postgres:  # psycopg answers aware timestamps and parsed JSON itself
            return row
        for name, value in row.items():
            if not isinstance(value, str):
                continue
            if name in TIMESTAMP_COLUMNS:
                row[name] = datetime.fromisoformat(value).replace(tzinfo=UTC)
            elif name in JSON_COLUMNS:
                row[name] = json.loads(value)
        return row


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Tx]:
    """Commit on success, roll back on error. SQLite writers queue on this process's writer
    lock and begin with ``BEGIN IMMEDIATE``, as SQLAlchemy sessions do (see ``db``)."""
    postgres = engine.dialect.name == "postgresql"
    with (writer_lock(engine) if write else None) or nullcontext():
        raw = engine.raw_connection()
        cursor = raw.cursor()
        try:
            if not postgres:  # autocommit driver (see db._sqlite_pragmas): begin ourselves
                cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield Tx(cursor, postgres)
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            cursor.close()
            raw.close()


Work = Callable[[Tx], T]
"""What a transaction runs: the lease paths hand these to :class:`GroupCommit`."""


class GroupCommit:
    """Group commit for the lease hot paths, from the event loop.

    Requests that reach the database in the same turn of the loop (fifty agents asking at
    once) share one transaction, each in its own savepoint, so one that fails (a stale
    lease, an unknown pool) changes nothing and fails alone. One commit instead of fifty:
    the write-ahead log grows by a few pages instead of ~12 per request, and the checkpoint
    that copies it back, with its fsync, stays short. A lone request commits alone.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pending: list[tuple[Work[Any], asyncio.Future[Any]]] = []
        self._committing: set[asyncio.Task[None]] = set()  # the loop keeps only weak refs

    async def run(self, work: Work[T]) -> T:
        """Answer ``work``'s result once its transaction has committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((work, future))
        if len(self._pending) == 1:
            # Runs after the requests already queued on the loop have reached this point.
            task = asyncio.get_running_loop().create_task(self._commit_pending())
            self._committing.add(task)
            task.add_done_callback(self._committing.discard)
        return await future

    async def _commit_pending(self) -> None:
        batch, self._pending = self._pending, []
        try:
            outcomes = await run_write(self._engine, self._commit, [work for work, _ in batch])
        except Exception as exc:  # the commit itself failed: nothing of the batch holds
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (the loop is stopping): so are its requests
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), (result, error) in zip(batch, outcomes, strict=True):
            if future.done():  # its request was cancelled meanwhile (the client went away)
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _commit(self, works: list[Work[Any]]) -> list[tuple[Any, Exception | None]]:
        outcomes: list[tuple[Any, Exception | None]] = []
        with transaction(self._engine) as tx:
            if len(works) == 1:  # alone: its failure rolls back the whole transaction
                return [(works[0](tx), None)]
            for work in works:
                try:
                    outcomes.append((tx.apart(work), None))
                except Exception as exc:  # noqa: BLE001 - handed to that request alone
                    outcomes.append((None, exc))
        return outcomes


def _pg_value(value: Any) -> Any:
    """What :meth:`Tx._value` gives PostgreSQL: enums by value, JSON as text."""
    if isinstance(value, Enum):
        return value.value
    if type(value) is dict or type(value) is list:
        return json.dumps(value)
    return value


IDLE_PING_S = 5.0
"""A loop connection unused for this long is pinged before its next statement."""
LOOP_CONNECTIONS = 2
"""Connections per event loop for the lease statements (PostgreSQL): a batch in flight on
each; statements that come meanwhile wait and leave together as the next batch."""

LoopConnection = psycopg.AsyncConnection[Any]


class _Statement:
    """One statement waiting on the loop for a connection, and who waits for its rows."""

    def __init__(self, sql: Sql, params: Mapping[str, Any]) -> None:
        self.text = sql.postgres
        self.values = {name: _pg_value(value) for name, value in params.items()}
        self.answer: asyncio.Future[list[Row]] = asyncio.get_running_loop().create_future()

    def settle(self, rows: list[Row] | None = None, error: BaseException | None = None) -> None:
        if self.answer.done():  # its request went away meanwhile
            return
        if error is not None:
            self.answer.set_exception(error)
        else:
            self.answer.set_result(rows or [])


class _OnLoop:
    """One event loop's connections and the statements waiting to be sent."""

    def __init__(self, size: int) -> None:
        self.turn = asyncio.Semaphore(size)
        self.idle: list[tuple[LoopConnection, float]] = []
        self.waiting: list[_Statement] = []
        self.sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak refs


class LoopConnections:
    """PostgreSQL connections used from the event loop itself (psycopg's async API), in
    autocommit, for the lease statements: no hop to a worker thread, no checkout ping (only
    a connection idle for a while is pinged).

    A worker thread's round trip costs more than the network here: each answer must take
    the interpreter's lock back from whatever thread holds it (the hand-overs, the loops),
    up to its switch interval of 5 ms. So every statement is sent from the loop, and the
    statements that reach it in the same turn (fifty agents asking at once), or while both
    connections are busy, leave together: one pipeline (psycopg's pipeline mode: sent at
    once, answered at once) and one implicit transaction, so one commit for the batch, the
    group commit of PostgreSQL. A lone statement is its own transaction. If a batch fails,
    nothing of it holds, and each of its statements is tried again alone, so one that
    fails fails by itself. A connection that failed or was left inside a transaction is
    closed, and the next statement opens a new one, so the database coming back is found.
    """

    def __init__(self, engine: Engine, size: int = LOOP_CONNECTIONS) -> None:
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        self._size = size
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _OnLoop] = (
            weakref.WeakKeyDictionary()
        )

    async def rows(self, sql: Sql, **params: Any) -> list[Row]:
        """Run one statement (in its batch's transaction) and answer its rows."""
        loop = asyncio.get_running_loop()
        here = self._per_loop.get(loop)
        if here is None:
            here = self._per_loop[loop] = _OnLoop(self._size)
        statement = _Statement(sql, params)
        here.waiting.append(statement)
        if len(here.waiting) == 1:
            # Runs after the requests already queued on the loop have added theirs.
            task = loop.create_task(self._send_waiting(here))
            here.sending.add(task)
            task.add_done_callback(here.sending.discard)
        return await statement.answer

    async def one(self, sql: Sql, **params: Any) -> Row | None:
        found = await self.rows(sql, **params)
        return found[0] if found else None

    async def _send_waiting(self, here: _OnLoop) -> None:
        async with here.turn:
            batch, here.waiting = here.waiting, []
            try:
                if len(batch) > 1:
                    try:
                        await self._send(here, batch)
                        return
                    except psycopg.Error as exc:
                        if not _rolled_back(exc):  # it may have committed: no second try
                            for statement in batch:
                                statement.settle(error=exc)
                            return
                for statement in batch:  # nothing of the batch holds: each alone
                    try:
                        await self._send(here, [statement])
                    except psycopg.Error as exc:
                        statement.settle(error=exc)
            except BaseException as exc:  # cancelled (the loop is stopping): so are they
                for statement in batch:
                    statement.settle(error=exc)
                raise

    async def _send(self, here: _OnLoop, batch: list[_Statement]) -> None:
        """Send ``batch`` in one transaction on a connection of ``here``; settle each."""
        conn = await self._take(here.idle)
        kept = False
        try:
            if len(batch) == 1:
                answers = [await _answer(await conn.execute(batch[0].text, batch[0].values))]
            else:
                async with conn.pipeline():
                    cursors = [conn.cursor() for _ in batch]
                    for cursor, statement in zip(cursors, batch, strict=True):
                        await cursor.execute(statement.text, statement.values)
                answers = [await _answer(cursor) for cursor in cursors]
            kept = True
        finally:
            alone_and_idle = len(batch) == 1 and (
                conn.info.transaction_status == TransactionStatus.IDLE
            )
            if kept or alone_and_idle:
                here.idle.append((conn, time.monotonic()))
            else:
                # Broken, cancelled mid-statement, or a failed pipeline: the server skipped
                # what followed the error, statements psycopg counts as prepared included.
                conn.pgconn.finish()
        for statement, rows in zip(batch, answers, strict=True):
            statement.settle(rows)

    async def _take(self, idle: list[tuple[LoopConnection, float]]) -> LoopConnection:
        """The most recently used connection; one idle for longer than :data:`IDLE_PING_S`
        is pinged first (the database may have restarted meanwhile), as SQLAlchemy's pool
        does at every checkout."""
        while idle:
            conn, used = idle.pop()
            if conn.closed:
                continue
            if time.monotonic() - used < IDLE_PING_S:
                return conn
            try:
                await conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                conn.pgconn.finish()
        return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)

    def close(self) -> None:
        """Close every idle connection (without a loop: the controller is stopping)."""
        for here in list(self._per_loop.values()):
            while here.idle:
                here.idle.pop()[0].pgconn.finish()


async def _answer(cursor: psycopg.AsyncCursor[Any]) -> list[Row]:
    if cursor.description is None:
        return []
    names = [column.name for column in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in await cursor.fetchall()]


def _rolled_back(error: psycopg.Error) -> bool:
    """Did the server answer ``error`` to a statement (so its transaction surely rolled
    back), rather than the connection failing (where the commit may have happened)?"""
    state = error.sqlstate
    return state is not None and state[:2] not in ("08", "57")  # connection, shutdown
