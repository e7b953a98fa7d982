"""Leases: acquire, renew, release, expire, with a secret per lease and a fence per machine.

A grant is one database transaction that flips a ``ready`` machine to ``leased`` and bumps
its fence (``Machine.fence``); the lease records that fence and the SHA-256 of a new random
secret, which only the grant's answer shows (``LeaseGranted.token``). SQLite serializes the
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
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.domain import LeaseGranted, LeasePublic, LeaseSelector, ResetPolicy
from controller.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    ProcessesSurvive,
    ShopfloorError,
    WaitTimeout,
)
from controller.services import auth, machines, snapshots
from controller.services.lease_runtime import LeaseRuntime
from controller.services.runtime import Controller
from controller.store import leases as rows
from controller.store.db import run_read, unit_of_work
from controller.store.events import Change
from controller.store.models import (
    ApiToken,
    Lease,
    LeaseState,
    MachineState,
    Role,
    utcnow,
)
from controller.store.rawsql import Row, Tx, Work, transaction

log = logging.getLogger(__name__)

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
    *, pool: str | None, machine_id: str | None, selector: LeaseSelector | None
) -> Target:
    """Check that exactly one way of choosing is given (what it names: :func:`check_target`)."""
    given = [name for name, v in (("pool", pool), ("machine_id", machine_id)) if v] + (
        ["selector"] if selector is not None else []
    )
    if len(given) != 1:
        raise InvalidInput(
            "give exactly one of pool, machine_id or selector"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if pool:
        return Target(pool=pool)
    if machine_id:
        return Target(machine_id=machine_id)
    assert selector is not None
    if not selector.repo and not selector.labels:
        raise InvalidInput("a selector needs a repo or labels")
    return Target(repo=selector.repo, labels=tuple(sorted(selector.labels.items())))


def check_target(tx: Tx, target: Target, owner: ApiToken | None = None) -> None:
    """Raise when what the target names does not exist or can never be leased.

    Asked only when a grant found no machine, so the hot path skips this read.
    """
    if target.pool:
        if rows.pool_exists(tx, target.pool):
            return
        known = ", ".join(rows.pool_names(tx)) or "none yet"
        raise NotFound(f"unknown pool {target.pool!r}; pools: {known}")
    if target.machine_id:
        machine = rows.machine_state(tx, target.machine_id)
        if machine is None:
            raise NotFound(f"no machine {target.machine_id}")
        if machine["reserved_for"] is not None:
            mine = owner is not None and machine["reserved_for"] == owner.id
            raise Forbidden(
                f"machine {target.machine_id} is an agent's fork: it is leased only to that "
                "agent, at the fork, and destroyed when that lease ends"
                + (" (it ended: fork again)" if mine else "")
            )
        if machine["state"] not in LEASABLE:
            raise Conflict(
                f"machine {target.machine_id} is {machine['state']} and cannot be leased",
                state=machine["state"],
            )


LEASABLE = (MachineState.ready, MachineState.leased, MachineState.provisioning)
"""States a lease may wait for; ``quarantined`` is not one (ops unquarantine it first)."""


# ---------------------------------------------------------------- the atomic grant


def new_secret() -> tuple[str, str]:
    """A lease's secret (unguessable: 256 random bits) and the SHA-256 stored in its place."""
    secret = secrets.token_urlsafe(32)
    return secret, auth.hash_token(secret)


def grant_in(
    tx: Tx,
    *,
    target: Target,
    holder: str,
    ttl_s: float,
    owner: ApiToken | None,
    requested_at_monotonic: float,
    first_try: bool = False,
) -> LeaseGranted | None:
    """Take a ready machine that fits, bump its fence, write the lease, all within ``tx``
    (one transaction, or one savepoint of a group commit); None when nothing fits."""
    given = {"pool": target.pool, "id": target.machine_id, "repo": target.repo}
    secret, token_hash = new_secret()
    lease = rows.grant(
        tx,
        filters={column: value for column, value in given.items() if value is not None},
        labels_fit=target.matches_labels if target.labels else None,
        holder=holder,
        ttl_s=ttl_s,
        owner_token_id=owner.id if owner else None,
        token_hash=token_hash,
        wait_ms=round((time.monotonic() - requested_at_monotonic) * 1000, 3),
    )
    if lease is None:
        if first_try:
            check_target(tx, target, owner)
        return None
    return LeaseGranted.model_validate({**lease, "token": secret})


