"""Snapshots: list, show, delete (taking one and forking are machine routes)."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import Ctl, OpsOrAgent
from controller.api.schemas import ListOf, SnapshotPublic
from controller.services import snapshots

router = APIRouter(prefix="/snapshots", tags=["snapshots"])


def public(view: snapshots.SnapshotView) -> SnapshotPublic:
    return SnapshotPublic(**view.snapshot.model_dump(), used_by=view.used_by)


@router.get("")
def list_snapshots(ctl: Ctl, caller: OpsOrAgent) -> ListOf[SnapshotPublic]:
    """Every snapshot for ops; an agent's own for an agent."""
    found = snapshots.list_snapshots(ctl=ctl, viewer=caller)
    return ListOf(data=[public(v) for v in found], count=len(found))


@router.get("/{snapshot_id}")
def show_snapshot(snapshot_id: str, ctl: Ctl, caller: OpsOrAgent) -> SnapshotPublic:
    return public(snapshots.show_snapshot(ctl=ctl, snapshot_id=snapshot_id, viewer=caller))


@router.delete("/{snapshot_id}")
def delete_snapshot(snapshot_id: str, ctl: Ctl, caller: OpsOrAgent) -> SnapshotPublic:
    """409 while live machines started from it or a pool's template names it; an agent
    deletes only its own."""
    gone = snapshots.delete_snapshot(ctl=ctl, snapshot_id=snapshot_id, viewer=caller)
    return public(snapshots.SnapshotView(gone, []))
