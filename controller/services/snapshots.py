"""Pause, snapshots and fork: a machine frozen, its disk state saved, machines started from it.

A snapshot is the machine's container filesystem committed to an image (toolchain,
installed packages) and a frozen copy of its workspace volume (``Provider.snapshot_volume``:
copy-on-write where the disks share blocks, a whole copy otherwise), taken while the
machine is paused by the engine for just that long. It holds no memory: the engine here
cannot checkpoint (the reason is on every snapshot, ``memory_reason``).

Each call records its intent first (a snapshot ``taking``, forks ``provisioning``) and
makes engine resources after, so a controller that dies half-way leaves records that the
next start cleans (:func:`clean_interrupted`, ``reconcile.fail_interrupted``) and labelled
leftovers that reconcile removes (:func:`remove_orphans`). The run driver and the pool
filler call :func:`take` and :func:`start_machines` with ``key=None`` (the controller's own
code) or the fence they hold.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.domain import LeaseGranted
from controller.errors import (
    Conflict,
    EngineError,
    Forbidden,
    InvalidInput,
    LimitReached,
    NotFound,
    ShopfloorError,
)
from controller.providers.base import Provider
from controller.services import auth, limits, machines
from controller.services.access import EXEC_READY, Key, check_machine
from controller.services.runtime import Controller
from controller.store import events
from controller.store import leases as lease_rows
from controller.store.db import unit_of_work
from controller.store.models import (
    ALIVE_STATES,
    ApiToken,
    Lease,
    LeaseState,
    Machine,
    MachineState,
    Pool,
    Role,
    Snapshot,
    SnapshotState,
    utcnow,
)
from controller.store.rawsql import transaction

log = logging.getLogger(__name__)

IMAGE_REPOSITORY = "shopfloor/snapshot"
VOLUME_PREFIX = "shopfloor-snap-"
SNAPSHOTTABLE = (*EXEC_READY, MachineState.paused, MachineState.stopped)
"""States a machine can be snapshotted in (a stopped one: its disks are still)."""


def image_ref(snapshot_id: str) -> str:
    return f"{IMAGE_REPOSITORY}:{snapshot_id}"


def volume_snapshot_name(snapshot_id: str) -> str:
    return f"{VOLUME_PREFIX}{snapshot_id}"


def snapshot_labels(ctl: Controller, snapshot_id: str) -> dict[str, str]:
    return {
        **ctl.settings.extra_label_map,
        machines.LABEL_CONTROLLER: ctl.install_id,
        machines.LABEL_SNAPSHOT: snapshot_id,
    }


def _authorize(tx: Session, machine: Machine, key: Key | None, action: str) -> None:
    """Ops, the controller's own code, or the holder of the machine's lease with its token;
    a paused machine is judged as what it was before."""
    if machine.state == MachineState.destroyed:
        raise Conflict(
            f"machine {machine.id} is destroyed: there is nothing to {action}", state="destroyed"
        )
    if key is None:
        return
    as_state = None
    if machine.state == MachineState.paused and machine.paused_from:
        as_state = MachineState(machine.paused_from)
    elif machine.state == MachineState.stopped:
        as_state = MachineState.ready  # what matters: no lease, ops only
    check_machine(tx, machine, key, as_state=as_state)


def _agent(key: Key | None) -> str | None:
    """The agent's API token id behind ``key`` (None: ops or the controller's own code):
    what an agent snapshots or forks is its own, counted against its share."""
    if key is None or key.caller is None or key.caller.role == Role.ops:
        return None
    return key.caller.id


def _visible(snap: Snapshot | None, viewer: ApiToken | None) -> bool:
    """Ops (and the controller) see every snapshot; an agent only its own."""
    if snap is None:
        return False
    return viewer is None or viewer.role == Role.ops or snap.owner_token_id == viewer.id


# ---------------------------------------------------------------- pause / resume


def pause(*, ctl: Controller, machine_id: str, key: Key | None) -> Machine:
    """Freeze every process of the machine with its memory; commands answer 409 until
    :func:`resume`. A paused machine stays counted by its pool and keeps its lease."""
    with unit_of_work(ctl.db) as tx:
        machine = machines.get_machine(tx, machine_id)
        if machine.state == MachineState.paused:
            return machine
        if machine.state not in EXEC_READY:
            raise Conflict(
                f"cannot pause machine {machine_id} while it is {machine.state.value}",
                state=machine.state.value,
            )
        _authorize(tx, machine, key, "pause")
        machine.paused_from = machine.state.value
        machines.set_state(tx, machine, MachineState.paused)
    with _still(machine.id):  # after a snapshot in flight has thawed it
        with unit_of_work(ctl.reader) as tx:
            current = machines.get_machine(tx, machine_id)
        if current.state != MachineState.paused:  # a resume came first: it stays thawed
            return current
        try:
            ctl.provider.pause_container(machine.container_name)
        except EngineError:
            with unit_of_work(ctl.db) as tx:
                current = machines.get_machine(tx, machine_id)
                if current.state == MachineState.paused:
                    _unpaused(tx, current, "the engine could not pause it")
            raise
    return machine


def resume(*, ctl: Controller, machine_id: str, key: Key | None) -> Machine:
    """Thaw a paused machine: its processes, shell sessions and forwards carry on."""
    with unit_of_work(ctl.reader) as tx:
        machine = machines.get_machine(tx, machine_id)
        if machine.state != MachineState.paused:
            raise Conflict(
                f"machine {machine_id} is not paused (it is {machine.state.value})",
                state=machine.state.value,
            )
        _authorize(tx, machine, key, "resume")
    with _still(machine.id):  # thaw and record as one: a pause waits for both
        _thaw(ctl.provider, machine.container_name)
        with unit_of_work(ctl.db) as tx:
            current = machines.get_machine(tx, machine_id)
            if current.state == MachineState.paused:
                _unpaused(tx, current)
            return current


def _thaw(provider: Provider, container: str) -> None:
    try:
        provider.unpause_container(container)
    except EngineError:
        info = provider.inspect_container(container)
        if info is None:
            raise
        if info.status in ("exited", "created"):  # the engine restarted: memory is gone
            provider.start_container(container)
        elif info.status != "running":
            raise


def _unpaused(tx: Session, machine: Machine, reason: str | None = None) -> None:
    back = MachineState(machine.paused_from or MachineState.ready.value)
    machine.paused_from = None
    machines.set_state(tx, machine, back, reason)


def resume_abandoned(*, ctl: Controller) -> list[str]:
    """A machine paused under a lease that has since ended (its holder vanished) is
    resumed, so that the lease reaper hands it over like any machine leased by nobody."""
    with unit_of_work(ctl.reader) as tx:
        paused = tx.exec(
            select(Machine.id).where(
                Machine.state == MachineState.paused, Machine.paused_from == "leased"
            )
        ).all()
        active = set(
            tx.exec(
                select(Lease.machine_id).where(
                    col(Lease.machine_id).in_(paused), Lease.state == LeaseState.active
                )
            ).all()
        )
    resumed = []
    for machine_id in paused:
        if machine_id in active:
            continue
        try:
            resume(ctl=ctl, machine_id=machine_id, key=None)
            resumed.append(machine_id)
        except ShopfloorError as exc:
            log.warning("could not resume abandoned %s: %s", machine_id, exc.message)
    return resumed


def drop_ungranted_forks(*, ctl: Controller) -> list[str]:
    """An agent's fork that is ready but was never leased to it (its controller died in
    between) can never be leased by anyone: destroyed once older than ``orphan_grace_s``."""
    settled = utcnow() - timedelta(seconds=ctl.settings.orphan_grace_s)
    with unit_of_work(ctl.reader) as tx:
        stuck = tx.exec(
            select(Machine.id).where(
                col(Machine.reserved_for).is_not(None),
                Machine.state == MachineState.ready,
                col(Machine.updated_at) <= settled,
            )
        ).all()
    dropped = []
    for machine_id in stuck:
        try:
            machines.destroy_machine(
                db=ctl.db, provider=ctl.provider, access=ctl.access, machine_id=machine_id
            )
            dropped.append(machine_id)
        except ShopfloorError as exc:
            log.warning("could not remove the ungranted fork %s: %s", machine_id, exc.message)
    return dropped


# ---------------------------------------------------------------- snapshots


def take(
    *,
    ctl: Controller,
    machine_id: str,
    key: Key | None,
    name: str = "",
    labels: dict[str, str] | None = None,
    pinned: bool = False,
) -> Snapshot:
    """Save the machine's disk state: the machine is paused by the engine only while its
    filesystem is committed and its workspace copied (unless it was paused already).
    Any failure removes what was made and raises with the reason; the source carries on."""
    started = time.monotonic()
    with unit_of_work(ctl.db) as tx:
        machine = machines.get_machine(tx, machine_id)
        _authorize(tx, machine, key, "snapshot")
        if machine.state not in SNAPSHOTTABLE:
            raise Conflict(
                f"cannot snapshot machine {machine_id} while it is {machine.state.value}",
                state=machine.state.value,
            )
        owner = _agent(key)
        if owner is not None:
            _lock_share(tx, owner)
            _check_share(ctl, tx, owner, pinned)
        snap = Snapshot(
            name=name,
            labels=dict(labels or {}),
            pinned=pinned,
            machine_id=machine.id,
            host=machine.host,
            base_image=machine.image,
            repo=machine.repo,
            repo_name=machine.repo_name,
            ref=machine.ref,
            commit=machine.commit,
            branch=machine.branch,
            cpus=machine.cpus,
            memory_mb=machine.memory_mb,
            network=machine.network,
            setup=list(machine.setup),
            owner_token_id=owner,
        )
        snap.image = image_ref(snap.id)
        snap.volume_snapshot = volume_snapshot_name(snap.id)
        tx.add(snap)
    try:
        size, paused_ms = _save(ctl, machine, snap)
        memory_reason = _engine(ctl, snap).checkpoint_unsupported()
    except Exception:
        _discard(ctl, snap)
        raise
    with unit_of_work(ctl.db) as tx:
        current = tx.get(Snapshot, snap.id)
        if current is not None:
            current.state = SnapshotState.ready
            current.size_bytes = size
            current.has_memory = False
            current.memory_reason = memory_reason
            current.shared_blocks = _engine(ctl, snap).snapshots_share_blocks()
            current.paused_ms = round(paused_ms, 1)
            current.took_ms = round((time.monotonic() - started) * 1000, 1)
            tx.add(current)
            events.record(
                tx,
                "snapshot.taken",
                current.id,
                machine_id=machine_id,
                size_bytes=size,
                took_ms=current.took_ms,
                paused_ms=current.paused_ms,
            )
    if current is None:  # cleaned meanwhile (another controller's reconcile): ours to remove
        _remove_parts(_engine(ctl, snap), snap.id)
        raise NotFound(f"snapshot {snap.id} was deleted while it was taken")
    return current


def _lock_share(tx: Session, owner: str) -> None:
    """Count an agent's share one request at a time, within the write that adds to it: its
    token's row locked (PostgreSQL; SQLite's writers are one at a time already)."""
    tx.exec(select(ApiToken.id).where(ApiToken.id == owner).with_for_update()).first()


def _check_share(ctl: Controller, tx: Session, owner: str, pinned: bool) -> None:
    """An agent's snapshots: never pinned (retention must be able to free them), at most
    ``snapshots_per_token`` of them holding less than ``snapshot_bytes_per_token`` (429)."""
    if pinned:
        raise Forbidden("only ops may pin a snapshot (pinned ones escape retention)")
    sizes = tx.exec(select(Snapshot.size_bytes).where(Snapshot.owner_token_id == owner)).all()
    held, size = len(sizes), sum(sizes)
    cap, cap_bytes = ctl.settings.snapshots_per_token, ctl.settings.snapshot_bytes_per_token
    if held >= cap or size >= cap_bytes:
        what, limit = (
            (f"{held} snapshots", limits.SNAPSHOTS)
            if held >= cap
            else (f"{size} bytes of snapshots", limits.SNAPSHOT_BYTES)
        )
        raise ctl.limits.refuse(
            LimitReached(
                f"this API token holds {what}, its limit (SHOPFLOOR_{limit.upper()}): "
                "delete some (DELETE /api/v1/snapshots/<id>)",
                limit=limit,
            )
        )


_STILL: dict[str, threading.Lock] = {}
_STILL_GUARD = threading.Lock()


def _still(machine_id: str) -> threading.Lock:
    """The lock of a machine's engine pauses in this controller: a snapshot, a pause or a
    resume at a time, so that none finds the machine paused by another that thaws it. A
    pause freezes the engine only if its record is still paused under it, and a resume
    thaws and records under it: the engine ends as the record says."""
    with _STILL_GUARD:
        return _STILL.setdefault(machine_id, threading.Lock())


def _save(ctl: Controller, machine: Machine, snap: Snapshot) -> tuple[int, float]:
    """Commit and copy with the machine still; answer (bytes held, ms paused)."""
    with _still(machine.id):
        return _save_still(ctl, machine, snap)


def _save_still(ctl: Controller, machine: Machine, snap: Snapshot) -> tuple[int, float]:
    provider = _engine(ctl, snap)
    container = machine.container_name
    info = provider.inspect_container(container)
    if info is None:
        raise Conflict(f"machine {machine.id} has no container: it was lost", state="lost")
    labels = snapshot_labels(ctl, snap.id)
    paused_here = info.status == "running"
    if paused_here:
        provider.flush_volume(machine.volume_name)  # the bulk of the writing, still running
    paused_at = time.monotonic()
    if paused_here:
        provider.pause_container(container)
    try:
        provider.commit_container(container, snap.image, labels)
        workspace = provider.snapshot_volume(
            machine.volume_name, snap.volume_snapshot, labels, helper_image=snap.image
        )
    finally:
        paused_ms = (time.monotonic() - paused_at) * 1000 if paused_here else 0.0
        if paused_here:
            try:
                _thaw(provider, container)
            except EngineError as exc:  # reconcile thaws it on its next pass
                log.warning("could not resume %s after its snapshot: %s", machine.id, exc.message)
    image = provider.image_info(snap.image)
    base = provider.image_info(machine.image)
    layer = max(0, (image.size_bytes if image else 0) - (base.size_bytes if base else 0))
    return workspace + layer, paused_ms


def _discard(ctl: Controller, snap: Snapshot) -> None:
    """Remove a snapshot's image, workspace copy and record (a failed or deleted one)."""
    _remove_parts(_engine(ctl, snap), snap.id)
    with unit_of_work(ctl.db) as tx:
        current = tx.get(Snapshot, snap.id)
        if current is not None:
            tx.delete(current)


