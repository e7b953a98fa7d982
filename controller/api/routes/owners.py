"""Owners' queues: what a stage's owner must look at (issue 13)."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import AnyRole, Ctl
from controller.api.schemas import ListOf, OwnerItemPublic
from controller.services import owners
from controller.store.models import OwnerItem

router = APIRouter(prefix="/owners", tags=["owners"])


def public(item: OwnerItem) -> OwnerItemPublic:
    return OwnerItemPublic(
        id=item.id,
        owner=item.owner,
        kind=item.kind,
        subject=item.subject,
        run=item.run_id,
        stage=item.stage,
        since=item.created_at,
        updated_at=item.updated_at,
        state=item.state.value,
        count=item.count,
        data=item.data,
        done_at=item.done_at,
    )


@router.get("/{owner}/queue")
def owner_queue(
    owner: str, ctl: Ctl, _: AnyRole, state: str | None = None
) -> ListOf[OwnerItemPublic]:
    """Failed stages, runs waiting for a verdict, failure signatures and quarantined
    machines of one owner; open items first. ``state``: open or done."""
    found = owners.queue(ctl=ctl, owner=owner, state=state)
    return ListOf(data=[public(item) for item in found], count=len(found))


@router.post("/{owner}/queue/{item_id}/done")
def mark_done(owner: str, item_id: str, ctl: Ctl, caller: AnyRole) -> OwnerItemPublic:
    """The owner (anyone with a token) dealt with the item."""
    return public(
        owners.mark_done(ctl=ctl, owner=owner, item_id=item_id, by=caller.name or caller.id)
    )
