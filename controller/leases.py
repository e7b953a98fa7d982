"""Leases: acquire, renew, release, expire, with a fencing token per machine.

A grant is one database transaction that flips a ``ready`` machine to ``leased`` and bumps
its fence (``Machine.fence``); the new fence is the lease's token. SQLite serializes the
transaction with ``BEGIN IMMEDIATE`` (see ``db.make_engine``); on PostgreSQL the candidate
row is taken with ``SELECT ... FOR UPDATE SKIP LOCKED`` and flipped by an ``UPDATE`` that
re-checks ``state = 'ready'``, so no machine is ever held by two leases. Ending a lease
bumps the fence again, so a late call with the old token is refused (409) even after the
machine is back in the pool.

Requests that may wait queue in arrival order per target (first come, first served); they
wake when a machine comes back, and poll now and then for machines freed elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import anyio.to_thread
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller import events, fleet
from controller.context import Controller
from controller.db import session_scope
from controller.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    ShopfloorError,
    WaitTimeout,
)
from controller.lease_runtime import LeaseRuntime
from controller.models import ApiToken, Lease, LeaseState, Machine, MachineState, Pool, Role, utcnow
from controller.schemas import LeaseSelector

log = logging.getLogger(__name__)

ResetPolicy = Literal["keep", "clean", "recreate"]
POLL_S = 0.25
"""Waiters re-check this often even without a wake-up (machines freed by another process)."""


# ---------------------------------------------------------------- what a request may take


@dataclass(frozen=True)
class Target:
    """Which machines a request accepts: a pool, one machine, or a repo + labels selector."""

    pool: str | None = None
    machine_id: str | None = None
    repo: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return repr(self)

    def matches_labels(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels)


def make_target(
    *,
    session: Session,
    pool: str | None,
    machine_id: str | None,
    selector: LeaseSelector | None,
) -> Target:
    """Check that exactly one way of choosing is given and that what it names exists."""
    given = [name for name, v in (("pool", pool), ("machine_id", machine_id)) if v] + (
        ["selector"] if selector is not None else []
    )
    if len(given) != 1:
        raise InvalidInput(
            "give exactly one of pool, machine_id or selector"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if pool:
        if session.get(Pool, pool) is None:
            known = ", ".join(sorted(session.exec(select(Pool.name)))) or "none yet"
            raise NotFound(f"unknown pool {pool!r}; pools: {known}")
        return Target(pool=pool)
    if machine_id:
        machine = fleet.get_machine(session, machine_id)
        if machine.state not in (
            MachineState.ready,
            MachineState.leased,
            MachineState.provisioning,
        ):
            raise Conflict(
                f"machine {machine_id} is {machine.state.value} and cannot be leased",
                state=machine.state.value,
            )
        return Target(machine_id=machine_id)
    assert selector is not None
    if not selector.repo and not selector.labels:
        raise InvalidInput("a selector needs a repo or labels")
    return Target(repo=selector.repo, labels=tuple(sorted(selector.labels.items())))


# ---------------------------------------------------------------- the atomic grant


def try_grant(
    *,
    db: Engine,
    target: Target,
    holder: str,
    ttl_s: float,
    owner: ApiToken | None,
    requested_at_monotonic: float,
) -> Lease | None:
    """One transaction: take a ready machine that fits, bump its fence, write the lease."""
    with session_scope(db) as session:
        machine = _claim(session, target)
        if machine is None:
            return None
        now = utcnow()
        wait_ms = round((time.monotonic() - requested_at_monotonic) * 1000, 3)
        lease = Lease(
            machine_id=machine.id,
            pool=machine.pool,
            holder=holder,
            owner_token_id=owner.id if owner else None,
            token=machine.fence,
            ttl_s=ttl_s,
            wait_ms=wait_ms,
            requested_at=now - timedelta(milliseconds=wait_ms),
            acquired_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
        session.add(lease)
        events.record(
            session,
            "machine.state",
            machine.id,
            state=MachineState.leased.value,
            previous=MachineState.ready.value,
            reason=None,
        )
        events.record(
            session,
            "lease.granted",
            lease.id,
            machine_id=machine.id,
            holder=holder,
            token=lease.token,
            ttl_s=ttl_s,
            wait_ms=wait_ms,
        )
        return lease


def _claim(session: Session, target: Target) -> Machine | None:
    """Flip the longest-ready fitting machine to leased; only ids and labels are read."""
    query = select(col(Machine.id), col(Machine.labels)).where(Machine.state == MachineState.ready)
    if target.pool:
        query = query.where(Machine.pool == target.pool)
    if target.machine_id:
        query = query.where(Machine.id == target.machine_id)
    if target.repo:
        query = query.where(Machine.repo == target.repo)
    query = query.order_by(col(Machine.updated_at))
    if not target.labels:
        query = query.limit(1)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
    for machine_id, labels in session.execute(query):
        if not target.matches_labels(labels or {}):
            continue
        flipped = session.execute(
            update(Machine)
            .where(col(Machine.id) == machine_id, col(Machine.state) == MachineState.ready)
            .values(state=MachineState.leased, fence=Machine.fence + 1, updated_at=utcnow())
        )
        if flipped.rowcount == 1:  # type: ignore[attr-defined]
            return session.get(Machine, machine_id, populate_existing=True)
    return None


def runtime(ctl: Controller) -> LeaseRuntime:
    return ctl.lease_runtime


@dataclass(frozen=True)
class LeaseRequest:
    target: Target
    holder: str
    ttl_s: float
    wait_s: float
    owner: ApiToken | None = None


def _grant_now(ctl: Controller, request: LeaseRequest, started: float) -> Lease | None:
    return try_grant(
        db=ctl.db,
        target=request.target,
        holder=request.holder,
        ttl_s=request.ttl_s,
        owner=request.owner,
        requested_at_monotonic=started,
    )


def _timeout(request: LeaseRequest) -> WaitTimeout:
    what = (
        f"pool {request.target.pool!r}"
        if request.target.pool
        else f"machine {request.target.machine_id}"
        if request.target.machine_id
        else "the selector"
    )
    return WaitTimeout(
        f"no machine of {what} became free within wait_s={request.wait_s:g}s; "
        "retry, wait longer, or grow the pool"
    )


async def acquire_async(*, ctl: Controller, request: LeaseRequest) -> Lease:
    """Grant at once or wait up to ``wait_s`` without holding a worker thread while waiting."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    wakeup = asyncio.Event()
    rt = runtime(ctl)

    def wake() -> None:
        loop.call_soon_threadsafe(wakeup.set)

    waiter = rt.join(request.target.key, wake)
    try:
        while True:
            wakeup.clear()
            if rt.is_first(waiter):
                lease = await anyio.to_thread.run_sync(_grant_now, ctl, request, started)
                if lease is not None:
                    return lease
                waiter.waiting = True
            remaining = started + request.wait_s - time.monotonic()
            if remaining <= 0:
                raise _timeout(request)
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=min(remaining, POLL_S))
            except TimeoutError:
                pass
    finally:
        rt.leave(waiter)


