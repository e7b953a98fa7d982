"""Snapshots: list, show, delete (taking one and forking are machine routes)."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import Ctl, OpsOnly, OpsOrAgent
from controller.api.schemas import ListOf, SnapshotPublic
from controller.services import snapshots

router = APIRouter(prefix="/snapshots", tags=["snapshots"])


def public(view: snapshots.SnapshotView) -> SnapshotPublic:
    return SnapshotPublic(**view.snapshot.model_dump(), used_by=view.used_by)


@router.get("")
def list_snapshots(ctl: Ctl, _: OpsOrAgent) -> ListOf[SnapshotPublic]:
    found = snapshots.list_snapshots(ctl=ctl)
    return ListOf(data=[public(v) for v in found], count=len(found))


@router.get("/{snapshot_id}")
def show_snapshot(snapshot_id: str, ctl: Ctl, _: OpsOrAgent) -> SnapshotPublic:
    return public(snapshots.show_snapshot(ctl=ctl, snapshot_id=snapshot_id))


@router.delete("/{snapshot_id}")
def delete_snapshot(snapshot_id: str, ctl: Ctl, _: OpsOnly) -> SnapshotPublic:
    """409 while live machines started from it or a pool's template names it."""
    return public(
        snapshots.SnapshotView(snapshots.delete_snapshot(ctl=ctl, snapshot_id=snapshot_id), [])
    )
