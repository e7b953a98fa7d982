"""Files in and out of a machine (raw bodies), confined to /workspace, with a size cap."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from controller.api.body_limits import body_cap
from controller.api.deps import Ctl, LeaseToken, OpsOrAgent, key
from controller.api.schemas import FileWritten

router = APIRouter(prefix="/machines/{machine_id}/files", tags=["files"])
PathQuery = Annotated[str, Query(description="inside /workspace: relative, or absolute under it")]


@router.get("")
def get_file(
    machine_id: str, path: PathQuery, ctl: Ctl, caller: OpsOrAgent, x_lease_token: LeaseToken = None
) -> Response:
    data = ctl.access.read_file(machine_id=machine_id, key=key(caller, x_lease_token), path=path)
    return Response(content=data, media_type="application/octet-stream")


@router.put("")
@body_cap("SHOPFLOOR_FILE_CAP_BYTES", lambda settings: settings.file_cap_bytes)
async def put_file(
    machine_id: str,
    path: PathQuery,
    request: Request,
    ctl: Ctl,
    caller: OpsOrAgent,
    x_lease_token: LeaseToken = None,
) -> FileWritten:
    declared = request.headers.get("content-length")
    written, size = await ctl.access.write_file(
        machine_id=machine_id,
        key=key(caller, x_lease_token),
        path=path,
        body=request.stream(),
        declared_size=int(declared) if declared and declared.isdigit() else None,
    )
    return FileWritten(path=written, size=size)
