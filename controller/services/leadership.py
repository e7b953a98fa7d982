"""Several controllers on one database: the leader lease and the shared install id.

Every controller serves the whole API; the loops that must run once — pools, reconcile,
the lease reaper, starting run drivers, retention — run only in the controller that holds
the leader lease, a row in ``leaders``: holder (a controller process), expiry, heartbeat and
a fence that grows with each takeover. The leader renews it every third of its TTL; a
controller takes it over once it expired (its holder died or lost the database). One
conditional UPDATE decides, so two controllers never both win. The leader trusts its lease
only until a local deadline shorter than the row's (:meth:`Controller.leads`): by the time
another controller may take over, the old leader has stopped its loops' ticks.

All controllers on one database share one install id (the label on every container and
volume), kept in the database: the machines are the database's, not one process's, and the
leader reconciles all of them. Controllers with their own ids on one database marked each
other's machines ``lost``.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from controller.errors import Conflict
from controller.services.runtime import Controller, read_install_id
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.models import InstallMeta, Leader, Run, utcnow

log = logging.getLogger(__name__)

LOOPS = "loops"
"""The leader lease of the loops that must run once."""
LOCAL_SHARE = 0.75
"""The leader stops trusting its lease after this share of the TTL, before anyone may take over."""


def try_lead(*, db: Engine, name: str, holder: str, ttl_s: float) -> int | None:
    """Take or keep the leader lease ``name``; its fence if ``holder`` leads, else None."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    try:
        with unit_of_work(db) as tx:
            row = tx.get(Leader, name, with_for_update=True)
            if row is None:
                tx.add(
                    Leader(name=name, holder=holder, fence=1, expires_at=expires, heartbeat_at=now)
                )
                events.record(tx, "leader.elected", name, holder=holder, fence=1, previous=None)
                return 1
            previous, fence = row.holder, row.fence + (0 if row.holder == holder else 1)
            took = tx.connection().execute(
                update(Leader)
                .where(
                    col(Leader.name) == name,
                    (col(Leader.holder) == holder) | (col(Leader.expires_at) < now),
                )
                .values(fence=fence, holder=holder, expires_at=expires, heartbeat_at=now)
            )
            if took.rowcount != 1:
                return None
            if previous != holder:
                events.record(
                    tx, "leader.elected", name, holder=holder, fence=fence, previous=previous
                )
            return fence
    except sa_exc.IntegrityError:  # another controller inserted the row first
        return None


def check_fence(tx: Session, *, name: str, holder: str, fence: int) -> None:
    """Inside a led loop's write: :class:`Conflict` (nothing written) unless ``holder`` still
    holds the lease under ``fence``. The row stays locked until ``tx`` ends (PostgreSQL), so
    no takeover slips in between the check and the write."""
    row = tx.get(Leader, name, with_for_update=True)
    if row is None or row.holder != holder or row.fence != fence or row.expires_at < utcnow():
        raise Conflict(f"controller {holder} no longer leads {name} (fence {fence})")


def step_down(*, db: Engine, name: str, holder: str) -> None:
    """A controller stopping hands the lease over at once instead of at its expiry."""
    with unit_of_work(db) as tx:
        tx.connection().execute(
            update(Leader)
            .where(col(Leader.name) == name, col(Leader.holder) == holder)
            .values(expires_at=utcnow())
        )


def keep_lead(*, ctl: Controller) -> None:
    """One heartbeat of the leader loop (every third of ``leader_ttl_s``)."""
    ttl_s = ctl.settings.leader_ttl_s
    started = time.monotonic()
    fence = try_lead(db=ctl.db, name=LOOPS, holder=ctl.instance_id, ttl_s=ttl_s)
    if fence is None:
        if ctl.lead_until:
            log.warning("controller %s is no longer the leader", ctl.instance_id)
        ctl.lead_until, ctl.fence = 0.0, 0
        return
    if fence != ctl.fence:
        log.info("controller %s leads the loops (fence %d)", ctl.instance_id, fence)
    ctl.lead_until, ctl.fence = started + ttl_s * LOCAL_SHARE, fence


def expire_the_dead(*, ctl: Controller) -> None:
    """At start-up on SQLite (one controller per database): whoever held the leader lease
    and the runs' claims before is this controller's dead predecessor; take over at once
    instead of waiting out their TTLs."""
    now = utcnow()
    with unit_of_work(ctl.db) as tx:
        connection = tx.connection()
        connection.execute(
            update(Leader).where(col(Leader.holder) != ctl.instance_id).values(expires_at=now)
        )
        connection.execute(
            update(Run)
            .where(col(Run.driver) != ctl.instance_id, col(Run.driver_expires_at) > now)
            .values(driver_expires_at=now)
        )


def resign(*, ctl: Controller) -> None:
    if ctl.lead_until:
        ctl.lead_until = 0.0
        step_down(db=ctl.db, name=LOOPS, holder=ctl.instance_id)


def shared_install_id(*, db: Engine, data_dir: Path) -> str:
    """The install id every controller on this database uses: the first one's data dir id."""
    proposed = read_install_id(data_dir)
    try:
        with unit_of_work(db) as tx:
            if tx.get(InstallMeta, "install_id") is None:
                tx.add(InstallMeta(key="install_id", value=proposed))
    except sa_exc.IntegrityError:
        pass  # another controller wrote it first
    with unit_of_work(db) as tx:
        row = tx.get(InstallMeta, "install_id")
        assert row is not None
        return row.value
