"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session

from controller import auth
from controller.context import Controller
from controller.db import session_scope
from controller.models import ApiToken, Role


def get_controller(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


Ctl = Annotated[Controller, Depends(get_controller)]


def get_session(ctl: Ctl) -> Iterator[Session]:
    with session_scope(ctl.db) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require(*roles: Role) -> Callable[..., ApiToken]:
    """A dependency that authenticates the bearer token and checks its role."""

    def check(ctl: Ctl, authorization: Annotated[str | None, Header()] = None) -> ApiToken:
        with session_scope(ctl.db) as session:
            token = auth.authenticate(session=session, authorization=authorization)
        auth.require_role(token, roles)
        return token

    return check


OpsOnly = Annotated[ApiToken, Depends(require(Role.ops))]
OpsOrAgent = Annotated[ApiToken, Depends(require(Role.ops, Role.agent))]
Reviewer = Annotated[ApiToken, Depends(require(Role.reviewer))]
AnyRole = Annotated[ApiToken, Depends(require(Role.ops, Role.agent, Role.reviewer))]