def runtime(ctl: Controller) -> LeaseRuntime:
    return ctl.lease_runtime


@dataclass(frozen=True)
class LeaseRequest:
    target: Target
    holder: str
    ttl_s: float
    wait_s: float
    owner: ApiToken | None = None


def _grant(request: LeaseRequest, started: float, check: bool) -> Work[LeaseGranted | None]:
    """The request's grant, as work for a transaction (see :func:`grant_in`)."""
    return functools.partial(
        grant_in,
        target=request.target,
        holder=request.holder,
        ttl_s=request.ttl_s,
        owner=request.owner,
        requested_at_monotonic=started,
        first_try=check,
    )


async def _grant_async(
    ctl: Controller, request: LeaseRequest, started: float, *, first_try: bool
) -> LeaseGranted | None:
    """:func:`grant_in` from the event loop, through the lease lane (``store.leases``)."""
    target = request.target
    given = {"pool": target.pool, "id": target.machine_id, "repo": target.repo}
    secret, token_hash = new_secret()
    lease = await ctl.lease_lane.grant(
        filters={column: value for column, value in given.items() if value is not None},
        labels_fit=target.matches_labels if target.labels else None,
        holder=request.holder,
        ttl_s=request.ttl_s,
        owner_token_id=request.owner.id if request.owner else None,
        token_hash=token_hash,
        wait_ms=round((time.monotonic() - started) * 1000, 3),
    )
    if lease is None:
        if first_try:
            await run_read(ctl.reader, _check_target_now, ctl.reader, target)
        return None
    return LeaseGranted.model_validate({**lease, "token": secret})


def _check_target_now(db: Engine, target: Target) -> None:
    with transaction(db, write=False) as tx:
        check_target(tx, target)


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


