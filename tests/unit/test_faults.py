"""What the database and the disk raise, told as the controller's own errors."""

from __future__ import annotations

import errno
import sqlite3

import psycopg
from sqlalchemy import exc as sa_exc

from controller.errors import DatabaseUnavailable, InsufficientStorage, InvalidInput
from controller.services.faults import translate


def wrapped(cls: type[sa_exc.DBAPIError], orig: Exception) -> sa_exc.DBAPIError:
    return cls("SELECT 1", {}, orig)


def test_database_gone_is_503_with_retry_after() -> None:
    for exc in (
        wrapped(sa_exc.OperationalError, psycopg.OperationalError("connection refused")),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        sa_exc.TimeoutError("QueuePool limit"),
    ):
        error = translate(exc)
        assert isinstance(error, DatabaseUnavailable), exc
        assert error.status_code == 503
        assert error.headers["Retry-After"]


def test_full_disk_is_507_and_unstorable_text_422() -> None:
    full = translate(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, InsufficientStorage)
    assert full.status_code == 507
    sqlite_full = wrapped(
        sa_exc.OperationalError, sqlite3.OperationalError("database or disk is full")
    )
    assert isinstance(translate(sqlite_full), InsufficientStorage)
    nul = wrapped(sa_exc.DataError, psycopg.DataError("cannot contain NUL (0x00) bytes"))
    assert isinstance(translate(nul), InvalidInput)


def test_bugs_stay_500() -> None:
    assert translate(OSError(errno.EACCES, "Permission denied")) is None
    assert translate(wrapped(sa_exc.IntegrityError, sqlite3.IntegrityError("UNIQUE"))) is None
