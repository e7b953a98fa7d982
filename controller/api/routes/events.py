"""The event trace, paged by id: ``since`` is the last id the caller has seen."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlmodel import col, select

from controller.api.deps import AnyRole, SessionDep
from controller.api.schemas import EventPage, EventPublic
from controller.store.models import Event

router = APIRouter(prefix="/events", tags=["events"])


@router.get("")
def list_events(
    tx: SessionDep,
    _: AnyRole,
    since: Annotated[int, Query(ge=0, description="return events with id > since")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    kind: Annotated[str | None, Query(max_length=100, description="prefix, e.g. lease.")] = None,
    subject: Annotated[str | None, Query(max_length=100)] = None,
) -> EventPage:
    query = select(Event).where(col(Event.id) > since).order_by(col(Event.id)).limit(limit)
    if kind:
        query = query.where(col(Event.kind).startswith(kind))
    if subject:
        query = query.where(Event.subject_id == subject)
    found = list(tx.exec(query))
    data = [EventPublic.model_validate(e, from_attributes=True) for e in found]
    return EventPage(data=data, count=len(data), next=found[-1].id if found else since)
