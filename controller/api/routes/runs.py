"""Runs: submit a change to the pipeline, follow it, cancel it."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, status

from controller.api.deps import AnyRole, Ctl, LeaseToken, OpsOrAgent
from controller.api.schemas import (
    CriterionPublic,
    ListOf,
    RunBody,
    RunPublic,
    StagePublic,
    StageReportBody,
)
from controller.domain import StageClaim
from controller.services import remote_stages, runs
from controller.store.models import Stage

router = APIRouter(prefix="/runs", tags=["runs"])


def stage_public(stage: Stage) -> StagePublic:
    return StagePublic.model_validate(stage, from_attributes=True)


def public(view: runs.RunView) -> RunPublic:
    return RunPublic(
        **view.run.model_dump(exclude={"created_by"}),
        stages=[stage_public(s) for s in view.stages],
        events=[e.model_dump(mode="json") for e in view.events],
        verdict=view.verdict.value,
        closed=view.closed,
        checklist=[CriterionPublic(**asdict(c)) for c in view.checklist],
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def create_run(body: RunBody, ctl: Ctl, caller: OpsOrAgent) -> RunPublic:
    return public(runs.create_run(ctl=ctl, spec=body, caller=caller))


@router.get("")
def list_runs(
    ctl: Ctl,
    _: AnyRole,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ListOf[RunPublic]:
    found = runs.list_runs(ctl=ctl, status=status, limit=limit)
    return ListOf(data=[public(view) for view in found], count=len(found))


@router.get("/{run_id}")
def show_run(run_id: str, ctl: Ctl, _: AnyRole) -> RunPublic:
    return public(runs.show_run(ctl=ctl, run_id=run_id))


@router.post("/{run_id}/stages/{stage}/claim")
def claim_stage(run_id: str, stage: str, ctl: Ctl, caller: OpsOrAgent) -> StageClaim:
    """For a remote agent (the run's creator or ops): a running stage whose agent is
    ``remote``, with the run's machine and a secret for it (``lease_token``) that only the
    claiming API token may use. Claiming again (a crashed agent coming back, or ops taking
    over) answers a new secret; the earlier one stops working."""
    return remote_stages.claim(db=ctl.db, run_id=run_id, stage_name=stage, caller=caller)


@router.post("/{run_id}/stages/{stage}/report", status_code=status.HTTP_202_ACCEPTED)
def report_stage(
    run_id: str,
    stage: str,
    body: StageReportBody,
    ctl: Ctl,
    caller: OpsOrAgent,
    x_lease_token: LeaseToken = None,
) -> dict[str, object]:
    """A remote agent's result for the attempt it claimed, with the claim's secret in
    X-Lease-Token, from the API token that claimed; the stage ends with it."""
    remote_stages.report(
        db=ctl.db,
        run_id=run_id,
        stage_name=stage,
        result=body,
        lease_token=x_lease_token,
        caller=caller,
    )
    return {"run_id": run_id, "stage": stage, "attempt": body.attempt, "status": body.status}


@router.post("/{run_id}/cancel")
def cancel_run(run_id: str, ctl: Ctl, caller: OpsOrAgent) -> RunPublic:
    """The run's creator or ops only."""
    return public(runs.cancel_run(ctl=ctl, run_id=run_id, caller=caller))