async def acquire_async(*, ctl: Controller, request: LeaseRequest) -> LeaseGranted:
    """Grant at once or wait up to ``wait_s`` without holding a worker thread while waiting."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    wakeup = asyncio.Event()
    rt = runtime(ctl)

    def wake() -> None:
        loop.call_soon_threadsafe(wakeup.set)

    waiter = rt.join(request.target.key, wake)
    tried = False
    try:
        while True:
            wakeup.clear()
            seen = rt.generation
            if rt.is_first(waiter):
                lease = await _grant_async(ctl, request, started, first_try=not tried)
                tried = True
                if lease is not None:
                    _after_grant(ctl, lease)
                    return lease
            waiter.waiting = True
            remaining = started + request.wait_s - time.monotonic()
            if remaining <= 0:
                raise _timeout(request)
            if rt.generation != seen:
                continue  # a machine came back while we looked: look again at once
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=min(remaining, POLL_S))
            except TimeoutError:
                pass
    finally:
        rt.leave(waiter)


def acquire_blocking(
    *, ctl: Controller, request: LeaseRequest, give_up: Callable[[], str | None] | None = None
) -> LeaseGranted:
    """The same as :func:`acquire_async` for threads (the run driver).

    ``give_up`` is asked while waiting; a non-empty answer ends the wait with that reason.
    """
    started = time.monotonic()
    wakeup = threading.Event()
    rt = runtime(ctl)
    waiter = rt.join(request.target.key, wakeup.set)
    tried = False
    try:
        while True:
            wakeup.clear()
            seen = rt.generation
            if rt.is_first(waiter):
                with transaction(ctl.db) as tx:
                    lease = _grant(request, started, not tried)(tx)
                tried = True
                if lease is not None:
                    _after_grant(ctl, lease)
                    return lease
            waiter.waiting = True
            if give_up is not None and (reason := give_up()):
                raise Conflict(reason)
            remaining = started + request.wait_s - time.monotonic()
            if remaining <= 0 or ctl.stopping.is_set():
                raise _timeout(request)
            if rt.generation == seen:
                wakeup.wait(min(remaining, POLL_S * 4))
    finally:
        rt.leave(waiter)


# ---------------------------------------------------------------- renew, release, expire


def get_lease(tx: Session, lease_id: str) -> Lease:
    lease = tx.get(Lease, lease_id)
    if lease is None:
        raise NotFound(f"no lease {lease_id}")
    return lease


def _load_lease(tx: Tx, lease_id: str) -> Row:
    row = rows.load(tx, lease_id)
    if row is None:
        raise NotFound(f"no lease {lease_id}")
    return row


def _acting_for(caller: ApiToken | None) -> str | None:
    """The token whose leases ``caller`` may renew or release (with those taken by no
    token); None: every lease (ops, or the controller itself)."""
    return None if caller is None or caller.role == Role.ops else caller.id


def _check_owner(lease: Row, caller: ApiToken | None) -> None:
    acting_for = _acting_for(caller)
    if acting_for is None or lease["owner_token_id"] in (None, acting_for):
        return
    raise Forbidden(
        f"lease {lease['id']} was taken by another token (holder {lease['holder']!r}); "
        "only that token or an ops token may renew or release it"
    )


def _check_active(lease: Row, action: str) -> None:
    if lease["state"] != LeaseState.active:
        why = f" ({lease['reason']})" if lease.get("reason") else ""
        raise Conflict(
            f"cannot {action} lease {lease['id']}: it is already {lease['state']}{why}",
            state=lease["state"],
        )
    if lease["expires_at"] <= utcnow():
        raise Conflict(
            f"cannot {action} lease {lease['id']}: it expired at {lease['expires_at'].isoformat()}",
            state=LeaseState.expired.value,
        )


def renew(
    *, db: Engine, lease_id: str, caller: ApiToken | None, ttl_s: float | None = None
) -> LeasePublic:
    with transaction(db) as tx:
        return _renew_in(tx, lease_id=lease_id, caller=caller, ttl_s=ttl_s)


async def renew_async(
    *, ctl: Controller, lease_id: str, caller: ApiToken | None, ttl_s: float | None = None
) -> LeasePublic:
    """:func:`renew` from the event loop, through the lease lane (``store.leases``)."""
    lease, new_ttl, expires_at = await ctl.lease_lane.renew(
        lease_id,
        functools.partial(_renewable, caller=caller),
        functools.partial(_new_expiry, ttl_s=ttl_s),
    )
    return _public(lease, ttl_s=new_ttl, expires_at=expires_at)


def _renewable(lease: Row | None, lease_id: str, *, caller: ApiToken | None) -> Row:
    if lease is None:
        raise NotFound(f"no lease {lease_id}")
    _check_owner(lease, caller)
    _check_active(lease, "renew")
    return lease


def _new_expiry(lease: Row, *, ttl_s: float | None) -> tuple[float, datetime]:
    new_ttl: float = lease["ttl_s"] if ttl_s is None else ttl_s
    return new_ttl, utcnow() + timedelta(seconds=new_ttl)


def _renew_in(
    tx: Tx, *, lease_id: str, caller: ApiToken | None, ttl_s: float | None
) -> LeasePublic:
    lease = _renewable(rows.load(tx, lease_id), lease_id, caller=caller)
    ttl_s, expires_at = _new_expiry(lease, ttl_s=ttl_s)
    rows.renew(tx, lease_id, ttl_s=ttl_s, expires_at=expires_at)
    return _public(lease, ttl_s=ttl_s, expires_at=expires_at)


def release(*, ctl: Controller, lease_id: str, caller: ApiToken | None) -> LeasePublic:
    with transaction(ctl.db) as tx:
        ended, policy = _release_in(tx, ctl=ctl, lease_id=lease_id, caller=caller)
    _after_end(ctl, ended, policy)
    return ended


async def release_async(*, ctl: Controller, lease_id: str, caller: ApiToken | None) -> LeasePublic:
    """:func:`release` from the event loop, through the lease lane (``store.leases``)."""
    returning = runtime(ctl).returning
    held: list[str] = []

    def check(row: Row | None, lease_id: str) -> Row:
        lease = _releasable(row, lease_id, caller=caller)
        # Before the commit, as in _end: the reaper's orphan pass must not hand it over too.
        returning.add(lease["machine_id"])
        held.append(lease["machine_id"])
        return lease

    try:
        lease, policy = await ctl.lease_lane.end(
            lease_id, LeaseState.released, check, acting_for=_acting_for(caller)
        )
    except BaseException:
        returning.difference_update(held)
        raise
    if policy is None:
        returning.difference_update(held)
    ended = _public(lease, state=LeaseState.released, ended_at=lease["ended_at"])
    _after_end(ctl, ended, cast("ResetPolicy | None", policy))
    return ended


def _releasable(lease: Row | None, lease_id: str, *, caller: ApiToken | None) -> Row:
    if lease is None:
        raise NotFound(f"no lease {lease_id}")
    _check_owner(lease, caller)
    if lease["state"] != LeaseState.active:
        raise Conflict(f"lease {lease_id} is already {lease['state']}", state=lease["state"])
    return lease


def _release_in(
    tx: Tx, *, ctl: Controller, lease_id: str, caller: ApiToken | None
) -> tuple[LeasePublic, ResetPolicy | None]:
    lease = _releasable(rows.load(tx, lease_id), lease_id, caller=caller)
    return _end(ctl, tx, lease, LeaseState.released)


def _public(lease: Row, **changes: Any) -> LeasePublic:
    return LeasePublic.model_validate({**lease, **changes})


def _end(
    ctl: Controller, tx: Tx, lease: Row, state: LeaseState
) -> tuple[LeasePublic, ResetPolicy | None]:
    """End the lease and fence the machine; say how the machine must come back (or None).
    Conflict when another transaction ended the lease since it was read."""
    now = utcnow()
    ended, policy = rows.end(tx, lease, state, now)
    if not ended:
        raise Conflict(f"lease {lease['id']} ended meanwhile (released or expired)")
    if policy is not None:  # every policy: the machine waits leased for its hand-over
        runtime(ctl).returning.add(lease["machine_id"])
    return _public(lease, state=state, ended_at=now), cast("ResetPolicy | None", policy)


def _after_grant(ctl: Controller, lease: LeasePublic) -> None:
    """Channels opened before this lease (under an earlier fence) must not serve it."""
    ctl.access.close_before_fence(
        machine_id=lease.machine_id, fence=lease.fence, why="the machine was leased again"
    )


def _after_end(ctl: Controller, ended: LeasePublic, policy: ResetPolicy | None) -> None:
    """After the commit: the lease's channels close (its forwards refuse connections, its
    sessions answer 410), and the machine comes back per its pool's policy."""
    machine_id = ended.machine_id
    ctl.access.close_before_fence(
        machine_id=machine_id, fence=ended.fence + 1, why="its lease ended"
    )
    if policy is not None and not ctl.stopping.is_set():
        # When stopping, the next start finds the machine leased by nobody and returns it.
        ctl.handovers.submit(return_machine, ctl=ctl, machine_id=machine_id, policy=policy)
    runtime(ctl).notify()


