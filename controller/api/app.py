"""The FastAPI app: wiring, background loops, and the one place errors become HTTP."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.telemetry import TelemetryConfig

import evidence
from controller.api import gallery
from controller.api.fastlane import ShopfloorAPI
from controller.api.json_bodies import JsonBodies
from controller.api.routes import artifacts as artifacts_routes
from controller.api.routes import events as events_routes
from controller.api.routes import files as files_routes
from controller.api.routes import flow as flow_routes
from controller.api.routes import leases as leases_routes
from controller.api.routes import machines as machines_routes
from controller.api.routes import metrics, system
from controller.api.routes import pools as pools_routes
from controller.api.routes import ports as ports_routes
from controller.api.routes import runs as runs_routes
from controller.api.routes import sessions as sessions_routes
from controller.api.routes import verdicts as verdicts_routes
from controller.errors import ShopfloorError
from controller.providers.disks import DiskStore, unusable_reason
from controller.providers.docker import DockerProvider
from controller.services import driver, images, leases, pools, reconcile
from controller.services.runtime import Controller, read_install_id
from controller.settings import Settings, get_settings
from controller.store.db import checkpoint, make_engine, migrate
from evidence import retention

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 0.0005
CHECKPOINT_INTERVAL_S = 0.25
"""Often, so that each checkpoint has little to copy and fsync (see db.checkpoint)."""
TELEMETRY_OFF: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


def build_controller(settings: Settings, *, background: bool = False) -> Controller:
    """``background``: the caller will run :func:`start_loops` (checkpoints among them)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.sqlalchemy_url)
    provider = DockerProvider(settings.docker_host, disks=_disks(settings))
    default_image = settings.runner_image or images.runner_image_tag(images.default_extra_ca())
    return Controller(
        settings=settings,
        db=make_engine(settings.sqlalchemy_url, checkpoint_loop=background),
        provider=provider,
        install_id=settings.install_id or read_install_id(settings.data_dir),
        default_image=default_image,
    )


def _disks(settings: Settings) -> DiskStore | None:
    if not settings.disk_limits:
        return None
    reason = unusable_reason()
    if reason is not None:
        log.warning("disk limits are off: %s", reason)
        return None
    sizes = (settings.workspace_disk_bytes, settings.scratch_disk_bytes)
    return DiskStore(settings.data_dir / "disks", spare_sizes=sizes)


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
            disk_watch=ctl.disk_watch,
            near_full=ctl.settings.disk_near_full,
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


def create_app(settings: Settings | None = None, *, background: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Requests hop between the event loop and worker threads; at the default 5 ms GIL
        # switch interval each hop can wait a whole interval while another thread computes.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        ctl = build_controller(settings, background=background)
        app.state.controller = ctl
        if background:
            start_loops(ctl)
        # What exists now (modules, routes, metadata: ~10^6 objects) lives as long as the
        # process. Frozen, the collector stops walking it: full collections took 30-130 ms
        # on these hosts, stalling every request in flight.
        gc.freeze()
        try:
            yield
        finally:
            ctl.close()

    app = ShopfloorAPI(
        title="Shopfloor",
        version="0.1.0",
        description="Machines for agent-native software factories.",
        lifespan=lifespan,
        telemetry=None if settings.opentelemetry else TELEMETRY_OFF,
    )

    app.add_middleware(JsonBodies)  # curl -d and clients without a Content-Type send JSON too

    @app.exception_handler(ShopfloorError)
    async def shopfloor_error(_: Request, exc: ShopfloorError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"] if p != "body"), "problem": err["msg"]}
            for err in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
        return JSONResponse(
            {"error": "invalid_input", "detail": summary, "problems": problems}, status_code=422
        )

    # Routes are matched in this order: the agents' hot paths (leases, sessions) go first.
    for router in (
        leases_routes.router,
        sessions_routes.router,
        machines_routes.router,
        files_routes.router,
        ports_routes.router,
        pools_routes.router,
        runs_routes.router,
        events_routes.router,
        flow_routes.router,
        artifacts_routes.router,
        verdicts_routes.router,
    ):
        app.include_router(router, prefix="/api/v1")
    app.include_router(system.router)
    app.include_router(metrics.router)
    app.include_router(gallery.router)
    app.mount("/gallery/static", StaticFiles(directory=evidence.STATIC_DIR), name="gallery-static")
    return app
