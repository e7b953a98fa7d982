"""Shell sessions in a machine: open, run commands that keep cwd and env, close."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response, status

from controller import fleet
from controller.db import run_read
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
    ctl: Ctl,
    _: OpsOrAgent,
    x_lease_token: LeaseToken = None,
) -> SessionRunAnswer:
    """The hot path (see bench/exec.py): the caller's token comes from memory, the state
    and fence check is one prebuilt read, and the command waits on the channel from the
    event loop: no worker-thread hop."""
    fence = await run_read(
        ctl.db, fleet.fence_for_command, db=ctl.db, machine_id=machine_id, lease_token=x_lease_token
    )
    result = await service.run_in_session(
        ctl=ctl,
        machine_id=machine_id,
        fence=fence,
        session_id=session_id,
        cmd=body.cmd,
        timeout_s=body.timeout_s,
    )
    return SessionRunAnswer(**result.__dict__)


@router.delete("/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
def close_session(
    machine_id: str, session_id: str, ctl: Ctl, _: OpsOrAgent, x_lease_token: LeaseToken = None
) -> Response:
    machine = fleet.machine_for_command(db=ctl.db, machine_id=machine_id, lease_token=x_lease_token)
    service.close_session(ctl=ctl, machine=machine, session_id=session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
