"""Evidence over HTTP: agents upload under their lease, everyone with a token downloads.

Downloads are served so that a hostile artifact cannot run in the controller's origin:
only raster images are inline, everything else is an attachment, never sniffed, and
sandboxed by CSP.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, status
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from controller.api.body_limits import body_cap
from controller.api.deps import AnyRole, Ctl, LeaseToken, OpsOnly, OpsOrAgent
from controller.api.deps import key as lease_key
from controller.api.schemas import ArtifactPublic, ListOf
from controller.errors import InvalidInput, NotFound, TooLarge
from controller.services import artifacts
from controller.store.models import Artifact
from evidence.store import ArtifactStore

router = APIRouter(tags=["evidence"])

INLINE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
FORM_OVERHEAD = 64 * 1024
"""Room for multipart boundaries and the small form fields around the file."""
SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, max-age=3600",
    "Referrer-Policy": "no-referrer",
}


def public(artifact: Artifact) -> ArtifactPublic:
    return ArtifactPublic(
        **artifact.model_dump(exclude={"kind"}),
        kind=artifact.kind.value,
        url=f"/api/v1/artifacts/{artifact.id}",
    )


def content_disposition(name: str, *, inline: bool) -> str:
    basename = re.split(r"[/\\]", name)[-1] or "artifact"
    ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", basename)
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(basename, safe='')}"


def blob_response(
    store: ArtifactStore, sha256: str, *, content_type: str, name: str
) -> FileResponse:
    """A stored blob with the safe headers; raster images inline, anything else attached."""
    path = store.path_for(sha256)
    if not path.exists():
        raise NotFound(f"the content of {name!r} is no longer stored (retention removed it)")
    inline = content_type.split(";", 1)[0].strip().lower() in INLINE_TYPES
    headers = {**SAFE_HEADERS, "Content-Disposition": content_disposition(name, inline=inline)}
    return FileResponse(path, media_type=content_type, headers=headers)


@router.get("/artifacts/{artifact_id}", response_class=FileResponse)
def download_artifact(artifact_id: str, ctl: Ctl, _: AnyRole) -> FileResponse:
    artifact = artifacts.show_artifact(ctl=ctl, artifact_id=artifact_id)
    store = ArtifactStore.from_settings(ctl.settings)
    return blob_response(
        store, artifact.sha256, content_type=artifact.content_type, name=artifact.name
    )


@router.get("/artifacts/{artifact_id}/meta")
def describe_artifact(artifact_id: str, ctl: Ctl, _: AnyRole) -> ArtifactPublic:
    return public(artifacts.show_artifact(ctl=ctl, artifact_id=artifact_id))


@router.get("/runs/{run_id}/artifacts")
def run_artifacts(run_id: str, ctl: Ctl, _: AnyRole) -> ListOf[ArtifactPublic]:
    found = artifacts.run_artifacts(ctl=ctl, run_id=run_id)
    return ListOf(data=[public(a) for a in found], count=len(found))


@router.post(
    "/runs/{run_id}/stages/{stage}/artifacts",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "kind"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                            "attempt": {"type": "integer"},
                            "commit": {"type": "string"},
                            "meta": {"type": "string", "description": "JSON object"},
                        },
                    }
                }
            }
        }
    },
)
@body_cap("SHOPFLOOR_ARTIFACT_CAP_BYTES", lambda s: s.artifact_cap_bytes + FORM_OVERHEAD)
async def upload_artifact(
    run_id: str,
    stage: str,
    request: Request,
    ctl: Ctl,
    caller: OpsOrAgent,
    x_lease_token: LeaseToken = None,
) -> ArtifactPublic:
    """Multipart upload (fields: file, kind, name?, attempt?, commit?, meta?) under the lease."""
    cap = ctl.settings.artifact_cap_bytes  # the body's cap (with the form) is body_limits'
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("send the artifact as a multipart file field named 'file'")
        data = await upload.read(cap + 1)
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        filename = upload.filename or ""
        content_type = upload.content_type
    if len(data) > cap:
        raise TooLarge(f"the artifact is larger than the cap of {cap} bytes", cap_bytes=cap)
    attempt, meta = _int_field(fields, "attempt"), _meta_field(fields)
    saved = await run_in_threadpool(
        lambda: artifacts.upload(
            ctl=ctl,
            run_id=run_id,
            stage=stage,
            key=lease_key(caller, x_lease_token),
            kind=fields.get("kind", ""),
            name=fields.get("name") or filename,
            data=data,
            content_type=content_type,
            attempt=attempt,
            commit=fields.get("commit"),
            meta=meta,
        )
    )
    return public(saved)


def _int_field(fields: dict[str, str], key: str) -> int | None:
    raw = fields.get(key)
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise InvalidInput(f"{key} must be a whole number")
    return int(raw)


def _meta_field(fields: dict[str, str]) -> dict[str, Any]:
    raw = fields.get("meta")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"meta must be a JSON object: {exc}") from exc
    if not isinstance(meta, dict):
        raise InvalidInput("meta must be a JSON object")
    return meta


@router.post("/runs/{run_id}/pin")
def pin_run(run_id: str, ctl: Ctl, _: OpsOnly) -> dict[str, Any]:
    """Keep this run's evidence whatever the retention limits say."""
    artifacts.pin_run(ctl=ctl, run_id=run_id)
    return {"run_id": run_id, "pinned": True}


@router.delete("/runs/{run_id}/pin")
def unpin_run(run_id: str, ctl: Ctl, _: OpsOnly) -> dict[str, Any]:
    artifacts.unpin_run(ctl=ctl, run_id=run_id)
    return {"run_id": run_id, "pinned": False}