def return_machine(*, ctl: Controller, machine_id: str, policy: ResetPolicy) -> None:
    """Off the request path: hand a machine whose lease ended over to the next holder, then
    free it. ``recreate`` destroys it (the pool makes a new one); ``keep`` and ``clean``
    end every process of the machine's user and wipe what it owns outside /workspace
    (``machines.hand_over``), ``clean`` also restores the checkout and reruns setup. A
    machine whose processes could not all be ended is recreated in place; one whose
    hand-over failed otherwise is ``failed`` with the reason. Never ``ready`` before that.

    One at a time per machine, and only for a machine still leased by nobody: the reaper
    may ask again for a machine it saw orphaned just before its hand-over ended, and a
    second hand-over must never run beside the first or on the next holder's machine."""
    rt = runtime(ctl)
    rt.returning.add(machine_id)
    try:
        with _returning_lock(machine_id):
            container = _leased_by_nobody(ctl.db, machine_id)
            if container is not None:
                _return(ctl, machine_id, container, policy)
    finally:
        rt.returning.discard(machine_id)
        rt.notify()


_RETURN_LOCKS: dict[str, threading.Lock] = {}
_RETURN_LOCKS_GUARD = threading.Lock()


def _returning_lock(machine_id: str) -> threading.Lock:
    with _RETURN_LOCKS_GUARD:
        return _RETURN_LOCKS.setdefault(machine_id, threading.Lock())


def _leased_by_nobody(db: Engine, machine_id: str) -> str | None:
    """The machine's container if it is still leased by nobody; None when it is back,
    failed, gone or leased again."""
    with transaction(db, write=False) as tx:
        machine = rows.coming_back(tx, machine_id)
    if machine is None or machine["state"] != MachineState.leased or not machine["unheld"]:
        return None
    return str(machine["container_name"])


