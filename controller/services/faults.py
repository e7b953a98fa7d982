"""What the database and the disk raise, told as the controller's own errors.

The API maps :data:`TRANSLATED` exceptions through :func:`translate` (``api/app.py``, and
the hot lane with the same handlers): a database that does not answer is a 503 with
``Retry-After`` (the engines reconnect by themselves once it is back: ``pool_pre_ping``),
a full disk a 507, a value the database refuses to store a 422. Anything else stays a 500,
answered as JSON.
"""

from __future__ import annotations

import errno
import sqlite3

import psycopg
from sqlalchemy import exc as sa_exc

from controller.errors import (
    DatabaseUnavailable,
    InsufficientStorage,
    InvalidInput,
    ShopfloorError,
)

TRANSLATED: tuple[type[Exception], ...] = (
    sa_exc.DBAPIError,
    sa_exc.TimeoutError,  # no connection free in the pool: the database hangs
    sa_exc.PendingRollbackError,
    psycopg.Error,  # the lease hot path's plain SQL runs on the driver's own connection
    sqlite3.Error,
    OSError,
)
_FULL = (errno.ENOSPC, errno.EDQUOT)
_SQLITE_FULL = ("database or disk is full", "disk i/o error")


def translate(exc: BaseException) -> ShopfloorError | None:
    """The controller's error for ``exc``, or None when it is a plain bug (a 500)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return InsufficientStorage(f"the controller's disk is full: {exc.strerror}")
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    text = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, sqlite3.Error) and any(f in text.lower() for f in _SQLITE_FULL):
        return InsufficientStorage(f"the database's disk is full: {text}")
    if isinstance(cause, psycopg.errors.DiskFull):
        return InsufficientStorage(f"the database's disk is full: {text}")
    if isinstance(cause, psycopg.DataError | sqlite3.DataError) or isinstance(
        exc, sa_exc.DataError
    ):
        return InvalidInput(f"the database cannot store a value of this request: {text}")
    if isinstance(exc, sa_exc.TimeoutError):
        return DatabaseUnavailable("the database does not answer (no connection became free)")
    if isinstance(
        cause, psycopg.OperationalError | psycopg.InterfaceError | sqlite3.OperationalError
    ):
        return DatabaseUnavailable(f"the database is unavailable: {text}")
    if isinstance(
        exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.PendingRollbackError
    ):
        return DatabaseUnavailable(f"the database is unavailable: {text}")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return DatabaseUnavailable(f"the database connection was lost: {text}")
    return None