def acquire_blocking(
    *, ctl: Controller, request: LeaseRequest, give_up: Callable[[], str | None] | None = None
) -> Lease:
    """The same as :func:`acquire_async` for threads (the run driver).

    ``give_up`` is asked while waiting; a non-empty answer ends the wait with that reason.
    """
    started = time.monotonic()
    wakeup = threading.Event()
    rt = runtime(ctl)
    waiter = rt.join(request.target.key, wakeup.set)
    try:
        while True:
            wakeup.clear()
            if rt.is_first(waiter):
                lease = _grant_now(ctl, request, started)
                if lease is not None:
                    return lease
                waiter.waiting = True
            if give_up is not None and (reason := give_up()):
                raise Conflict(reason)
            remaining = started + request.wait_s - time.monotonic()
            if remaining <= 0 or ctl.stopping.is_set():
                raise _timeout(request)
            wakeup.wait(min(remaining, POLL_S * 4))
    finally:
        rt.leave(waiter)


# ---------------------------------------------------------------- renew, release, expire


def get_lease(session: Session, lease_id: str) -> Lease:
    lease = session.get(Lease, lease_id)
    if lease is None:
        raise NotFound(f"no lease {lease_id}")
    return lease


def _check_owner(lease: Lease, caller: ApiToken | None) -> None:
    if caller is None or caller.role == Role.ops or lease.owner_token_id in (None, caller.id):
        return
    raise Forbidden(
        f"lease {lease.id} was taken by another token (holder {lease.holder!r}); "
        "only that token or an ops token may renew or release it"
    )


def _check_active(lease: Lease, action: str) -> None:
    if lease.state != LeaseState.active:
        raise Conflict(
            f"cannot {action} lease {lease.id}: it is already {lease.state.value}",
            state=lease.state.value,
        )
    if lease.expires_at <= utcnow():
        raise Conflict(
            f"cannot {action} lease {lease.id}: it expired at {lease.expires_at.isoformat()}",
            state=LeaseState.expired.value,
        )


def renew(
    *, db: Engine, lease_id: str, caller: ApiToken | None, ttl_s: float | None = None
) -> Lease:
    with session_scope(db) as session:
        lease = get_lease(session, lease_id)
        _check_owner(lease, caller)
        _check_active(lease, "renew")
        if ttl_s is not None:
            lease.ttl_s = ttl_s
        lease.expires_at = utcnow() + timedelta(seconds=lease.ttl_s)
        session.add(lease)
        events.record(session, "lease.renewed", lease.id, expires_at=lease.expires_at.isoformat())
        return lease


def release(*, ctl: Controller, lease_id: str, caller: ApiToken | None) -> Lease:
    with session_scope(ctl.db) as session:
        lease = get_lease(session, lease_id)
        _check_owner(lease, caller)
        if lease.state != LeaseState.active:
            raise Conflict(
                f"lease {lease_id} is already {lease.state.value}", state=lease.state.value
            )
        policy = _end(ctl, session, lease, LeaseState.released)
    _after_end(ctl, lease.machine_id, policy)
    return lease


