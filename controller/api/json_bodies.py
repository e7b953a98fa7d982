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
            or not self._takes_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client went away while sending
            return
        declared = declared_json(scope)
        if not body or (declared and NUL_ESCAPE not in body):
            # No body: the route says what it thinks of that (usually "required").
            await self.app(scope, replay(body, receive), send)
            return
        try:
            value = json.loads(body)
        except ValueError as exc:  # JSONDecodeError, or bytes in no Unicode encoding
            if declared:  # FastAPI's own answer
                await self.app(scope, replay(body, receive), send)
            else:
                await not_json(exc)(scope, receive, send)
            return
        if (field := nul_field(value)) is not None:
            await refuse(f"{field or 'body'}: text must not contain NUL (\\u0000)", field)(
                scope, receive, send
            )
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


NUL_ESCAPE = b"\\u0000"
"""How a NUL appears in JSON (a raw NUL byte is not JSON at all)."""


def nul_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in ``value`` that holds a NUL, or None.

    NUL is refused in every text field: PostgreSQL cannot store it in text at all, SQLite
    stores it and C strings downstream (git, the shell, file names) cut the text there.
    Other control characters are stored as given on both databases and escaped on output.
    """
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return where
            if (found := nul_field(item, where)) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if (found := nul_field(item, f"{path}.{index}" if path else str(index))) is not None:
                return found
    return None


def nul_in_address(scope: Scope) -> str | None:
    """A NUL in an API path or query string: a 422 before any route reads it (the app
    checks every request, hot or not: ``fastlane.ShopfloorAPI``)."""
    if not scope["path"].startswith(API_PREFIX):
        return None
    if "\x00" in scope["path"]:
        return "path: must not contain NUL (%00)"
    if b"%00" in scope.get("query_string", b""):
        return "query: must not contain NUL (%00)"
    return None


def refuse(problem: str, field: str = "") -> JSONResponse:
    """A 422 in the app's validation shape."""
    error = InvalidInput(problem, problems=[{"field": field, "problem": problem}])
    return JSONResponse(error.to_dict(), status_code=error.status_code)


def not_json(exc: ValueError) -> JSONResponse:
    """The 422 the app's validation handler gives, with what was wrong with the bytes."""
    if isinstance(exc, json.JSONDecodeError):
        reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    else:
        reason = str(exc)
    problem = f"the request body must be JSON ({reason})"
    error = InvalidInput(problem, problems=[{"field": "", "problem": problem}])
    return JSONResponse(error.to_dict(), status_code=error.status_code)