def _engine(ctl: Controller, snap: Snapshot) -> Provider:
    """The engine of the snapshot's host: its image, its workspace copy, its machines."""
    return ctl.provider.on_host(snap.host)


def _remove_parts(provider: Provider, snapshot_id: str) -> None:
    for remove, what in (
        (provider.remove_image, image_ref(snapshot_id)),
        (provider.remove_volume_snapshot, volume_snapshot_name(snapshot_id)),
    ):
        try:
            remove(what)
        except EngineError as exc:  # reconcile removes the leftover later
            log.warning("could not remove %s: %s", what, exc.message)


def _used_by(tx: Session, snapshot_id: str) -> tuple[list[str], list[str]]:
    """(live machines started from it, pools whose template names it)."""
    users = list(
        tx.exec(
            select(Machine.id).where(
                Machine.snapshot_id == snapshot_id, col(Machine.state).in_(ALIVE_STATES)
            )
        )
    )
    pools = [
        p.name
        for p in tx.exec(select(Pool))
        if snapshot_id in (p.template.get("snapshot"), p.prebuilt)  # prebuilt: its current one
    ]
    return users, pools


@dataclass(frozen=True)
class SnapshotView:
    snapshot: Snapshot
    used_by: list[str]


def list_snapshots(*, ctl: Controller, viewer: ApiToken | None = None) -> list[SnapshotView]:
    """Every snapshot for ops; an agent's own for an agent."""
    query = select(Snapshot).order_by(col(Snapshot.created_at).desc())
    if viewer is not None and viewer.role != Role.ops:
        query = query.where(Snapshot.owner_token_id == viewer.id)
    with unit_of_work(ctl.reader) as tx:
        found = list(tx.exec(query))
        users: dict[str, list[str]] = {}
        for machine_id, snapshot_id in tx.exec(
            select(Machine.id, Machine.snapshot_id).where(
                col(Machine.snapshot_id).is_not(None), col(Machine.state).in_(ALIVE_STATES)
            )
        ):
            users.setdefault(str(snapshot_id), []).append(machine_id)
    return [SnapshotView(s, users.get(s.id, [])) for s in found]


