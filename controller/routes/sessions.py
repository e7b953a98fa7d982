"""Shell sessions in a machine: open, run commands that keep cwd and env, close."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status
from starlette.concurrency import run_in_threadpool

from controller import auth, fleet
from controller.context import Controller
from controller.db import session_scope
from controller.models import ApiToken, Role
from controller.routes.deps import Ctl, OpsOrAgent
from controller.schemas import SessionOpened, SessionRunAnswer, SessionRunBody
from controller.transport import service

router = APIRouter(prefix="/machines/{machine_id}/sessions", tags=["sessions"])
LeaseToken = Annotated[int | None, Header()]


@router.post("", status_code=status.HTTP_201_CREATED)
def open_session(
    machine_id: str, ctl: Ctl, _: OpsOrAgent, x_lease_token: LeaseToken = None
) -> SessionOpened:
    machine = fleet.machine_for_command(db=ctl.db, machine_id=machine_id, lease_token=x_lease_token)
    session = service.open_session(ctl=ctl, machine=machine)
    return SessionOpened(id=session.id, machine_id=machine.id)


@router.post("/{session_id}/run")
async def run_in_session(
    machine_id: str,
    session_id: str,
    body: SessionRunBody,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_lease_token: LeaseToken = None,
) -> SessionRunAnswer:
    """The hot path: token, machine and command in one worker-thread hop (see bench/exec.py)."""
    ctl: Controller = request.app.state.controller

    def work() -> SessionRunAnswer:
        auth.require_role(_caller(ctl, authorization), (Role.ops, Role.agent))
        machine = fleet.machine_for_command(
            db=ctl.db, machine_id=machine_id, lease_token=x_lease_token
        )
        result = service.run_in_session(
            ctl=ctl, machine=machine, session_id=session_id, cmd=body.cmd, timeout_s=body.timeout_s
        )
        return SessionRunAnswer(**result.__dict__)

    return await run_in_threadpool(work)


_TOKEN_TTL_S = 5.0
_known_tokens: dict[str, tuple[ApiToken, float]] = {}


def _caller(ctl: Controller, authorization: str | None) -> ApiToken:
    """The token's record, remembered for a few seconds: a session answers in about a
    millisecond, and looking the token up in the database every time would triple that.
    Only known tokens are remembered; tokens cannot be revoked yet (auth has no revoke)."""
    key = authorization or ""
    known = _known_tokens.get(key)
    if known is not None and time.monotonic() - known[1] < _TOKEN_TTL_S:
        return known[0]
    with session_scope(ctl.db) as db:
        caller = auth.authenticate(session=db, authorization=authorization)
        db.expunge(caller)
    if len(_known_tokens) > 1000:
        _known_tokens.clear()
    _known_tokens[key] = (caller, time.monotonic())
    return caller


@router.delete("/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
def close_session(
    machine_id: str, session_id: str, ctl: Ctl, _: OpsOrAgent, x_lease_token: LeaseToken = None
) -> Response:
    machine = fleet.machine_for_command(db=ctl.db, machine_id=machine_id, lease_token=x_lease_token)
    service.close_session(ctl=ctl, machine=machine, session_id=session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