def _pool_policy(session: Session, pool: str | None) -> ResetPolicy:
    found = session.get(Pool, pool) if pool else None
    if found is None:
        return "keep"
    return found.reset  # type: ignore[return-value]


def _end(ctl: Controller, session: Session, lease: Lease, state: LeaseState) -> ResetPolicy | None:
    """End the lease and fence the machine; say how the machine must come back (or None)."""
    lease.state = state
    lease.ended_at = utcnow()
    session.add(lease)
    events.record(
        session, f"lease.{state.value}", lease.id, machine_id=lease.machine_id, token=lease.token
    )
    machine = session.get(Machine, lease.machine_id)
    if machine is None or machine.state != MachineState.leased or machine.fence != lease.token:
        return None
    machine.fence += 1  # the old token is stale from now on, even once the machine is ready
    policy = _pool_policy(session, machine.pool)
    if policy == "keep":
        fleet.set_state(session, machine, MachineState.ready)
        return policy
    session.add(machine)
    runtime(ctl).returning.add(machine.id)
    return policy


def _after_end(ctl: Controller, machine_id: str, policy: ResetPolicy | None) -> None:
    if policy in ("clean", "recreate") and not ctl.stopping.is_set():
        # When stopping, the next start finds the machine leased by nobody and returns it.
        ctl.workers.submit(return_machine, ctl=ctl, machine_id=machine_id, policy=policy)
    runtime(ctl).notify()


def return_machine(*, ctl: Controller, machine_id: str, policy: ResetPolicy) -> None:
    """Off the request path: clean or recreate a machine whose lease ended, then free it."""
    rt = runtime(ctl)
    rt.returning.add(machine_id)
    try:
        if policy == "recreate":
            fleet.destroy_machine(
                db=ctl.db, provider=ctl.provider, machine_id=machine_id, even_if_leased=True
            )
            return
        if policy == "clean":
            fleet.reset_machine(
                db=ctl.db,
                provider=ctl.provider,
                settings=ctl.settings,
                machine_id=machine_id,
                allowed=(MachineState.leased,),
            )
        _free_if_unleased(ctl.db, machine_id)
    except ShopfloorError as exc:
        log.warning("returning %s after its lease failed: %s", machine_id, exc.message)
        _fail(ctl.db, machine_id, f"{policy} after lease failed: {exc.message}")
    except Exception as exc:  # noqa: BLE001 - a machine must never stay leased by nobody
        log.exception("returning %s after its lease failed", machine_id)
        _fail(ctl.db, machine_id, f"{policy} after lease failed: {type(exc).__name__}: {exc}")
    finally:
        rt.returning.discard(machine_id)
        rt.notify()


def _active_lease(session: Session, machine_id: str) -> Lease | None:
    return session.exec(
        select(Lease).where(Lease.machine_id == machine_id, Lease.state == LeaseState.active)
    ).first()


def _free_if_unleased(db: Engine, machine_id: str) -> None:
    with session_scope(db) as session:
        machine = session.get(Machine, machine_id)
        if (
            machine
            and machine.state == MachineState.leased
            and not _active_lease(session, machine_id)
        ):
            fleet.set_state(session, machine, MachineState.ready)


def _fail(db: Engine, machine_id: str, reason: str) -> None:
    with session_scope(db) as session:
        machine = session.get(Machine, machine_id)
        if (
            machine
            and machine.state == MachineState.leased
            and not _active_lease(session, machine_id)
        ):
            fleet.set_state(session, machine, MachineState.failed, reason)


def reap(*, ctl: Controller) -> list[str]:
    """Expire leases past their time and bring back leased machines nobody holds."""
    expired: list[str] = []
    with session_scope(ctl.db) as session:
        due = session.exec(
            select(Lease.id).where(Lease.state == LeaseState.active, Lease.expires_at <= utcnow())
        ).all()
    for lease_id in due:
        with session_scope(ctl.db) as session:
            lease = get_lease(session, lease_id)
            if lease.state != LeaseState.active or lease.expires_at > utcnow():
                continue  # renewed or released meanwhile
            policy = _end(ctl, session, lease, LeaseState.expired)
        expired.append(lease_id)
        _after_end(ctl, lease.machine_id, policy)
    _return_orphans(ctl)
    return expired


def _return_orphans(ctl: Controller) -> None:
    """Leased machines without an active lease (a crash mid-reset) go back per pool policy."""
    rt = runtime(ctl)
    with session_scope(ctl.db) as session:
        leased = session.exec(select(Machine).where(Machine.state == MachineState.leased)).all()
        orphans = [
            (m.id, _pool_policy(session, m.pool))
            for m in leased
            if m.id not in rt.returning and _active_lease(session, m.id) is None
        ]
    for machine_id, policy in orphans:
        if ctl.stopping.is_set():
            return
        rt.returning.add(machine_id)
        ctl.workers.submit(return_machine, ctl=ctl, machine_id=machine_id, policy=policy)


def list_leases(*, session: Session, state: str | None = None, limit: int = 200) -> list[Lease]:
    query = select(Lease).order_by(col(Lease.acquired_at).desc()).limit(limit)
    if state:
        query = query.where(Lease.state == state)
    return list(session.exec(query))
