"""Liveness: answers without a token so load balancers and scripts can poll it."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Says nothing about the install to anyone without a token."""
    return {"status": "ok"}
