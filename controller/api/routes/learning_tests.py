"""What the factory learned of each repo's tests: healthy, flaky, broken or quarantined."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from controller.api.deps import AnyRole, Ctl
from controller.api.schemas import ListOf
from controller.domain import CaseHealth, TestState
from controller.services import flaky

router = APIRouter(prefix="/learning", tags=["learning"])


@router.get("/tests")
def list_tests(
    ctl: Ctl,
    _: AnyRole,
    repo: Annotated[str | None, Query(max_length=4096, description="the run's repo")] = None,
    state: Annotated[TestState | None, Query(description="only tests in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=flaky.LIST_CAP)] = 1000,
) -> ListOf[CaseHealth]:
    """Per repo and test: its state, its score (posterior mean of its failure probability on
    an unchanged tree, with a 95 % upper bound) and its counts, most recently seen first."""
    found = flaky.list_tests(ctl=ctl, repo=repo, state=state, limit=limit)
    return ListOf[CaseHealth](data=found, count=len(found))
