"""A short way in for the agents' hot routes, ahead of FastAPI's middleware and router.

A request through FastAPI crosses its middleware stack (error pages, telemetry, body limit,
exception handlers, exit stack), a match against every route before it, and the endpoint
wrapper: ~0.2 ms per request on these hosts, half of a session command's whole SSH round
trip. The hot routes stay ordinary FastAPI routes, declared and documented where they are
(OpenAPI, tests); marked with :func:`hot`, they are also found here first and their
endpoint is called directly, with the same answers for errors (the app's own exception
handlers) and the same cap on the body as every other route (``body_limits.py``: the app's
``body_limit``, ``SHOPFLOOR_BODY_LIMIT_BYTES``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send

from controller.api import body_limits
from controller.api.json_bodies import nul_in_address, refuse
from controller.errors import TooLarge

log = logging.getLogger(__name__)

HOT_BODY_LIMIT = 1 << 20
"""The hot routes take small JSON bodies (a session command is at most 128 KiB); the app
sets ``body_limit`` from the settings."""
_HOT = "__shopfloor_hot__"
Endpoint = Callable[..., Awaitable[Response]]
E = TypeVar("E", bound=Endpoint)


def hot(endpoint: E) -> E:
    """Mark an async endpoint that takes its path parameters and the ``Request`` only."""
    setattr(endpoint, _HOT, True)
    return endpoint


@dataclass(frozen=True)
class _Lane:
    method: str
    path: re.Pattern[str]
    endpoint: Endpoint


class ShopfloorAPI(FastAPI):
    """FastAPI, with its :func:`hot` routes served ahead of the middleware stack."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._lanes: list[_Lane] = []
        self.body_limit = HOT_BODY_LIMIT

    def include_router(self, router: APIRouter, *, prefix: str = "", **options: Any) -> None:
        """Also take the router's :func:`hot` routes (its own, not those of routers it
        includes) into the short way."""
        super().include_router(router, prefix=prefix, **options)
        for route in router.routes:
            if isinstance(route, APIRoute) and getattr(route.endpoint, _HOT, False):
                path, _, _ = compile_path(prefix + route.path)
                self._lanes += [_Lane(m, path, route.endpoint) for m in route.methods or ()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.root_path:
            if problem := nul_in_address(scope):
                await refuse(problem)(scope, receive, send)
                return
            for lane in self._lanes:
                if lane.method == scope["method"] and (found := lane.path.match(scope["path"])):
                    await self._serve(lane.endpoint, found.groupdict(), scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _serve(
        self, endpoint: Endpoint, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        scope["app"] = self
        refused = body_limits.declared_too_large(scope, self.body_limit)
        if refused is not None:
            body_limits.count_refusal(scope)
            await body_limits.refuse(refused)(scope, receive, send)
            return
        request = Request(scope, body_limits.capped(receive, self.body_limit))
        try:
            response = await endpoint(request=request, **params)
        except Exception as exc:  # noqa: BLE001 - answered as FastAPI would
            if isinstance(exc, TooLarge):
                body_limits.count_refusal(scope)
            response = await self._answer_error(request, exc)
        await response(scope, receive, send)

    async def _answer_error(self, request: Request, exc: Exception) -> Response:
        for kind in type(exc).__mro__:
            handler: Any = self.exception_handlers.get(kind)
            if handler is not None:
                answer: Response = await handler(request, exc)
                return answer
        log.exception("error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal", "detail": "internal error"}, status_code=500)
