"""Owners: who answers for a stage, and the queue of what they must look at.

A repo's ``.shopfloor.toml`` ``[owners]`` names an owner per stage (kept on the run as
``Run.policy``); a pool may name a default ``owner``. A failed stage, a run waiting for its
verdict, and what colleagues raise through :func:`notify` (a new or recurring failure
signature, a quarantined machine) become items in the owner's queue — one open item per
(owner, kind, subject), a recurrence counts on it — and each item is handed to the webhooks
that want it (queued in the same transaction, sent by the webhook loop).
"""

from __future__ import annotations

import re
from typing import Any

from sqlmodel import Session, col, select

from controller.errors import InvalidInput, NotFound
from controller.services import webhooks
from controller.services.runtime import Controller
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.models import (
    OWNER_ITEM_KINDS,
    OwnerItem,
    OwnerItemState,
    Pool,
    Run,
    Stage,
    utcnow,
)

OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
VERDICT_STAGE = "review"
"""A run waiting for its verdict goes to the owner of its ``review`` stage (or the pool's)."""
QUEUE_LIMIT = 500


def check_owner(owner: str) -> str:
    if not OWNER.match(owner):
        raise InvalidInput(
            "an owner is 1 to 100 letters, digits, '.', '_', '@' or '-', starting with a "
            "letter or digit"
        )
    return owner


def pool_owner(tx: Session, pool: str | None) -> str | None:
    found = tx.get(Pool, pool) if pool else None
    return found.owner if found is not None else None


def owner_for(tx: Session, run: Run, stage: str | None) -> str | None:
    """The repo's owner of ``stage``, else the run's pool's default owner, else nobody."""
    named: dict[str, str] = (run.policy or {}).get("owners") or {}
    if stage is not None and stage in named:
        return named[stage]
    return pool_owner(tx, run.pool)


def run_owners(tx: Session, run: Run) -> list[str]:
    """Everyone who answers for some part of the run."""
    named: dict[str, str] = (run.policy or {}).get("owners") or {}
    found = [*named.values(), pool_owner(tx, run.pool)]
    return sorted({owner for owner in found if owner})


def notify(
    *,
    ctl: Controller,
    owner: str,
    kind: str,
    subject: str,
    data: dict[str, Any],
    run_id: str | None = None,
    stage: str | None = None,
) -> OwnerItem:
    """Put an item in ``owner``'s queue (or count a recurrence on the open one) and queue
    the webhooks' deliveries, in one transaction. For colleagues' hooks: a new or recurring
    failure signature (``signature_new``, ``signature_recurring``), a quarantined machine
    (``machine_quarantined``)."""
    with unit_of_work(ctl.db) as tx:
        return notify_in(
            tx, owner=owner, kind=kind, subject=subject, data=data, run_id=run_id, stage=stage
        )


def notify_in(
    tx: Session,
    *,
    owner: str,
    kind: str,
    subject: str,
    data: dict[str, Any],
    run_id: str | None = None,
    stage: str | None = None,
) -> OwnerItem:
    """:func:`notify` inside the caller's transaction (the change that raised it)."""
    check_owner(owner)
    if kind not in OWNER_ITEM_KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(OWNER_ITEM_KINDS)}")
    now = utcnow()
    item = tx.exec(
        select(OwnerItem).where(
            OwnerItem.owner == owner,
            OwnerItem.kind == kind,
            OwnerItem.subject == subject,
            OwnerItem.state == OwnerItemState.open,
        )
    ).first()
    if item is None:
        item = OwnerItem(
            owner=owner, kind=kind, subject=subject, run_id=run_id, stage=stage, data=data
        )
    else:
        item.count += 1
        item.data, item.updated_at = data, now
        item.run_id, item.stage = run_id or item.run_id, stage or item.stage
    tx.add(item)
    tx.flush()
    events.record(
        tx,
        "owner.item",
        item.id,
        owner=owner,
        item_kind=kind,
        subject=subject,
        run_id=item.run_id,
        stage=item.stage,
        count=item.count,
    )
    webhooks.enqueue_in(
        tx,
        event=kind,
        owner=owner,
        payload={
            "owner": owner,
            "item": item.id,
            "subject": subject,
            "run": item.run_id,
            "stage": item.stage,
            "count": item.count,
            "data": data,
            "at": now.isoformat(),
        },
    )
    return item


def stage_failed_in(tx: Session, *, run: Run, stage: Stage) -> OwnerItem | None:
    """A stage that failed for good lands in its owner's queue (if it has one)."""
    owner = owner_for(tx, run, stage.name)
    if owner is None:
        return None
    return notify_in(
        tx,
        owner=owner,
        kind="stage_failed",
        subject=stage.id,
        data={"summary": (stage.summary or "")[:500], "attempts": stage.attempts},
        run_id=run.id,
        stage=stage.name,
    )


def verdict_waiting_in(tx: Session, *, run: Run) -> OwnerItem | None:
    owner = owner_for(tx, run, VERDICT_STAGE)
    if owner is None:
        return None
    return notify_in(
        tx,
        owner=owner,
        kind="verdict_waiting",
        subject=run.id,
        data={"status": run.status.value, "task": run.task[:200]},
        run_id=run.id,
    )


def verdict_given_in(tx: Session, *, run_id: str) -> None:
    """The verdict came: the run's ``verdict_waiting`` items are done."""
    for item in tx.exec(
        select(OwnerItem).where(
            OwnerItem.run_id == run_id,
            OwnerItem.kind == "verdict_waiting",
            OwnerItem.state == OwnerItemState.open,
        )
    ):
        _close(tx, item, by="verdict")


def _close(tx: Session, item: OwnerItem, *, by: str) -> None:
    item.state, item.done_at = OwnerItemState.done, utcnow()
    tx.add(item)
    events.record(tx, "owner.item_done", item.id, owner=item.owner, item_kind=item.kind, by=by)


def queue(*, ctl: Controller, owner: str, state: str | None = None) -> list[OwnerItem]:
    """An owner's items, open first, newest first within each state."""
    check_owner(owner)
    query = select(OwnerItem).where(OwnerItem.owner == owner)
    if state:
        if state not in {s.value for s in OwnerItemState}:
            raise InvalidInput("state must be open or done")
        query = query.where(OwnerItem.state == state)
    query = query.order_by(col(OwnerItem.state).desc(), col(OwnerItem.created_at).desc())
    with unit_of_work(ctl.reader) as tx:
        return list(tx.exec(query.limit(QUEUE_LIMIT)))


def mark_done(*, ctl: Controller, owner: str, item_id: str, by: str) -> OwnerItem:
    with unit_of_work(ctl.db) as tx:
        item = tx.get(OwnerItem, item_id)
        if item is None or item.owner != owner:
            raise NotFound(f"{owner} has no item {item_id}")
        if item.state == OwnerItemState.open:
            _close(tx, item, by=by)
        tx.flush()
        return item
