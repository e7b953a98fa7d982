"""Shell sessions in a machine: open, run commands that keep cwd and env, close."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from controller.api.deps import (
    LEASE_TOKEN_DOC,
    Ctl,
    LeaseToken,
    OpsOrAgent,
    agent_call,
    answer,
    json_body,
    key,
    lease_token_header,
    parse_body,
)
from controller.api.fastlane import hot
from controller.api.schemas import SessionOpened, SessionRunAnswer, SessionRunBody

router = APIRouter(prefix="/machines/{machine_id}/sessions", tags=["sessions"])


@router.post("", status_code=status.HTTP_201_CREATED)
def open_session(
    machine_id: str, ctl: Ctl, caller: OpsOrAgent, x_lease_token: LeaseToken = None
) -> SessionOpened:
    session = ctl.access.open_session(machine_id=machine_id, key=key(caller, x_lease_token))
    return SessionOpened(id=session.id, machine_id=session.machine_id)


@router.post(
    "/{session_id}/run",
    response_model=SessionRunAnswer,
    openapi_extra={**json_body(SessionRunBody), "parameters": [LEASE_TOKEN_DOC]},
    responses={422: {"description": "a bad body or X-Lease-Token header"}},
)
@hot
async def run_in_session(machine_id: str, session_id: str, request: Request) -> Response:
    """The hot path (see bench/exec.py): no dependencies (see routes/deps.py); it reads the
    Authorization and X-Lease-Token headers and a ``SessionRunBody`` itself. The state and
    fence check is one plain-SQL read, and the command waits on the channel from the event
    loop."""
    ctl, caller = await agent_call(request)
    body = parse_body(SessionRunBody, await request.body())
    result = await ctl.access.run_in_session(
        machine_id=machine_id,
        session_id=session_id,
        key=key(caller, lease_token_header(request)),
        cmd=body.cmd,
        timeout_s=body.timeout_s,
    )
    return answer(SessionRunAnswer(**result.__dict__))


@router.delete("/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
def close_session(
    machine_id: str, session_id: str, ctl: Ctl, caller: OpsOrAgent, x_lease_token: LeaseToken = None
) -> Response:
    ctl.access.close_session(
        machine_id=machine_id, session_id=session_id, key=key(caller, x_lease_token)
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