def show_snapshot(
    *, ctl: Controller, snapshot_id: str, viewer: ApiToken | None = None
) -> SnapshotView:
    with unit_of_work(ctl.reader) as tx:
        snap = tx.get(Snapshot, snapshot_id)
        if snap is None or not _visible(snap, viewer):  # another agent's: not even its name
            raise NotFound(f"no snapshot {snapshot_id}")
        users, _ = _used_by(tx, snapshot_id)
    return SnapshotView(snap, users)


def delete_snapshot(
    *, ctl: Controller, snapshot_id: str, viewer: ApiToken | None = None
) -> Snapshot:
    """409 while a live machine started from it or a pool's template names it. An agent
    deletes only its own (another's is 404)."""
    with unit_of_work(ctl.db) as tx:
        snap = tx.get(Snapshot, snapshot_id)
        if snap is None or not _visible(snap, viewer):
            raise NotFound(f"no snapshot {snapshot_id}")
        if snap.state != SnapshotState.ready:
            raise Conflict(f"snapshot {snapshot_id} is still being taken", state=snap.state.value)
        users, pools = _used_by(tx, snapshot_id)
        if users or pools:
            who = [f"machines {', '.join(users)}"] if users else []
            who += [f"pools {', '.join(pools)}"] if pools else []
            raise Conflict(
                f"snapshot {snapshot_id} is used by {' and '.join(who)}: destroy them or "
                "change the pools' templates first",
                machines=users,
                pools=pools,
            )
        tx.delete(snap)
        events.record(tx, "snapshot.deleted", snapshot_id, machine_id=snap.machine_id)
    _remove_parts(_engine(ctl, snap), snapshot_id)
    return snap


