"""Reconcile: the database says what should exist, the engine what does; bring them together.

A settled machine whose container vanished becomes ``lost``; a ready machine whose
container stopped is started; a labelled container or volume with no live record, older
than the grace, is removed. An engine error during the comparison removes nothing, and
containers of another install are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.errors import EngineError
from controller.providers.base import Provider
from controller.services import machines, snapshots
from controller.services.access import EXEC_READY, MachineAccess
from controller.services.runtime import DiskWatch
from controller.store import events
from controller.store.db import reader, unit_of_work
from controller.store.models import (
    ALIVE_STATES,
    Lease,
    LeaseState,
    Machine,
    MachineState,
    Snapshot,
    SnapshotState,
)

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    lost: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    removed_containers: list[str] = field(default_factory=list)
    removed_volumes: list[str] = field(default_factory=list)
    removed_disks: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    """Machines the engine held paused that nothing paused (a snapshot whose controller died)."""
    removed_snapshot_parts: list[str] = field(default_factory=list)
    near_full: list[str] = field(default_factory=list)
    """Machines whose workspace crossed the near-full share on this pass."""
    engine_error: str | None = None


DISK_GRACE_S = 60.0
"""A disk without its volume or container is left this long at least, whatever the orphan
grace: provisioning makes the disk a moment before the volume."""
STRAY_PAUSE_S = 10.0
"""A container the engine holds paused while its machine is not ``paused`` is thawed only once
it was seen so this long: a snapshot pauses its machine for well under a second, and one may
start between this pass's listing and its reading of the database."""
_PAUSED_SINCE: dict[str, datetime] = {}
NEAR_FULL_HYSTERESIS = 0.05
"""A machine is near full again (a new event) only after it went this far below the share."""


def fail_interrupted(
    *, db: Engine, provider: Provider, older_than_s: float | None = None
) -> list[str]:
    """Provisioning that a dead controller left half-done cannot resume: all of it at
    start-up (SQLite), or what is ``older_than_s`` (several controllers on one database)."""
    query = select(Machine).where(Machine.state == MachineState.provisioning)
    if older_than_s is not None:
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        query = query.where(col(Machine.updated_at) < cutoff)
    with unit_of_work(db) as tx:
        stuck = list(tx.exec(query))
        for machine in stuck:
            machines.set_state(
                tx, machine, MachineState.failed, "controller restarted while provisioning"
            )
    for machine in stuck:
        machines.remove_resources(provider, machine)
    return [m.id for m in stuck]


