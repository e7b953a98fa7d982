"""The event trace, paged by id: ``since`` is the last id the caller has seen."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from controller.api.deps import AnyRole, Ctl
from controller.api.schemas import EventPage, EventPublic
from controller.services import events

router = APIRouter(prefix="/events", tags=["events"])


@router.get("")
def list_events(
    ctl: Ctl,
    _: AnyRole,
    since: Annotated[int, Query(ge=0, description="return events with id > since")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    kind: Annotated[str | None, Query(max_length=100, description="prefix, e.g. lease.")] = None,
    subject: Annotated[str | None, Query(max_length=100)] = None,
) -> EventPage:
    found = events.list_events(ctl=ctl, since=since, limit=limit, kind=kind, subject=subject)
    data = [EventPublic.model_validate(e, from_attributes=True) for e in found]
    return EventPage(data=data, count=len(data), next=found[-1].id if found else since)
