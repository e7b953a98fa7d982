"""Liveness: answers without a token so load balancers and scripts can poll it."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import Ctl

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz(ctl: Ctl) -> dict[str, str]:
    return {"status": "ok", "install_id": ctl.install_id}
