"""Flow learning: the failure signatures the factory has seen, with their fixes."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from controller.api.deps import AnyRole, Ctl
from controller.api.schemas import FailurePublic, ListOf
from controller.services import learning

router = APIRouter(prefix="/learning", tags=["learning"])


@router.get("/failures")
def list_failures(
    ctl: Ctl,
    _: AnyRole,
    repo: Annotated[str | None, Query(max_length=4096)] = None,
    stage: Annotated[str | None, Query(max_length=100)] = None,
    kind: Literal["test", "setup", "timeout", "infra", "agent"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> ListOf[FailurePublic]:
    found = learning.list_failures(ctl=ctl, repo=repo, stage=stage, kind=kind, limit=limit)
    data = [
        FailurePublic(
            **view.row.model_dump(
                include={
                    "signature",
                    "kind",
                    "repo",
                    "stage",
                    "count",
                    "first_seen",
                    "last_seen",
                    "sample",
                    "fixed_by",
                    "fix_excerpt",
                }
            ),
            runs=view.runs,
            open=view.row.open,
        )
        for view in found
    ]
    return ListOf(data=data, count=len(data))
