"""Reconcile: the database says what should exist, the engine what does; bring them together.

A settled machine whose container vanished becomes ``lost``; a ready machine whose
container stopped is started; a labelled container or volume with no live record, older
than the grace, is removed. An engine error during the comparison removes nothing, and
containers of another install are never touched.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.errors import EngineError
from controller.providers.base import ContainerInfo, Provider, VolumeInfo
from controller.services import machines, snapshots
from controller.services.access import EXEC_READY, MachineAccess
from controller.services.runtime import DiskWatch
from controller.store import events
from controller.store.db import reader, unit_of_work
from controller.store.models import (
    ALIVE_STATES,
    Host,
    HostState,
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
    skipped: dict[str, str] = field(default_factory=dict)
    """Hosts left out of this pass (their engine did not answer, or they are unreachable)."""


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
    # Read without the write lock (leases are granted meanwhile); write only what changed.
    with unit_of_work(reader(db)) as tx:
        alive = select(Machine.id, Machine.state, Machine.host).where(
            col(Machine.state).in_(ALIVE_STATES)
        )
        rows = list(tx.exec(alive))
        registered = {h.name: h.state for h in tx.exec(select(Host))}
        being_snapshotted = set(
            tx.exec(select(Snapshot.machine_id).where(Snapshot.state == SnapshotState.taking))
        )
    silent = {name for name, state in registered.items() if state == HostState.unreachable}
    alive_now = {machine_id: MachineState(state) for machine_id, state, _ in rows}
    host_of = {machine_id: host for machine_id, _, host in rows}
    containers, volumes, answered = _list_hosts(
        provider,
        owned,
        sorted(set(provider.hosts()) | set(host_of.values()) | set(registered)),
        silent,
        report,
    )
    if not answered:
        skipped = report.skipped
        report.engine_error = (
            next(iter(skipped.values()))
            if len(skipped) == 1
            else "; ".join(f"{h}: {e}" for h, e in skipped.items())
        )
        log.warning("reconcile skipped: %s", report.engine_error)
        return report
    now = now or datetime.now(UTC)
    by_machine = {c.labels.get(machines.LABEL_MACHINE, ""): c for c in containers}
    settled = (
        MachineState.ready,
        MachineState.leased,
        MachineState.stopped,
        MachineState.quarantined,
        MachineState.paused,  # its container is there, paused: not lost
    )
    for machine_id, state in alive_now.items():
        if host_of[machine_id] not in answered:
            continue  # a host that did not answer: its machines are not known lost here
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
            found = by_machine[machine_id]
            provider.on_host(found.host).start_container(found.id)
        except EngineError as exc:
            log.warning("could not restart %s: %s", machine_id, exc.message)
    for machine_id in report.resumed:
        try:
            found = by_machine[machine_id]
            provider.on_host(found.host).unpause_container(found.id)
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
            engine = provider.on_host(container.host)
            _try(engine.remove_container, container.id, report.removed_containers)
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
            engine = provider.on_host(volume.host)
            _try(engine.remove_volume, volume.name, report.removed_volumes)
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


def _list_hosts(
    provider: Provider,
    owned: dict[str, str],
    names: list[str],
    silent: set[str],
    report: ReconcileReport,
) -> tuple[list[ContainerInfo], list[VolumeInfo], set[str]]:
    """Our containers and volumes host by host; a host that does not answer is skipped
    (recorded in the report), never taken for a host where everything vanished."""
    containers: list[ContainerInfo] = []
    volumes: list[VolumeInfo] = []
    answered: set[str] = set()
    for name in names:
        if name in silent:
            report.skipped[name] = "unreachable"
            continue
        try:
            engine = provider.on_host(name)
            found = engine.list_containers(owned)
            kept = engine.list_volumes(owned)
        except EngineError as exc:
            report.skipped[name] = exc.message
            log.warning("reconcile skipped host %s: %s", name, exc.message)
            continue
        containers += [dataclasses.replace(c, host=name) for c in found]
        volumes += [dataclasses.replace(v, host=name) for v in kept]
        answered.add(name)
    return containers, volumes, answered


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


def lose_host(
    *,
    db: Engine,
    access: MachineAccess,
    host: str,
    why: str,
    fenced: Callable[[Session], None] | None = None,
) -> list[str]:
    """A host became unreachable: its settled machines are ``lost`` (their leases end with
    the reason, runs on them move), what was provisioning there failed. When the host comes
    back, reconcile removes what is left of them (no live record: orphans)."""
    now = datetime.now(UTC)
    reason = f"its host {host} became unreachable: {why}"
    with unit_of_work(db) as tx:
        if fenced is not None:
            fenced(tx)
        found = list(
            tx.exec(
                select(Machine).where(Machine.host == host, col(Machine.state).in_(ALIVE_STATES))
            )
        )
        for machine in found:
            if machine.state == MachineState.provisioning:
                machines.set_state(tx, machine, MachineState.failed, reason)
            else:
                machines.set_state(tx, machine, MachineState.lost, reason)
                _end_leases_of_lost(tx, machine.id, now, reason=f"its machine was lost: {reason}")
    for machine in found:
        access.close_machine(machine=machine, why=reason)
    return [m.id for m in found]


def _end_leases_of_lost(
    tx: Session,
    machine_id: str,
    now: datetime,
    reason: str = "its machine was lost: the container vanished from the engine",
) -> None:
    """A lost machine's lease ends with the reason: its renew answers 409 saying so."""
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
