"""Warm pools: a template plus how many ``ready`` machines to keep, filled by a loop.

The loop is level-triggered: each tick counts the pool's machines by state and starts as
many provisionings as are missing, never going over ``max_machines``. A template that
keeps failing stops the pool (with the reason on the pool) until the template changes.

A template with ``prebuild`` pays clone + setup once per commit of its ref: one machine
(the builder, outside the pool meanwhile) is made the usual way, snapshotted
(``snapshots.take``) and then joins the pool; every later machine starts from that snapshot
(``Pool.prebuilt``). When the ref moves to another commit the next fill builds anew; the old
snapshot is then used by nobody once its machines are gone, and retention deletes it.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, replace

from sqlmodel import Session, col, select

from controller.domain import MachineTemplate, ResetPolicy
from controller.errors import InvalidInput, NotFound, ShopfloorError
from controller.services import leases, machines, owners, repos, snapshots
from controller.services.runtime import Controller
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.models import (
    ALIVE_STATES,
    Host,
    HostState,
    Machine,
    MachineState,
    Pool,
    Snapshot,
    SnapshotState,
    utcnow,
)

log = logging.getLogger(__name__)

_POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
PREBUILD_LABEL = "prebuild-of"
"""On a prebuild pool's builder machine (and its snapshot): the pool's name."""


def check_name(name: str) -> str:
    if not _POOL_NAME.match(name):
        raise InvalidInput(
            f"pool name {name!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class PoolView:
    """A pool with its machines counted by state (destroyed ones left out)."""

    pool: Pool
    counts: dict[str, int]


def get_pool(tx: Session, name: str) -> Pool:
    pool = tx.get(Pool, name)
    if pool is None:
        known = ", ".join(sorted(tx.exec(select(Pool.name)))) or "none yet"
        raise NotFound(f"unknown pool {name!r}; pools: {known}")
    return pool


def put_pool(
    *,
    ctl: Controller,
    name: str,
    template: MachineTemplate,
    min_ready: int,
    max_machines: int,
    reset: ResetPolicy,
    owner: str | None = None,
) -> PoolView:
    """Create or change a pool; the template is checked now (repo, ref, image) and kept.
    ``owner``: who answers for its runs where the repo's ``[owners]`` names nobody."""
    check_name(name)
    if owner is not None:
        owners.check_owner(owner)
    if min_ready > max_machines:
        raise InvalidInput(f"min_ready ({min_ready}) cannot exceed max_machines ({max_machines})")
    if template.prebuild and template.snapshot:
        raise InvalidInput(
            "prebuild makes the pool's own snapshot: leave out snapshot, or prebuild"
        )
    if template.prebuild and not (template.repo or template.setup):
        raise InvalidInput("prebuild needs a repo or setup commands to run once")
    machines.make_spec(ctl=ctl, template=template, pool=name)
    with unit_of_work(ctl.db) as tx:
        pool = tx.get(Pool, name)
        created = pool is None
        pool = pool or Pool(name=name)
        if pool.template != template.model_dump():
            pool.prebuilt = None  # made from another template: built anew
        pool.template = template.model_dump()
        pool.min_ready, pool.max_machines, pool.reset = (
            min_ready,
            max_machines,
            reset,
        )
        pool.reason, pool.owner = None, owner
        pool.updated_at = utcnow()
        tx.add(pool)
        events.record(
            tx,
            "pool.created" if created else "pool.updated",
            name,
            min_ready=min_ready,
            max_machines=max_machines,
            reset=reset,
            owner=owner,
        )
        return PoolView(pool, counts(tx, name))


def show_pool(*, ctl: Controller, name: str) -> PoolView:
    with unit_of_work(ctl.reader) as tx:
        return PoolView(get_pool(tx, name), counts(tx, name))


def list_pools(*, ctl: Controller) -> list[PoolView]:
    with unit_of_work(ctl.reader) as tx:
        found = tx.exec(select(Pool).order_by(col(Pool.name)))
        return [PoolView(pool, counts(tx, pool.name)) for pool in found]


