"""Runs: submit a change to the pipeline, follow it, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from sqlmodel import Session

from controller.api.deps import AnyRole, Ctl, LeaseToken, OpsOrAgent, SessionDep
from controller.api.schemas import (
    ListOf,
    RunBody,
    RunPublic,
    StagePublic,
    StageReportBody,
)
from controller.domain import StageClaim
from controller.services import remote_stages, runs
from controller.store.models import Run, Stage
from evidence import verdicts

router = APIRouter(prefix="/runs", tags=["runs"])


def stage_public(stage: Stage) -> StagePublic:
    return StagePublic.model_validate(stage, from_attributes=True)


def public(tx: Session, run: Run, *, with_events: bool = False) -> RunPublic:
    stages = runs.stages_of(tx, run.id)
    found = runs.events_of(tx, run, stages) if with_events else []
    verdict = verdicts.get_verdict(tx, run.id)
    return RunPublic(
        **run.model_dump(exclude={"created_by"}),
        stages=[stage_public(s) for s in stages],
        events=[e.model_dump(mode="json") for e in found],
        verdict=verdicts.verdict_state(verdict).value,
        closed=verdicts.is_closed(stages, verdict),
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def create_run(body: RunBody, ctl: Ctl, tx: SessionDep, caller: OpsOrAgent) -> RunPublic:
    run = runs.create_run(ctl=ctl, spec=body, caller=caller)
    return public(tx, runs.get_run(tx, run.id))


@router.get("")
def list_runs(
    tx: SessionDep,
    _: AnyRole,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ListOf[RunPublic]:
    found = runs.list_runs(tx=tx, status=status, limit=limit)
    return ListOf(data=[public(tx, r) for r in found], count=len(found))


@router.get("/{run_id}")
def show_run(run_id: str, tx: SessionDep, _: AnyRole) -> RunPublic:
    return public(tx, runs.get_run(tx, run_id), with_events=True)


@router.post("/{run_id}/stages/{stage}/claim")
def claim_stage(run_id: str, stage: str, ctl: Ctl, caller: OpsOrAgent) -> StageClaim:
    """For a remote agent: a running stage whose agent is ``remote``, with the run's machine
    and lease token. Claiming again answers the same (a crashed agent can come back)."""
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
    """A remote agent's result for the attempt it claimed; the stage ends with it."""
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
def cancel_run(run_id: str, ctl: Ctl, tx: SessionDep, _: OpsOrAgent) -> RunPublic:
    runs.cancel_run(db=ctl.db, run_id=run_id)
    return public(tx, runs.get_run(tx, run_id))
