"""The event trace, read back: every state change wrote an ``Event`` in its transaction."""

from __future__ import annotations

from sqlmodel import col, select

from controller.services.runtime import Controller
from controller.store.db import unit_of_work
from controller.store.models import Event


def list_events(
    *,
    ctl: Controller,
    since: int = 0,
    limit: int = 100,
    kind: str | None = None,
    subject: str | None = None,
) -> list[Event]:
    """Events with id > ``since``, oldest first; ``kind`` is a prefix (``lease.``)."""
    query = select(Event).where(col(Event.id) > since).order_by(col(Event.id)).limit(limit)
    if kind:
        query = query.where(col(Event.kind).startswith(kind))
    if subject:
        query = query.where(Event.subject_id == subject)
    with unit_of_work(ctl.reader) as tx:
        return list(tx.exec(query))
