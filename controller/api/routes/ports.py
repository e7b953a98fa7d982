"""Ports of a machine forwarded to 127.0.0.1 on the controller host over SSH."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from controller.api.deps import Ctl, LeaseToken, OpsOrAgent, key
from controller.api.schemas import PortBody, PortForwarded

router = APIRouter(prefix="/machines/{machine_id}/ports", tags=["ports"])


@router.post("", status_code=status.HTTP_201_CREATED)
def forward_port(
    machine_id: str, body: PortBody, ctl: Ctl, caller: OpsOrAgent, x_lease_token: LeaseToken = None
) -> PortForwarded:
    forward, listening = ctl.access.open_forward(
        machine_id=machine_id, key=key(caller, x_lease_token), port=body.port
    )
    return PortForwarded(
        url=forward.url, port=body.port, local_port=forward.local_port, listening=listening
    )


@router.delete("/{port}", status_code=status.HTTP_204_NO_CONTENT)
def close_port(
    machine_id: str, port: int, ctl: Ctl, caller: OpsOrAgent, x_lease_token: LeaseToken = None
) -> Response:
    ctl.access.close_forward(machine_id=machine_id, key=key(caller, x_lease_token), port=port)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