def counts(tx: Session, name: str) -> dict[str, int]:
    states = tx.exec(
        select(Machine.state).where(Machine.pool == name, Machine.state != MachineState.destroyed)
    )
    found = Counter(MachineState(state).value for state in states)
    return {
        state.value: found.get(state.value, 0)
        for state in MachineState
        if state.value != "destroyed"
    }


def fill(*, ctl: Controller) -> dict[str, int]:
    """One tick of the pool loop: start the missing provisionings; say how many per pool."""
    with unit_of_work(ctl.reader) as tx:  # reads take no write lock (leases go on)
        names = list(tx.exec(select(Pool.name)))
    started: dict[str, int] = {}
    for name in names:
        try:
            started[name] = _fill_one(ctl, name)
        except ShopfloorError as exc:
            log.warning("pool %s cannot fill: %s", name, exc.message)
            _stop(ctl, name, exc.message)
    return started


def _leave_draining_hosts(ctl: Controller, name: str) -> None:
    """A draining host's ready machines leave the pool (destroyed; the pool refills on
    other hosts); leased ones finish their lease and leave when they come back."""
    with unit_of_work(ctl.reader) as tx:
        moving = tx.exec(
            select(Machine.id)
            .join(Host, col(Host.name) == col(Machine.host))
            .where(
                Machine.pool == name,
                Machine.state == MachineState.ready,
                Host.state == HostState.draining,
            )
        ).all()
    for machine_id in moving:
        try:
            machines.destroy_machine(
                db=ctl.db, provider=ctl.provider, access=ctl.access, machine_id=machine_id
            )
        except ShopfloorError as exc:  # leased meanwhile: it leaves when it comes back
            log.info("machine %s stays on its draining host for now: %s", machine_id, exc.message)


def _fill_one(ctl: Controller, name: str) -> int:
    _leave_draining_hosts(ctl, name)
    with unit_of_work(ctl.reader) as tx:
        pool = get_pool(tx, name)
        by_state = counts(tx, name)
        failing = _failing_reason(ctl, tx, pool)
    if failing:
        _stop(ctl, name, failing)
        return 0
    # A quarantined machine is kept for ops but serves nobody: the pool replaces it.
    alive = sum(by_state[s.value] for s in ALIVE_STATES if s != MachineState.quarantined)
    if alive > pool.max_machines:
        _shrink(ctl, name, alive - pool.max_machines)
        return 0
    # Requests waiting on the pool count too: a pool with min_ready 0 makes machines on demand.
    waiting = leases.runtime(ctl).waiting_for(leases.Target(pool=name).key)
    missing = pool.min_ready + waiting - by_state["ready"] - by_state["provisioning"]
    wanted = max(0, min(missing, pool.max_machines - alive))
    if wanted:
        template = MachineTemplate.model_validate(pool.template)
        spec = machines.make_spec(ctl=ctl, template=template, pool=name)
        if template.prebuild:
            prebuilt = _prebuilt_spec(ctl, pool, spec)
            if prebuilt is None:
                return 0  # being built
            spec = prebuilt
        for _ in range(wanted):
            machines.submit(ctl=ctl, spec=spec, wait=False)
    return wanted