# ---------------------------------------------------------------- machines from a snapshot


def start_machines(
    *,
    ctl: Controller,
    snapshot_id: str,
    count: int,
    labels: dict[str, str] | None = None,
    forked_from: str | None = None,
    pool: str | None = None,
    reserved_for: str | None = None,
) -> list[Machine]:
    """``count`` machines started from the snapshot at once, each its own volume (a
    copy-on-write copy where the disks allow), container, fence and labels. All or none:
    when one fails, those made are destroyed and the first failure is raised."""
    with unit_of_work(ctl.db) as tx:
        snap = tx.get(Snapshot, snapshot_id)
        if snap is None:
            raise NotFound(f"no snapshot {snapshot_id}")
        if reserved_for is not None:  # counted again where they are made: racing forks
            _lock_share(tx, reserved_for)
            _check_forks(ctl, tx, reserved_for, count)
        spec = machines.MachineSpec(
            image=snap.image,
            cpus=snap.cpus,
            memory_mb=snap.memory_mb,
            network=snap.network,
            labels=dict(labels or {}),
            pool=pool,
            snapshot=snap,
            forked_from=forked_from,
            reserved_for=reserved_for,
        )
        made = [machines.create_machine(tx=tx, spec=spec, host=snap.host) for _ in range(count)]
    ids = [m.id for m in made]

    def one(machine_id: str) -> Machine:
        return machines.provision(
            db=ctl.db,
            provider=ctl.provider,
            settings=ctl.settings,
            install_id=ctl.install_id,
            machine_id=machine_id,
            reraise=True,
            stopping=ctl.stopping,
        )

    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="fork") as threads:
        futures = [threads.submit(one, machine_id) for machine_id in ids]
        failures = [f.exception() for f in futures]
    first = next((exc for exc in failures if exc is not None), None)
    if first is not None:
        for machine_id in ids:
            try:
                machines.destroy_machine(
                    db=ctl.db, provider=ctl.provider, access=ctl.access, machine_id=machine_id
                )
            except ShopfloorError as exc:
                log.warning("could not remove fork %s: %s", machine_id, exc.message)
        raise first
    return [f.result() for f in futures]


