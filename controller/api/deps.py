"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from controller.api.json_bodies import NUL_ESCAPE, nul_field
from controller.errors import InvalidInput
from controller.services import access, auth, callers
from controller.services.runtime import Controller
from controller.store.models import ApiToken, Role

M = TypeVar("M", bound=BaseModel)
JSON = "application/json"


def controller_of(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


async def get_controller(request: Request) -> Controller:
    """Async on purpose: FastAPI runs plain-def dependencies in a worker thread."""
    return controller_of(request)


Ctl = Annotated[Controller, Depends(get_controller)]


def require(*roles: Role) -> Callable[..., Awaitable[ApiToken]]:
    """A dependency that authenticates the bearer token and checks its role."""

    async def check(ctl: Ctl, authorization: Annotated[str | None, Header()] = None) -> ApiToken:
        return await authenticate(ctl, authorization, roles)

    return check


async def authenticate(
    ctl: Controller, authorization: str | None, roles: tuple[Role, ...]
) -> ApiToken:
    """The caller's token, if it may act in one of ``roles``.

    Async, and usually answered from memory: no worker-thread hop on the hot path. Each
    call takes one request from the token's bucket (``limits.TokenBuckets``, about a
    microsecond): past its rate, 429 with Retry-After.
    """
    token_hash = auth.hash_token(auth.bearer(authorization))
    token = ctl.tokens.get(token_hash)
    if token is None:
        token = await anyio.to_thread.run_sync(
            lambda: callers.token_for(ctl=ctl, token_hash=token_hash)
        )
        ctl.tokens.put(token_hash, token)
    auth.require_role(token, roles)
    ctl.limits.check_rate(token.id, token.name)
    return token


AGENT_ROLES = (Role.ops, Role.agent)
OpsOnly = Annotated[ApiToken, Depends(require(Role.ops))]
OpsOrAgent = Annotated[ApiToken, Depends(require(*AGENT_ROLES))]
Reviewer = Annotated[ApiToken, Depends(require(Role.reviewer))]
AnyRole = Annotated[ApiToken, Depends(require(Role.ops, Role.agent, Role.reviewer))]


# ---------------------------------------------------------------- for routes without dependencies

# The agents' hot routes (lease, renew, release, session command) take no dependencies:
# FastAPI's solving of them cost ~0.7 ms per request here, more than a session command's
# whole SSH round trip. They read what they need with these, the dependencies' own helpers.


async def agent_call(request: Request) -> tuple[Controller, ApiToken]:
    """The controller, and the caller's token if it is an ops or agent token."""
    ctl = controller_of(request)
    return ctl, await authenticate(ctl, request.headers.get("authorization"), AGENT_ROLES)


def parse_body(model: type[M], raw: bytes) -> M:
    """What FastAPI does with a body parameter: a 422 in the usual shape when it is wrong."""
    try:
        parsed = model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    if NUL_ESCAPE in raw and (field := nul_field(json.loads(raw))) is not None:
        problem = f"{field or 'body'}: text must not contain NUL (\\u0000)"
        raise InvalidInput(problem, problems=[{"field": field, "problem": problem}])
    return parsed


LEASE_TOKEN_HELP = (
    "the secret a lease's grant (or a stage claim) answered as its token; required on a "
    "leased machine, and only the API token that was granted it may use it"
)
LeaseToken = Annotated[str | None, Header(description=LEASE_TOKEN_HELP, max_length=256)]
"""X-Lease-Token as a parameter; the hot routes read it with :func:`lease_token_header`."""

LEASE_TOKEN_DOC = {
    "name": "x-lease-token",
    "in": "header",
    "required": False,
    "description": LEASE_TOKEN_HELP,
    "schema": {"type": "string", "maxLength": 256},
}
"""OpenAPI text for the header :func:`lease_token_header` reads."""


def lease_token_header(request: Request) -> str | None:
    value = request.headers.get("x-lease-token")
    if value is not None and len(value) > 256:
        raise InvalidInput("X-Lease-Token is at most 256 characters")
    return value


def key(caller: ApiToken, lease_token: str | None) -> access.Key:
    """Who reaches into a machine: the caller with what it sent in X-Lease-Token."""
    return access.Key(caller=caller, secret=lease_token)


def json_body(model: type[M]) -> dict[str, Any]:
    """OpenAPI text for a body that a route parses itself (see :func:`parse_body`)."""
    schema = {"schema": model.model_json_schema()}
    return {"requestBody": {"required": True, "content": {JSON: schema}}}


def answer(model: BaseModel, status_code: int = 200) -> Response:
    """A model as JSON, as FastAPI would send it, without validating it a second time."""
    return Response(model.model_dump_json(), status_code=status_code, media_type=JSON)
