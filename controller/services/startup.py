"""Putting a controller together: migrate, engines, the Docker provider, background loops.

The API (``controller.api.app``) only builds the FastAPI app and calls these at start-up.
"""

from __future__ import annotations

from controller.providers.docker import DockerProvider
from controller.services import driver, images, leases, pools, reconcile
from controller.services.runtime import Controller, read_install_id
from controller.settings import Settings
from controller.store.db import checkpoint, make_engine, migrate
from evidence import retention

CHECKPOINT_INTERVAL_S = 0.25
"""Often, so that each checkpoint has little to copy and fsync (see db.checkpoint)."""


def build_controller(settings: Settings, *, background: bool = False) -> Controller:
    """``background``: the caller will run :func:`start_loops` (checkpoints among them)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.sqlalchemy_url)
    provider = DockerProvider(settings.docker_host)
    default_image = settings.runner_image or images.runner_image_tag(images.default_extra_ca())
    return Controller(
        settings=settings,
        db=make_engine(settings.sqlalchemy_url, checkpoint_loop=background),
        provider=provider,
        install_id=settings.install_id or read_install_id(settings.data_dir),
        default_image=default_image,
    )


def start_loops(ctl: Controller) -> None:
    reconcile.fail_interrupted(db=ctl.db, provider=ctl.provider)
    ctl.every(
        ctl.settings.reconcile_interval_s,
        "reconcile",
        lambda: reconcile.reconcile(
            db=ctl.db,
            provider=ctl.provider,
            access=ctl.access,
            install_id=ctl.install_id,
            grace_s=ctl.settings.orphan_grace_s,
        ),
    )
    ctl.every(ctl.settings.lease_reap_interval_s, "lease-reaper", lambda: leases.reap(ctl=ctl))
    ctl.every(CHECKPOINT_INTERVAL_S, "checkpoint", lambda: checkpoint(ctl.db))
    ctl.every(ctl.settings.pool_interval_s, "pools", lambda: pools.fill(ctl=ctl))
    ctl.every(ctl.settings.run_poll_interval_s, "runs", lambda: driver.driver_tick(ctl=ctl))
    ctl.every(
        ctl.settings.retention_interval_s,
        "retention",
        lambda: retention.retention_tick(db=ctl.db, settings=ctl.settings),
    )