@dataclass(frozen=True)
class Fork:
    snapshot: Snapshot
    machines: list[Machine]
    leases: list[LeaseGranted] = field(default_factory=list)
    """An agent's forks: each leased to it at once (nobody else is ever granted them)."""


def fork(
    *,
    ctl: Controller,
    machine_id: str,
    key: Key | None,
    count: int,
    labels: dict[str, str] | None = None,
) -> Fork:
    """Snapshot the machine and start ``count`` copies of it. Under a lease the lease's
    token is needed (409 without); ops may fork a machine leased by another without it, and
    that is recorded (``machine.forked`` with ``under_lease``). An agent's forks are its
    own: each is leased to it at once for the source lease's TTL, no other grant ever takes
    it, and it is destroyed when that lease ends; at most ``forks_per_token`` live (429)."""
    if not 1 <= count <= ctl.settings.fork_max:
        raise InvalidInput(
            f"count must be 1 to {ctl.settings.fork_max} (SHOPFLOOR_FORK_MAX), not {count}"
        )
    under_lease: str | None = None
    owner = _agent(key)
    with unit_of_work(ctl.reader) as tx:
        machine = machines.get_machine(tx, machine_id)
        _authorize(tx, machine, key, "fork")
        if owner is not None:
            _check_forks(ctl, tx, owner, count)
        lease = tx.exec(
            select(Lease).where(Lease.machine_id == machine_id, Lease.state == LeaseState.active)
        ).first()
        if (
            lease is not None
            and key is not None
            and key.caller is not None
            and key.caller.role == Role.ops
            and key.secret is None
        ):
            under_lease = lease.id
        source_labels = dict(machine.labels)
        ttl_s = lease.ttl_s if lease is not None else 600.0
    snap = take(
        ctl=ctl,
        machine_id=machine_id,
        key=key,
        name=f"fork of {machine_id}",
        labels={"fork-of": machine_id},
    )
    try:
        made = start_machines(
            ctl=ctl,
            snapshot_id=snap.id,
            count=count,
            labels={**source_labels, **(labels or {})},
            forked_from=machine_id,
            reserved_for=owner,
        )
        granted: list[LeaseGranted] = []
        if owner is not None:
            granted = _lease_forks(ctl, made, owner, ttl_s, f"fork of {machine_id}")
    except Exception:
        _discard(ctl, snap)
        raise
    if owner is not None:
        with unit_of_work(ctl.reader) as tx:
            made = [machines.get_machine(tx, m.id) for m in made]
    with unit_of_work(ctl.db) as tx:
        events.record(
            tx,
            "machine.forked",
            machine_id,
            snapshot=snap.id,
            forks=[m.id for m in made],
            under_lease=under_lease,
            by=key.caller.id if key is not None and key.caller is not None else None,
        )
    return Fork(snap, made, granted)


