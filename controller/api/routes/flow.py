"""Flow figures over a window: the headline share and where runs spend their time."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from controller.api.deps import AnyRole, Ctl
from controller.services import flow

router = APIRouter(prefix="/flow", tags=["flow"])


@router.get("")
def get_flow(
    ctl: Ctl,
    _: AnyRole,
    window_h: Annotated[float, Query(gt=0, le=24 * 366, description="hours back from now")] = 24,
) -> dict[str, Any]:
    return flow.figures(ctl=ctl, window_h=window_h)