def reconcile(
    *,
    db: Engine,
    provider: Provider,
    access: MachineAccess,
    install_id: str,
    grace_s: float,
    now: datetime | None = None,
    disk_watch: DiskWatch | None = None,
    near_full: float = 0.9,
    fenced: Callable[[Session], None] | None = None,
) -> ReconcileReport:
    """Bring database and engine together. An engine error removes nothing. The channels
    into a machine found lost close. ``fenced`` checks, in the transaction that marks
    machines lost, that this controller still leads (raises otherwise)."""
    report = ReconcileReport()
    owned = {machines.LABEL_CONTROLLER: install_id}
    try:
        containers = provider.list_containers(owned)
        volumes = provider.list_volumes(owned)
    except EngineError as exc:
        report.engine_error = exc.message
        log.warning("reconcile skipped: %s", exc.message)
        return report
    now = now or datetime.now(UTC)
    by_machine = {c.labels.get(machines.LABEL_MACHINE, ""): c for c in containers}
    # Read without the write lock (leases are granted meanwhile); write only what changed.
    with unit_of_work(reader(db)) as tx:
        alive = select(Machine.id, Machine.state).where(col(Machine.state).in_(ALIVE_STATES))
        alive_now = {machine_id: MachineState(state) for machine_id, state in tx.exec(alive)}
        being_snapshotted = set(
            tx.exec(select(Snapshot.machine_id).where(Snapshot.state == SnapshotState.taking))
        )
    settled = (
        MachineState.ready,
        MachineState.leased,
        MachineState.stopped,
        MachineState.quarantined,
        MachineState.paused,  # its container is there, paused: not lost
    )
    for machine_id, state in alive_now.items():
        container = by_machine.get(machine_id)
        if state in settled and container is None:
            report.lost.append(machine_id)
        elif state in EXEC_READY and container and container.status in ("exited", "created"):
            report.restarted.append(machine_id)
        elif (
            state in EXEC_READY
            and container
            and container.status == "paused"
            and machine_id not in being_snapshotted
        ):
            since = _PAUSED_SINCE.setdefault(machine_id, now)
            if now - since >= timedelta(seconds=STRAY_PAUSE_S):
                report.resumed.append(machine_id)
    for machine_id in list(_PAUSED_SINCE):
        container = by_machine.get(machine_id)
        if container is None or container.status != "paused" or machine_id in report.resumed:
            del _PAUSED_SINCE[machine_id]
    if report.lost:
        with unit_of_work(db) as tx:
            if fenced is not None:
                fenced(tx)
            lost = [machines.get_machine(tx, machine_id) for machine_id in report.lost]
            for machine in lost:
                if machine.state in settled:  # not destroyed meanwhile
                    machines.set_state(
                        tx, machine, MachineState.lost, "container vanished from the engine"
                    )
                    _end_leases_of_lost(tx, machine.id, now)
                alive_now.pop(machine.id)  # no longer alive: what is left of it is an orphan
        for machine in lost:
            access.close_machine(machine=machine, why="the machine's container vanished")
    for machine_id in report.restarted:
        try:
            provider.start_container(by_machine[machine_id].id)
        except EngineError as exc:
            log.warning("could not restart %s: %s", machine_id, exc.message)
    for machine_id in report.resumed:
        try:
            provider.unpause_container(by_machine[machine_id].id)
        except EngineError as exc:
            log.warning("could not resume %s: %s", machine_id, exc.message)
    old = now - timedelta(seconds=grace_s)

    def orphaned(machine_id: str) -> bool:
        return machine_id not in alive_now

    def snapshot_part(labels: dict[str, str]) -> bool:
        """A snapshot's workspace copy or copy helper: :func:`snapshots.remove_orphans`."""
        return not labels.get(machines.LABEL_MACHINE) and bool(labels.get(machines.LABEL_SNAPSHOT))

    for container in containers:
        machine_id = container.labels.get(machines.LABEL_MACHINE, "")
        if snapshot_part(container.labels):
            continue
        if orphaned(machine_id) and container.created_at < old:
            _try(provider.remove_container, container.id, report.removed_containers)
    live_volumes = {
        c.labels.get(machines.LABEL_MACHINE)
        for c in containers
        if c.id not in report.removed_containers
    }
    for volume in volumes:
        machine_id = volume.labels.get(machines.LABEL_MACHINE, "")
        if snapshot_part(volume.labels):
            continue
        too_young = volume.created_at is not None and volume.created_at >= old
        if orphaned(machine_id) and machine_id not in live_volumes and not too_young:
            _try(provider.remove_volume, volume.name, report.removed_volumes)
    keep = {c.name for c in containers if c.id not in report.removed_containers}
    keep |= {v.name for v in volumes if v.name not in report.removed_volumes}
    try:
        report.removed_disks = provider.remove_stray_disks(keep, max(grace_s, DISK_GRACE_S))
    except EngineError as exc:
        log.warning("could not remove stray disks: %s", exc.message)
    try:
        report.removed_snapshot_parts = snapshots.remove_orphans(
            db=db, provider=provider, install_id=install_id, grace_s=grace_s, now=now
        )
    except EngineError as exc:
        log.warning("could not look for snapshot leftovers: %s", exc.message)
    if disk_watch is not None:
        report.near_full = _measure_disks(db, provider, disk_watch, set(alive_now), near_full)
    return report


def _measure_disks(
    db: Engine, provider: Provider, watch: DiskWatch, alive: set[str], share: float
) -> list[str]:
    """Workspace use of every live machine (a statvfs each: no engine call); an event for
    each machine that crossed ``share`` of its limit."""
    usage: dict[str, tuple[int, int]] = {}
    for machine_id in alive:
        measured = provider.disk_usage(machines.volume_name(machine_id))
        if measured is not None:
            usage[machine_id] = measured
    watch.usage = usage
    crossed = []
    for machine_id, (used, limit) in usage.items():
        ratio = used / limit if limit else 0.0
        if ratio >= share and machine_id not in watch.near_full:
            crossed.append(machine_id)
        elif ratio < share - NEAR_FULL_HYSTERESIS:
            watch.near_full.discard(machine_id)
    watch.near_full &= set(usage)
    if crossed:
        with unit_of_work(db) as tx:
            for machine_id in crossed:
                used, limit = usage[machine_id]
                events.record(
                    tx, "machine.disk_near_full", machine_id, used_bytes=used, limit_bytes=limit
                )
        watch.near_full.update(crossed)
    return crossed


def _end_leases_of_lost(tx: Session, machine_id: str, now: datetime) -> None:
    """A lost machine's lease ends with the reason: its renew answers 409 saying so."""
    reason = "its machine was lost: the container vanished from the engine"
    active = select(Lease).where(Lease.machine_id == machine_id, Lease.state == LeaseState.active)
    for lease in tx.exec(active):
        lease.state, lease.ended_at, lease.reason = LeaseState.expired, now, reason
        tx.add(lease)
        events.record(tx, "lease.expired", lease.id, machine_id=machine_id, reason=reason)


def _try(remove: object, name: str, into: list[str]) -> None:
    try:
        remove(name)  # type: ignore[operator]
        into.append(name)
    except EngineError as exc:
        log.warning("could not remove orphan %s: %s", name, exc.message)