def _check_forks(ctl: Controller, tx: Session, owner: str, count: int) -> None:
    live = len(
        tx.exec(
            select(Machine.id).where(
                Machine.reserved_for == owner, col(Machine.state).in_(ALIVE_STATES)
            )
        ).all()
    )
    cap = ctl.settings.forks_per_token
    if live + count > cap:
        raise ctl.limits.refuse(
            LimitReached(
                f"this API token holds {live} live forks and asked for {count} more, past "
                f"its limit of {cap} (SHOPFLOOR_FORKS_PER_TOKEN): release some forks' leases",
                limit=limits.FORKS,
            )
        )


def _lease_forks(
    ctl: Controller, made: list[Machine], owner: str, ttl_s: float, holder: str
) -> list[LeaseGranted]:
    """Lease each of an agent's new forks to it, in one transaction; when one cannot be
    (destroyed meanwhile), all of them are destroyed and the fork fails."""
    granted: list[LeaseGranted] = []
    try:
        with transaction(ctl.db) as tx:
            for machine in made:
                secret = secrets.token_urlsafe(32)
                row = lease_rows.grant_reserved(
                    tx,
                    machine_id=machine.id,
                    owner_token_id=owner,
                    holder=holder,
                    ttl_s=ttl_s,
                    token_hash=auth.hash_token(secret),
                )
                if row is None:  # rolls every grant back
                    raise Conflict(f"fork {machine.id} was gone before it could be leased")
                granted.append(LeaseGranted.model_validate({**row, "token": secret}))
        return granted
    except Conflict:
        pass
    for machine in made:
        try:
            machines.destroy_machine(
                db=ctl.db,
                provider=ctl.provider,
                access=ctl.access,
                machine_id=machine.id,
                even_if_leased=True,
            )
        except ShopfloorError as exc:
            log.warning("could not remove fork %s: %s", machine.id, exc.message)
    raise Conflict(
        f"a fork of {made[0].forked_from} was gone before it could be leased: fork again"
    )


# ---------------------------------------------------------------- retention and leftovers


