"""Events: every state change leaves one, in the same transaction as the change."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from controller.store.models import Event, utcnow
from controller.store.rawsql import Sql, Tx

Change = tuple[str, str, dict[str, Any]]
"""An event not yet written: kind, subject id, data."""


def record(tx: Session, kind: str, subject_id: str, **data: Any) -> Event:
    event = Event(kind=kind, subject_id=subject_id, data=data)
    tx.add(event)
    return event


_INSERT = Sql("INSERT INTO events (at, kind, subject_id, data) VALUES (:at, :kind, :s, :data)")


def insert(tx: Tx, *changes: Change) -> None:
    """The plain-SQL twin of :func:`record`, for the lease hot paths (see ``rawsql``)."""
    at = utcnow()
    tx.run_many(
        _INSERT,
        [{"at": at, "kind": kind, "s": subject, "data": data} for kind, subject, data in changes],
    )


def machine_state(machine_id: str, state: str, previous: str, reason: str | None = None) -> Change:
    return (
        "machine.state",
        machine_id,
        {"state": str(state), "previous": str(previous), "reason": reason},
    )
