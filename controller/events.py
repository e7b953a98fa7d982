"""Events: every state change leaves one, in the same transaction as the change."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from controller.models import Event


def record(session: Session, kind: str, subject_id: str, **data: Any) -> Event:
    event = Event(kind=kind, subject_id=subject_id, data=data)
    session.add(event)
    return event
