"""Events: every state change leaves one, in the same transaction as the change."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert as sql_insert
from sqlalchemy.engine import Connection
from sqlmodel import Session

from controller.models import EVENTS, Event, utcnow

Change = tuple[str, str, dict[str, Any]]
"""An event not yet written: kind, subject id, data."""


def record(session: Session, kind: str, subject_id: str, **data: Any) -> Event:
    event = Event(kind=kind, subject_id=subject_id, data=data)
    session.add(event)
    return event


def insert(conn: Connection, *changes: Change) -> None:
    """The Core twin of :func:`record`, for transactions that skip the ORM (leases)."""
    at = utcnow()
    conn.execute(
        sql_insert(EVENTS),
        [
            {"at": at, "kind": kind, "subject_id": subject, "data": data}
            for kind, subject, data in changes
        ],
    )


def machine_state(machine_id: str, state: str, previous: str, reason: str | None = None) -> Change:
    return (
        "machine.state",
        machine_id,
        {"state": str(state), "previous": str(previous), "reason": reason},
    )
