"""Request body caps: the one place that says how big a body may be, on every route.

Each route gets a cap: ``SHOPFLOOR_BODY_LIMIT_BYTES`` (1 MiB) unless its endpoint says
otherwise with :func:`body_cap` (file uploads: ``file_cap_bytes``; artifact uploads:
``artifact_cap_bytes`` and room for the form). A body is refused with 413 as soon as it is
known to be over its cap: at once when Content-Length says so (nothing is read), else
when the bytes counted as they stream pass it (nothing more is read). Nothing is buffered
here.

:class:`BodyLimits` is a pure ASGI middleware, outermost in the app's stack, so
``JsonBodies`` and every route read through it. The hot routes are served ahead of the
stack (``fastlane.py``) and take the same cap through :func:`capped` and
:func:`declared_too_large`: a header scan and a counter, no more.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.api.json_bodies import flat_routes
from controller.errors import TooLarge
from controller.services.limits import BODY, Limits
from controller.settings import Settings

CapOf = Callable[[Settings], int]
F = TypeVar("F", bound=Callable[..., Any])
_CAP = "__shopfloor_body_cap__"
DEFAULT_SETTING = "SHOPFLOOR_BODY_LIMIT_BYTES"


def body_cap(setting: str, cap_of: CapOf) -> Callable[[F], F]:
    """Give a route a body cap of its own (``cap_of`` the settings, named ``setting`` in
    the 413's message), instead of the default."""

    def mark(endpoint: F) -> F:
        setattr(endpoint, _CAP, (setting, cap_of))
        return endpoint

    return mark


def too_large(limit: int, declared: int | None = None, setting: str = "") -> TooLarge:
    setting = setting or DEFAULT_SETTING
    size = f" of {declared} bytes" if declared is not None else ""
    how = (
        "send less: a file goes into a machine with PUT /machines/{id}/files, evidence with "
        "the artifacts upload"
        if setting == DEFAULT_SETTING
        else "send a smaller file (or several parts, or an archive)"
    )
    return TooLarge(
        f"the request body{size} is over this route's cap of {limit} bytes ({setting}); {how}",
        limit_bytes=limit,
    )


def declared_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def declared_too_large(scope: Scope, limit: int, setting: str = "") -> TooLarge | None:
    declared = declared_length(scope)
    if declared is not None and declared > limit:
        return too_large(limit, declared, setting)
    return None


class BodyTooLarge(TooLarge):
    """Raised from ``receive`` when the bytes pass the cap (the app may catch it)."""


def capped(receive: Receive, limit: int, setting: str = "") -> Receive:
    """``receive`` that raises :class:`BodyTooLarge` once more than ``limit`` bytes came."""
    seen = 0

    async def receive_capped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            error = too_large(limit, setting=setting)
            raise BodyTooLarge(error.message, **error.details)
        return message

    return receive_capped


def refuse(error: TooLarge) -> JSONResponse:
    """The 413; the connection closes after it, since the rest of the body is not read."""
    return JSONResponse(
        error.to_dict(), status_code=error.status_code, headers={"Connection": "close"}
    )


def count_refusal(scope: Scope) -> None:
    """One more ``body_size`` refusal in ``/metrics`` (once the controller is there)."""
    controller = getattr(scope["app"].state, "controller", None)
    limits: Limits | None = getattr(controller, "limits", None)
    if limits is not None:
        limits.count(BODY)


class BodyLimits:
    """Pure ASGI middleware: every request's body capped (see the module's text)."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.default = settings.body_limit_bytes
        self._caps: list[tuple[str, re.Pattern[str], int, str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self._cap_for(scope)
        refused = declared_too_large(scope, limit, setting)
        if refused is not None:
            await self._refuse(refused, scope, receive, send)
            return
        over = False
        started = False
        inner = capped(receive, limit, setting)

        async def receive_capped() -> Message:
            nonlocal over
            try:
                return await inner()
            except BodyTooLarge:
                over = True
                raise

        async def send_unless_over(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # what the app answered to the error it saw: ours is the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_capped, send_unless_over)
        except BodyTooLarge:
            pass
        if over and not started:
            await self._refuse(too_large(limit, setting=setting), scope, receive, send)

    async def _refuse(self, error: TooLarge, scope: Scope, receive: Receive, send: Send) -> None:
        await refuse(error)(scope, receive, send)
        count_refusal(scope)

    def _cap_for(self, scope: Scope) -> tuple[int, str]:
        if self._caps is None:  # the app's routes are all there by the first request
            self._caps = route_caps(scope["app"].routes, self.settings)
        if self._caps:
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            method = scope["method"]
            for route_method, regex, cap, setting in self._caps:
                if route_method == method and regex.match(path):
                    return cap, setting
        return self.default, DEFAULT_SETTING


def route_caps(routes: Any, settings: Settings) -> list[tuple[str, re.Pattern[str], int, str]]:
    """(method, path pattern, cap, setting) of each route marked with :func:`body_cap`."""
    found = []
    for path, route in flat_routes(routes):
        marked = getattr(getattr(route, "endpoint", None), _CAP, None)
        if marked is None:
            continue
        setting, cap_of = marked
        regex, _, _ = compile_path(path)
        for method in getattr(route, "methods", None) or ():
            found.append((method, regex, int(cap_of(settings)), setting))
    return found
