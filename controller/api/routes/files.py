"""Files in and out of a machine (raw bodies), confined to /workspace, with a size cap."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from controller.api.deps import Ctl, LeaseToken, OpsOrAgent
from controller.api.schemas import FileWritten
from controller.errors import TooLarge
from controller.services import access, machines

router = APIRouter(prefix="/machines/{machine_id}/files", tags=["files"])
PathQuery = Annotated[str, Query(description="inside /workspace: relative, or absolute under it")]


@router.get("")
def get_file(
    machine_id: str, path: PathQuery, ctl: Ctl, _: OpsOrAgent, x_lease_token: LeaseToken = None
) -> Response:
    machine = machines.machine_for_command(
        db=ctl.db, machine_id=machine_id, lease_token=x_lease_token
    )
    data = access.read_file(ctl=ctl, machine=machine, path=path)
    return Response(content=data, media_type="application/octet-stream")


@router.put("")
async def put_file(
    machine_id: str,
    path: PathQuery,
    request: Request,
    ctl: Ctl,
    _: OpsOrAgent,
    x_lease_token: LeaseToken = None,
) -> FileWritten:
    machine = await run_in_threadpool(
        machines.machine_for_command, db=ctl.db, machine_id=machine_id, lease_token=x_lease_token
    )
    data = await _read_capped(request, ctl.settings.file_cap_bytes)
    written = await run_in_threadpool(
        access.write_file, ctl=ctl, machine=machine, path=path, data=data
    )
    return FileWritten(path=written, size=len(data))


async def _read_capped(request: Request, cap: int) -> bytes:
    """The body, refused as soon as it is known to be over the cap (header or bytes)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise TooLarge(f"upload of {declared} bytes is over the cap of {cap} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise TooLarge(f"upload is over the cap of {cap} bytes")
    return bytes(body)