def _return(ctl: Controller, machine_id: str, container: str, policy: ResetPolicy) -> None:
    try:
        if policy == "recreate":
            machines.destroy_machine(
                db=ctl.db,
                provider=ctl.provider,
                access=ctl.access,
                machine_id=machine_id,
                even_if_leased=True,
            )
            return
        try:
            handed_over = machines.hand_over(
                db=ctl.db,
                provider=ctl.provider,
                settings=ctl.settings,
                access=ctl.access,
                machine_id=machine_id,
                container=container,
                restore_checkout=policy == "clean",
            )
        except ProcessesSurvive as exc:
            if ctl.stopping.is_set():
                raise  # no new container while the controller stops
            log.warning("recreating %s: %s", machine_id, exc.message)
            machines.recreate_machine(
                db=ctl.db,
                provider=ctl.provider,
                settings=ctl.settings,
                access=ctl.access,
                install_id=ctl.install_id,
                machine_id=machine_id,
                why=exc.message,
                stopping=ctl.stopping,
            )
            return
        _settle_if_unleased(ctl.db, machine_id, MachineState.ready, also=(handed_over,))
    except ShopfloorError as exc:
        if ctl.stopping.is_set():
            # Cut short by the stop (the engines close under it): the machine stays leased
            # by nobody, and the next start's orphan pass hands it over again.
            log.info("returning %s left to the next start: %s", machine_id, exc.message)
            return
        log.warning("returning %s after its lease failed: %s", machine_id, exc.message)
        _settle_if_unleased(
            ctl.db, machine_id, MachineState.failed, f"{policy} after lease failed: {exc.message}"
        )
    except Exception as exc:  # noqa: BLE001 - a machine must never stay leased by nobody
        log.exception("returning %s after its lease failed", machine_id)
        reason = f"{policy} after lease failed: {type(exc).__name__}: {exc}"
        _settle_if_unleased(ctl.db, machine_id, MachineState.failed, reason)


def _settle_if_unleased(
    db: Engine,
    machine_id: str,
    state: MachineState,
    reason: str | None = None,
    *,
    also: tuple[Change, ...] = (),
) -> None:
    """Move a leased machine that nobody holds any more to ``state`` (plain SQL, as every
    lease end comes here: see ``store.leases.settle``)."""
    with transaction(db) as tx:
        rows.settle(tx, machine_id, state, reason, also=also)


def reap(*, ctl: Controller) -> list[str]:
    """Expire leases past their time and bring back leased machines nobody holds."""
    expired: list[str] = []
    with transaction(ctl.reader, write=False) as tx:
        due = rows.due(tx, utcnow())
    for lease_id in due:
        try:
            with transaction(ctl.db) as tx:
                lease = _load_lease(tx, lease_id)
                if lease["state"] != LeaseState.active or lease["expires_at"] > utcnow():
                    continue  # renewed or released meanwhile
                ended, policy = _end(ctl, tx, lease, LeaseState.expired)
        except Conflict:
            continue  # released (by another controller) between the read and the change
        expired.append(lease_id)
        _after_end(ctl, ended, policy)
    snapshots.resume_abandoned(ctl=ctl)  # then handed over as leased by nobody
    snapshots.drop_ungranted_forks(ctl=ctl)
    _return_orphans(ctl)
    return expired


def _return_orphans(ctl: Controller) -> None:
    """Leased machines without an active lease (a crash mid-reset) go back per pool policy.

    With several controllers on one database another one may be resetting the machine right
    now (its own ``returning``): only a machine untouched for longer than any reset may take
    is an orphan there. One controller per SQLite database: at once."""
    rt = runtime(ctl)
    grace_s = 0.0 if ctl.db.dialect.name == "sqlite" else ctl.settings.provision_timeout_s + 60
    with transaction(ctl.reader, write=False) as tx:
        orphans: list[tuple[str, ResetPolicy]] = [
            (row["id"], row["reset"] or "keep")
            for row in rows.orphans(tx, settled_before=utcnow() - timedelta(seconds=grace_s))
            if row["id"] not in rt.returning
        ]
    for machine_id, policy in orphans:
        if ctl.stopping.is_set():
            return
        rt.returning.add(machine_id)
        ctl.handovers.submit(return_machine, ctl=ctl, machine_id=machine_id, policy=policy)


def list_leases(*, ctl: Controller, state: str | None = None, limit: int = 200) -> list[Lease]:
    query = select(Lease).order_by(col(Lease.acquired_at).desc()).limit(limit)
    if state:
        query = query.where(Lease.state == state)
    with unit_of_work(ctl.reader) as tx:
        return list(tx.exec(query))


def show_lease(*, ctl: Controller, lease_id: str) -> Lease:
    with unit_of_work(ctl.reader) as tx:
        return get_lease(tx, lease_id)
