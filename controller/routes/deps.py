"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

import anyio
from fastapi import Depends, Header, Request
from sqlmodel import Session

from controller import auth
from controller.context import Controller
from controller.db import session_scope
from controller.models import ApiToken, Role


async def get_controller(request: Request) -> Controller:
    """Async on purpose: FastAPI runs plain-def dependencies in a worker thread."""
    controller: Controller = request.app.state.controller
    return controller


Ctl = Annotated[Controller, Depends(get_controller)]


def get_session(ctl: Ctl) -> Iterator[Session]:
    with session_scope(ctl.db) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require(*roles: Role) -> Callable[..., Awaitable[ApiToken]]:
    """A dependency that authenticates the bearer token and checks its role."""

    async def check(ctl: Ctl, authorization: Annotated[str | None, Header()] = None) -> ApiToken:
        # Async, and usually answered from memory: no worker-thread hop on the hot path.
        token_hash = auth.hash_token(auth.bearer(authorization))
        token = ctl.tokens.get(token_hash)
        if token is None:
            token = await anyio.to_thread.run_sync(_lookup, ctl, token_hash)
            ctl.tokens.put(token_hash, token)
        auth.require_role(token, roles)
        return token

    return check


def _lookup(ctl: Controller, token_hash: str) -> ApiToken:
    with session_scope(ctl.reader) as session:
        return auth.lookup(session=session, token_hash=token_hash)


OpsOnly = Annotated[ApiToken, Depends(require(Role.ops))]
OpsOrAgent = Annotated[ApiToken, Depends(require(Role.ops, Role.agent))]
Reviewer = Annotated[ApiToken, Depends(require(Role.reviewer))]
AnyRole = Annotated[ApiToken, Depends(require(Role.ops, Role.agent, Role.reviewer))]
