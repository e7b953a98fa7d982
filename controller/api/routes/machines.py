"""Machines: provision, list, lifecycle, exec. Thin: parse, authorize, call fleet, shape."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.responses import StreamingResponse

from controller.api.deps import Ctl, LeaseToken, OpsOnly, OpsOrAgent, key
from controller.api.routes.snapshots import public as snapshot_public
from controller.api.schemas import (
    ExecAnswer,
    ExecBody,
    ForkAnswer,
    ForkBody,
    ListOf,
    MachinePublic,
    SnapshotBody,
    SnapshotPublic,
)
from controller.domain import MachineTemplate
from controller.services import learning, machines, snapshots
from controller.services.runtime import Controller
from controller.store.models import Machine

router = APIRouter(prefix="/machines", tags=["machines"])


def public(machine: Machine, ctl: Controller | None = None) -> MachinePublic:
    used, limit = (None, None)
    if ctl is not None:
        used, limit = ctl.disk_watch.usage.get(machine.id, (None, None))
    return MachinePublic(
        **machine.model_dump(exclude={"container_name", "volume_name", "branch"}),
        workdir=machine.workdir,
        disk_used_bytes=used,
        disk_limit_bytes=limit,
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def create_machine(
    body: MachineTemplate, ctl: Ctl, _: OpsOnly, wait: bool = False
) -> MachinePublic:
    return public(machines.request_machine(ctl=ctl, template=body, wait=wait))


@router.get("")
def list_machines(
    ctl: Ctl,
    caller: OpsOrAgent,
    state: str | None = None,
    pool: str | None = None,
    label: Annotated[str | None, Query(description="key or key=value")] = None,
) -> ListOf[MachinePublic]:
    found = machines.list_machines(ctl=ctl, state=state, pool=pool, label=label)
    return ListOf(data=[public(m, ctl) for m in found], count=len(found))


@router.get("/{machine_id}")
def show_machine(machine_id: str, ctl: Ctl, caller: OpsOrAgent) -> MachinePublic:
    return public(machines.show_machine(ctl=ctl, machine_id=machine_id), ctl)


@router.post("/{machine_id}/stop")
def stop_machine(machine_id: str, ctl: Ctl, _: OpsOnly) -> MachinePublic:
    machine = machines.stop_machine(
        db=ctl.db, provider=ctl.provider, access=ctl.access, machine_id=machine_id
    )
    return public(machine)


@router.post("/{machine_id}/start")
def start_machine(machine_id: str, ctl: Ctl, _: OpsOnly) -> MachinePublic:
    return public(machines.start_machine(db=ctl.db, provider=ctl.provider, machine_id=machine_id))


@router.post("/{machine_id}/reset")
def reset_machine(machine_id: str, ctl: Ctl, _: OpsOnly) -> MachinePublic:
    machine = machines.reset_machine(
        db=ctl.db,
        provider=ctl.provider,
        settings=ctl.settings,
        access=ctl.access,
        machine_id=machine_id,
    )
    return public(machine)


@router.post("/{machine_id}/unquarantine")
def unquarantine_machine(machine_id: str, ctl: Ctl, _: OpsOnly) -> MachinePublic:
    """Back to ``ready`` (reset first when its pool cleans between leases), or ``leased``
    while a lease on it is still active; 409 when the machine is not quarantined."""
    return public(learning.unquarantine(ctl=ctl, machine_id=machine_id), ctl)


@router.post("/{machine_id}/pause")
def pause_machine(
    machine_id: str, ctl: Ctl, caller: OpsOrAgent, x_lease_token: LeaseToken = None
) -> MachinePublic:
    """Freeze its processes with their memory; commands answer 409 until resumed. Ops, or
    the lease holder with its token."""
    return public(
        snapshots.pause(ctl=ctl, machine_id=machine_id, key=key(caller, x_lease_token)), ctl
    )


@router.post("/{machine_id}/resume")
def resume_machine(
    machine_id: str, ctl: Ctl, caller: OpsOrAgent, x_lease_token: LeaseToken = None
) -> MachinePublic:
    """Thaw it: processes, shell sessions and forwards carry on."""
    return public(
        snapshots.resume(ctl=ctl, machine_id=machine_id, key=key(caller, x_lease_token)), ctl
    )


@router.post("/{machine_id}/snapshots", status_code=status.HTTP_201_CREATED)
def snapshot_machine(
    machine_id: str,
    ctl: Ctl,
    caller: OpsOrAgent,
    body: SnapshotBody | None = None,
    x_lease_token: LeaseToken = None,
) -> SnapshotPublic:
    """Save its disk state (filesystem and workspace); it is paused only meanwhile."""
    body = body or SnapshotBody()
    snap = snapshots.take(
        ctl=ctl,
        machine_id=machine_id,
        key=key(caller, x_lease_token),
        name=body.name,
        labels=body.labels,
        pinned=body.pinned,
    )
    return snapshot_public(snapshots.SnapshotView(snap, []))


@router.post("/{machine_id}/fork", status_code=status.HTTP_201_CREATED)
def fork_machine(
    machine_id: str,
    body: ForkBody,
    ctl: Ctl,
    caller: OpsOrAgent,
    x_lease_token: LeaseToken = None,
) -> ForkAnswer:
    """A snapshot and ``count`` machines started from it, each its own volume, container
    and fence; under a lease, the lease's token is needed (ops without it: recorded)."""
    done = snapshots.fork(
        ctl=ctl,
        machine_id=machine_id,
        key=key(caller, x_lease_token),
        count=body.count,
        labels=body.labels,
    )
    return ForkAnswer(
        snapshot=snapshot_public(
            snapshots.SnapshotView(done.snapshot, [m.id for m in done.machines])
        ),
        machines=[public(m, ctl) for m in done.machines],
        leases=done.leases,
    )


@router.delete("/{machine_id}")
def destroy_machine(machine_id: str, ctl: Ctl, _: OpsOnly) -> MachinePublic:
    machine = machines.destroy_machine(
        db=ctl.db, provider=ctl.provider, access=ctl.access, machine_id=machine_id
    )
    return public(machine)


@router.post("/{machine_id}/exec", response_model=None)
def exec_in_machine(
    machine_id: str,
    body: ExecBody,
    ctl: Ctl,
    caller: OpsOrAgent,
    stream: bool = False,
    x_lease_token: LeaseToken = None,
) -> ExecAnswer | StreamingResponse:
    if stream:
        lines = ctl.access.stream_command(
            machine_id=machine_id,
            key=key(caller, x_lease_token),
            cmd=body.cmd,
            cwd=body.cwd,
            env=body.env,
            timeout_s=body.timeout_s,
        )
        return StreamingResponse(lines, media_type="application/x-ndjson")
    result = ctl.access.run_command(
        machine_id=machine_id,
        key=key(caller, x_lease_token),
        cmd=body.cmd,
        cwd=body.cwd,
        env=body.env,
        timeout_s=body.timeout_s,
    )
    return ExecAnswer(**result.__dict__)
