"""JSON bodies whatever the Content-Type, as the Docker and GitHub APIs read them.

``curl -d '{...}'`` sends ``application/x-www-form-urlencoded``; other clients send no
Content-Type at all. FastAPI reads a body as JSON only when it is declared so and answers
the rest "Input should be a valid dictionary". For the API's routes that take a JSON body
(a pydantic body parameter under ``/api/``), :class:`JsonBodies` reads any body not declared
JSON as JSON: bytes that parse go on declared ``application/json``; bytes that don't get a
422 that says the body must be JSON.

Everything else passes untouched and unread: bodies already declared JSON (the agents'
client), routes that read their own bytes (files, artifact uploads: they have no body
parameter), form parameters (the gallery's HTML forms) and anything outside ``/api/``. The
hot routes never come here (see fastlane.py); they parse their raw bytes as JSON whatever
the Content-Type (``deps.parse_body``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from email.message import Message as MimeHeader
from typing import Any

from fastapi import params, routing
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.errors import InvalidInput

API_PREFIX = "/api/"
NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON_TYPE = (b"content-type", b"application/json")


class JsonBodies:
    """Pure ASGI middleware (no ``BaseHTTPMiddleware``: no task, no body copy per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._json_routes: list[tuple[str, re.Pattern[str]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in NO_BODY_METHODS
            or declared_json(scope)
            or not self._takes_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client went away while sending
            return
        if not body:  # no body: the route says what it thinks of that (usually "required")
            await self.app(scope, replay(body, receive), send)
            return
        try:
            json.loads(body)
        except ValueError as exc:  # JSONDecodeError, or bytes in no Unicode encoding
            await not_json(exc)(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [JSON_TYPE]
        await self.app({**scope, "headers": headers}, replay(body, receive), send)

    def _takes_json(self, scope: Scope) -> bool:
        if self._json_routes is None:  # the app's routes are all there by the first request
            self._json_routes = json_routes(scope["app"].routes)
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        method = scope["method"]
        return any(m == method and regex.match(path) for m, regex in self._json_routes)


def json_routes(routes: Iterable[BaseRoute]) -> list[tuple[str, re.Pattern[str]]]:
    """(method, path pattern) of each route under /api/ with a JSON body parameter."""
    found = []
    for path, route in flat_routes(routes):
        body = getattr(route, "body_field", None)
        if body is None or isinstance(body.field_info, params.Form):  # File is a Form too
            continue
        if path.startswith(API_PREFIX):
            regex, _, _ = compile_path(path)
            found += [(method, regex) for method in getattr(route, "methods", None) or ()]
    return found


def flat_routes(routes: Iterable[BaseRoute]) -> Iterator[tuple[str, Any]]:
    """Each route with its full path: FastAPI from 0.16x keeps included routers as such
    (``iter_route_contexts`` walks them, as its OpenAPI does); before, they were copied in."""
    walk = getattr(routing, "iter_route_contexts", None)
    if walk is None:
        yield from ((getattr(r, "path", ""), r) for r in routes)
        return
    for context in walk(list(routes)):
        yield context.path or "", context.original_route


def declared_json(scope: Scope) -> bool:
    """``application/json`` or ``application/*+json``, as FastAPI tells them."""
    for key, value in scope["headers"]:
        if key == b"content-type":
            if value.startswith(b"application/json"):  # the common case, without parsing
                return True
            header = MimeHeader()
            header["content-type"] = value.decode("latin-1")
            subtype = header.get_content_subtype()
            return header.get_content_maintype() == "application" and (
                subtype == "json" or subtype.endswith("+json")
            )
    return False


async def read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that hands over ``body`` first, then whatever the client sends next
    (``http.disconnect``)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


def not_json(exc: ValueError) -> JSONResponse:
    """The 422 the app's validation handler gives, with what was wrong with the bytes."""
    if isinstance(exc, json.JSONDecodeError):
        reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    else:
        reason = str(exc)
    problem = f"the request body must be JSON ({reason})"
    error = InvalidInput(problem, problems=[{"field": "", "problem": problem}])
    return JSONResponse(error.to_dict(), status_code=error.status_code)