def _prebuilt_spec(
    ctl: Controller, pool: Pool, spec: machines.MachineSpec
) -> machines.MachineSpec | None:
    """The spec of a machine from the pool's snapshot for the ref's current commit, or None
    while that snapshot is being built (one builder at a time; raises when it failed)."""
    commit = (
        repos.resolve_commit(
            ctl.settings.data_dir, spec.repo, spec.ref, timeout_s=ctl.settings.provision_timeout_s
        )
        if spec.repo
        else None
    )
    with unit_of_work(ctl.reader) as tx:
        snap = tx.get(Snapshot, pool.prebuilt) if pool.prebuilt else None
        builders = list(
            tx.exec(
                select(Machine)
                .where(col(Machine.pool).is_(None), Machine.created_at >= pool.updated_at)
                .order_by(col(Machine.created_at).desc())
            )
        )
    if snap is not None and snap.state == SnapshotState.ready and snap.commit == commit:
        return replace(spec, image=snap.image, repo=None, setup=[], snapshot=snap)
    builder = next((m for m in builders if m.labels.get(PREBUILD_LABEL) == pool.name), None)
    if builder is not None and builder.state == MachineState.ready and builder.commit != commit:
        machines.destroy_machine(  # the ref moved while it was built: build again
            db=ctl.db, provider=ctl.provider, access=ctl.access, machine_id=builder.id
        )
        builder = None
    if builder is None or builder.state in (MachineState.destroyed, MachineState.lost):
        labels = {**spec.labels, PREBUILD_LABEL: pool.name}
        machines.submit(ctl=ctl, spec=replace(spec, pool=None, labels=labels), wait=False)
        return None
    if builder.state == MachineState.failed:
        raise ShopfloorError(f"the prebuild of pool {pool.name} failed: {builder.reason}")
    if builder.state != MachineState.ready:
        return None  # provisioning: clone + setup still running
    _snapshot_builder(ctl, pool.name, builder)
    return None


def _snapshot_builder(ctl: Controller, name: str, builder: Machine) -> None:
    """Snapshot the builder, make it the pool's prebuilt snapshot and the builder one of the
    pool's machines (its setup is not wasted)."""
    snap = snapshots.take(
        ctl=ctl,
        machine_id=builder.id,
        key=None,
        name=f"prebuild of pool {name}",
        labels={PREBUILD_LABEL: name},
    )
    with unit_of_work(ctl.db) as tx:
        pool = tx.get(Pool, name)
        machine = tx.get(Machine, builder.id)
        if pool is None:
            return
        previous, pool.prebuilt = pool.prebuilt, snap.id
        tx.add(pool)
        if machine is not None and machine.state == MachineState.ready and machine.pool is None:
            machine.pool = name
            tx.add(machine)
        events.record(
            tx,
            "pool.prebuilt",
            name,
            snapshot=snap.id,
            commit=snap.commit,
            builder=builder.id,
            replaces=previous,
        )


def _failing_reason(ctl: Controller, tx: Session, pool: Pool) -> str | None:
    """The reason, when the last few machines made since the template changed all failed."""
    limit = ctl.settings.pool_failure_backoff
    recent = list(
        tx.exec(
            select(Machine)
            .where(Machine.pool == pool.name, Machine.created_at >= pool.updated_at)
            .order_by(col(Machine.created_at).desc())
            .limit(limit)
        )
    )
    if len(recent) < limit or any(m.state != MachineState.failed for m in recent):
        return None
    return (
        f"the last {limit} machines of pool {pool.name} failed to provision; "
        f"fix the template (PUT the pool again): {recent[0].reason}"
    )


def _stop(ctl: Controller, name: str, reason: str) -> None:
    with unit_of_work(ctl.db) as tx:
        pool = tx.get(Pool, name)
        if pool is not None and pool.reason != reason:
            pool.reason = reason
            tx.add(pool)
            events.record(tx, "pool.failing", name, reason=reason)


def _shrink(ctl: Controller, name: str, surplus: int) -> None:
    """``max_machines`` went down: destroy ready machines (never leased ones) to match."""
    with unit_of_work(ctl.reader) as tx:
        spare = tx.exec(
            select(Machine.id)
            .where(Machine.pool == name, Machine.state == MachineState.ready)
            .limit(surplus)
        ).all()
    for machine_id in spare:
        ctl.workers.submit(
            machines.destroy_machine,
            db=ctl.db,
            provider=ctl.provider,
            access=ctl.access,
            machine_id=machine_id,
        )


def failing_reason(*, tx: Session, name: str) -> str | None:
    """Why the pool cannot give machines right now, if it cannot (runs fail with this)."""
    pool = tx.get(Pool, name)
    return pool.reason if pool else f"pool {name} was deleted"
