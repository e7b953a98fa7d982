"""Putting a controller together: migrate, engines, the Docker provider, background loops.

The API (``controller.api.app``) only builds the FastAPI app and calls these at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controller.providers.disks import DiskStore, unusable_reason
from controller.providers.docker import DockerProvider
from controller.providers.fleet import FleetProvider
from controller.services import (
    driver,
    hosts,
    images,
    leadership,
    leases,
    pools,
    reconcile,
    snapshots,
    tracing,
    webhooks,
)
from controller.services.runtime import Controller
from controller.settings import Settings
from controller.store.db import checkpoint, make_engine, migrate, reader
from evidence import retention

log = logging.getLogger(__name__)
CHECKPOINT_INTERVAL_S = 0.25
"""Often, so that each checkpoint has little to copy and fsync (see db.checkpoint)."""


def build_controller(settings: Settings, *, background: bool = False) -> Controller:
    """``background``: the caller will run :func:`start_loops` (checkpoints among them)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.data_dir.chmod(0o700)  # keys, tokens' database, evidence: the controller's only
    migrate(settings.sqlalchemy_url)
    local = DockerProvider(settings.docker_host, disks=_disks(settings))
    default_image = settings.runner_image or images.runner_image_tag(images.default_extra_ca())
    db = make_engine(settings.sqlalchemy_url, checkpoint_loop=background)
    # One engine per host (issue 14): each call goes to the engine of the machine's host.
    provider = FleetProvider(
        local, locate=hosts.locator(reader(db)), connect=hosts.connector(reader(db))
    )
    traces = tracing.make(settings)  # once per controller: OTLP when an endpoint is set
    if settings.opentelemetry:
        tracing.share_with_fastapi(traces)
    ctl = Controller(
        settings=settings,
        db=db,
        provider=provider,
        install_id=settings.install_id
        or leadership.shared_install_id(db=db, data_dir=settings.data_dir),
        default_image=default_image,
        tracing=traces,
    )
    hosts.register_local(ctl=ctl)
    return ctl


def _disks(settings: Settings) -> DiskStore | None:
    """Disk images that cap each machine's workspace and scratch space, where this host can
    make them (root, loop devices); otherwise machines run without disk limits."""
    if not settings.disk_limits:
        return None
    reason = unusable_reason()
    if reason is not None:
        log.warning("disk limits are off: %s", reason)
        return None
    sizes = (settings.workspace_disk_bytes, settings.scratch_disk_bytes)
    return DiskStore(
        settings.data_dir / "disks", spare_sizes=sizes, pool_bytes=settings.disk_pool_bytes
    )


def start_loops(ctl: Controller) -> None:
    """Every controller checkpoints its SQLite log and keeps trying for the leader lease;
    the loops that must run once run in the leader only (see ``leadership``)."""
    if ctl.db.dialect.name == "sqlite":
        # One controller per SQLite database: provisioning left half-done is a dead one's.
        reconcile.fail_interrupted(db=ctl.db, provider=ctl.provider)
        snapshots.clean_interrupted(db=ctl.db, provider=ctl.provider)
        leadership.expire_the_dead(ctl=ctl)
    try:
        leadership.keep_lead(ctl=ctl)  # before the led loops' first tick
    except Exception:
        log.exception("could not ask for the leader lease; the leader loop retries")
    ctl.on_close.append(lambda: leadership.resign(ctl=ctl))
    ctl.every(ctl.settings.leader_ttl_s / 3, "leader", lambda: leadership.keep_lead(ctl=ctl))
    ctl.every(CHECKPOINT_INTERVAL_S, "checkpoint", lambda: checkpoint(ctl.db))
    led = _led(ctl)
    ctl.every(ctl.settings.host_heartbeat_interval_s, "hosts", lambda: _hosts(ctl))
    ctl.every(ctl.settings.reconcile_interval_s, "reconcile", led(lambda: _reconcile(ctl)))
    ctl.every(ctl.settings.lease_reap_interval_s, "lease-reaper", led(lambda: leases.reap(ctl=ctl)))
    ctl.every(ctl.settings.pool_interval_s, "pools", led(lambda: pools.fill(ctl=ctl)))
    ctl.every(ctl.settings.run_poll_interval_s, "runs", led(lambda: driver.driver_tick(ctl=ctl)))
    ctl.every(
        ctl.settings.webhook_interval_s,
        "webhooks",
        led(lambda: webhooks.deliver_due(ctl=ctl)),
    )
    ctl.every(
        ctl.settings.retention_interval_s,
        "retention",
        led(lambda: _retention(ctl)),
    )


def _retention(ctl: Controller) -> None:
    retention.retention_tick(db=ctl.db, settings=ctl.settings)
    snapshots.retention_tick(ctl=ctl)


def _led(ctl: Controller) -> Callable[[Callable[[], object]], Callable[[], object]]:
    def led(tick: Callable[[], object]) -> Callable[[], object]:
        def tick_if_leader() -> object:
            return tick() if ctl.leads() else None

        return tick_if_leader

    return led


def _hosts(ctl: Controller) -> None:
    """Every controller follows the registry (engines of hosts added or removed through
    another one); the leader pings the hosts and loses the machines of a silent one."""
    hosts.connect_all(ctl=ctl)
    if not ctl.leads():
        return
    for name in hosts.heartbeat(ctl=ctl):
        lost = reconcile.lose_host(
            db=ctl.db,
            access=ctl.access,
            host=name,
            why=f"no answer for {ctl.settings.host_timeout_s:g} s",
            fenced=lambda tx: leadership.check_fence(
                tx, name=leadership.LOOPS, holder=ctl.instance_id, fence=ctl.fence
            ),
        )
        log.warning("host %s is unreachable; machines lost: %s", name, ", ".join(lost) or "none")


def _reconcile(ctl: Controller) -> None:
    if ctl.db.dialect.name != "sqlite":
        # Provisioning runs in the controller that was asked; only what outlived any
        # provisioning's deadline is surely a dead controller's.
        reconcile.fail_interrupted(
            db=ctl.db,
            provider=ctl.provider,
            older_than_s=ctl.settings.provision_timeout_s + 60,
        )
        snapshots.clean_interrupted(
            db=ctl.db, provider=ctl.provider, older_than_s=ctl.settings.provision_timeout_s + 60
        )
    reconcile.reconcile(
        db=ctl.db,
        provider=ctl.provider,
        access=ctl.access,
        install_id=ctl.install_id,
        grace_s=ctl.settings.orphan_grace_s,
        disk_watch=ctl.disk_watch,
        near_full=ctl.settings.disk_near_full,
        fenced=lambda tx: leadership.check_fence(
            tx, name=leadership.LOOPS, holder=ctl.instance_id, fence=ctl.fence
        ),
    )
