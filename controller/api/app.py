"""The FastAPI app: its routes, its start-up (``services.startup``), and the one place errors
become HTTP."""

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
from controller.api.body_limits import BodyLimits
from controller.api.fastlane import ShopfloorAPI
from controller.api.json_bodies import JsonBodies
from controller.api.routes import artifacts as artifacts_routes
from controller.api.routes import events as events_routes
from controller.api.routes import files as files_routes
from controller.api.routes import flow as flow_routes
from controller.api.routes import hosts as hosts_routes
from controller.api.routes import learning as learning_routes
from controller.api.routes import learning_tests as learning_tests_routes
from controller.api.routes import leases as leases_routes
from controller.api.routes import machines as machines_routes
from controller.api.routes import metrics, system
from controller.api.routes import owners as owners_routes
from controller.api.routes import pools as pools_routes
from controller.api.routes import ports as ports_routes
from controller.api.routes import runs as runs_routes
from controller.api.routes import sessions as sessions_routes
from controller.api.routes import snapshots as snapshots_routes
from controller.api.routes import verdicts as verdicts_routes
from controller.api.routes import webhooks as webhooks_routes
from controller.errors import ShopfloorError
from controller.services import faults
from controller.services.startup import build_controller, start_loops
from controller.settings import Settings, get_settings

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 0.0005
TELEMETRY_OFF: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


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
    # Outermost: every body is capped before anything reads it (the hot lane too: body_limit).
    app.add_middleware(BodyLimits, settings=settings)
    app.body_limit = settings.body_limit_bytes

    @app.exception_handler(ShopfloorError)
    async def shopfloor_error(_: Request, exc: ShopfloorError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)

    async def translated_error(request: Request, exc: Exception) -> JSONResponse:
        # The database unreachable (503), a full disk (507), a value it cannot store (422).
        error = faults.translate(exc)
        if error is None:
            log.error("error in %s %s", request.method, request.url.path, exc_info=exc)
            error = ShopfloorError("internal error; the controller's log has the details")
        else:
            log.warning("%s %s: %s", request.method, request.url.path, error.message)
        return await shopfloor_error(request, error)

    for kind in faults.TRANSLATED:
        app.add_exception_handler(kind, translated_error)

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
        snapshots_routes.router,
        runs_routes.router,
        events_routes.router,
        flow_routes.router,
        artifacts_routes.router,
        verdicts_routes.router,
        learning_routes.router,
        learning_tests_routes.router,
        owners_routes.router,
        webhooks_routes.router,
        hosts_routes.router,
    ):
        app.include_router(router, prefix="/api/v1")
    app.include_router(system.router)
    app.include_router(metrics.router)
    app.include_router(gallery.router)
    app.mount("/gallery/static", StaticFiles(directory=evidence.STATIC_DIR), name="gallery-static")
    return app