def retention_tick(*, ctl: Controller, now: datetime | None = None) -> list[str]:
    """Delete unpinned snapshots no machine or pool uses: past the age limit, then the
    oldest while all of them together hold more than the size limit."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=ctl.settings.snapshot_max_age_s)
    with unit_of_work(ctl.reader) as tx:
        ready = list(
            tx.exec(
                select(Snapshot)
                .where(Snapshot.state == SnapshotState.ready)
                .order_by(col(Snapshot.created_at))
            )
        )
        free = [s for s in ready if not s.pinned and _used_by(tx, s.id) == ([], [])]
    total = sum(s.size_bytes for s in ready)
    doomed: list[Snapshot] = []
    for snap in free:
        if snap.created_at < cutoff or total > ctl.settings.snapshot_max_bytes:
            doomed.append(snap)
            total -= snap.size_bytes
    deleted = []
    for snap in doomed:
        try:
            delete_snapshot(ctl=ctl, snapshot_id=snap.id)
            deleted.append(snap.id)
        except (Conflict, NotFound):
            continue  # used or deleted meanwhile
    return deleted


def clean_interrupted(
    *, db: Engine, provider: Provider, older_than_s: float | None = None
) -> list[str]:
    """Snapshots a dead controller left ``taking``: their parts removed, their records gone
    (all at start-up on SQLite; those older than ``older_than_s`` with several controllers)."""
    query = select(Snapshot).where(Snapshot.state == SnapshotState.taking)
    if older_than_s is not None:
        query = query.where(col(Snapshot.created_at) < utcnow() - timedelta(seconds=older_than_s))
    with unit_of_work(db) as tx:
        stuck = list(tx.exec(query))
        for snap in stuck:
            tx.delete(snap)
    for snap in stuck:
        try:
            _remove_parts(provider.on_host(snap.host), snap.id)
        except EngineError as exc:  # its host is gone: remove_orphans finds them later
            log.warning("snapshot %s's parts not removed: %s", snap.id, exc.message)
    return [s.id for s in stuck]


def remove_orphans(
    *, db: Engine, provider: Provider, install_id: str, grace_s: float, now: datetime
) -> list[str]:
    """Images, workspace copies and copy helpers of snapshots that have no record (a
    controller killed between making them and recording, or deleting them), older than the
    grace, host by host (one that does not answer is skipped). Answers what was removed."""
    with unit_of_work(db) as tx:
        known = set(tx.exec(select(Snapshot.id)).all())
    removed: list[str] = []
    for host in provider.hosts():
        try:
            engine = provider.on_host(host)
            removed += _remove_orphans_on(
                engine, known, install_id, now - timedelta(seconds=grace_s)
            )
        except EngineError as exc:
            log.info("snapshot leftovers on host %s not looked for: %s", host, exc.message)
    return removed


def _remove_orphans_on(
    provider: Provider, known: set[str], install_id: str, old: datetime
) -> list[str]:
    owned = {machines.LABEL_CONTROLLER: install_id, machines.LABEL_SNAPSHOT: ""}
    images = provider.list_images(owned)
    copies = provider.list_volume_snapshots({machines.LABEL_CONTROLLER: install_id})
    helpers = [
        c for c in provider.list_containers(owned) if not c.labels.get(machines.LABEL_MACHINE)
    ]
    removed: list[str] = []
    for image in images:
        snapshot_id = image.labels.get(machines.LABEL_SNAPSHOT, "")
        young = image.created_at is not None and image.created_at >= old
        if snapshot_id and snapshot_id not in known and not young:
            for tag in image.tags or [image.id]:
                _try(provider.remove_image, tag, removed)
    for helper in helpers:
        if helper.labels.get(machines.LABEL_SNAPSHOT) not in known and helper.created_at < old:
            _try(provider.remove_container, helper.id, removed)
    for copy in copies:
        snapshot_id = copy.name.removeprefix(VOLUME_PREFIX)
        young = copy.created_at is not None and copy.created_at >= old
        if copy.name.startswith(VOLUME_PREFIX) and snapshot_id not in known and not young:
            _try(provider.remove_volume_snapshot, copy.name, removed)
    return removed


def _try(remove: object, name: str, into: list[str]) -> None:
    try:
        remove(name)  # type: ignore[operator]
        into.append(name)
    except EngineError as exc:
        log.warning("could not remove snapshot leftover %s: %s", name, exc.message)
