"""Stages done by a remote agent: a program outside the controller claims the stage, works
on the run's machine under the run's lease, and reports its result.

The ``remote`` agent (agents/remote.py) holds the stage open until the report arrives or
the stage's timeout passes. A claim hands out what the agent needs (the task, the stage's
``with`` block, the machine and the run's lease token); the report must carry that token
(``X-Lease-Token``) and the attempt it is for, so a report from an agent that lost the
machine, or from an earlier attempt, is refused with 409 and changes nothing. Reports are
events (``stage.reported``), written under the writer lock with their checks, so a stage
attempt takes exactly one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from agents.base import HANDOFF_DIR, RemoteReport
from controller.domain import StageClaim, StageReport
from controller.errors import Conflict, StaleLease
from controller.services import runs
from controller.store import events  # runs imports this module too: use it at call time
from controller.store.db import unit_of_work
from controller.store.models import (
    ApiToken,
    Event,
    Lease,
    LeaseState,
    Machine,
    Run,
    Stage,
    StageStatus,
)

REMOTE_AGENT = "remote"
REPORTED = "stage.reported"


def claim(*, db: Engine, run_id: str, stage_name: str, caller: ApiToken) -> StageClaim:
    with unit_of_work(db) as tx:
        run, stage = _running_remote_stage(tx, run_id, stage_name)
        lease = _active_lease(tx, run)
        machine = tx.get(Machine, lease.machine_id)
        assert machine is not None
        events.record(
            tx,
            "stage.claimed",
            stage.id,
            run_id=run.id,
            stage=stage.name,
            attempt=stage.attempts,
            by=caller.id,
        )
        return StageClaim(
            run_id=run.id,
            stage=stage.name,
            attempt=stage.attempts,
            task=run.task,
            repo=run.repo,
            ref=run.ref,
            params=dict(stage.params),
            timeout_s=stage.timeout_s,
            machine_id=machine.id,
            lease_token=lease.token,
            workdir=machine.workdir,
            handoff_dir=HANDOFF_DIR,
        )


def report(
    *,
    db: Engine,
    run_id: str,
    stage_name: str,
    result: StageReport,
    lease_token: int | None,
    caller: ApiToken,
) -> None:
    with unit_of_work(db) as tx:
        run, stage = _running_remote_stage(tx, run_id, stage_name)
        lease = _active_lease(tx, run)
        if lease_token is None:
            raise Conflict("a stage report must carry the run's lease token in X-Lease-Token")
        if lease_token != lease.token:
            raise StaleLease(
                f"lease token {lease_token} is not the run's current one; "
                "claim the stage again for the current token"
            )
        if result.attempt != stage.attempts:
            raise Conflict(
                f"the report is for attempt {result.attempt}, but stage {stage.name} is on "
                f"attempt {stage.attempts}"
            )
        if _reported(tx, stage.id, stage.attempts) is not None:
            raise Conflict(f"attempt {stage.attempts} of stage {stage.name} was already reported")
        events.record(
            tx,
            REPORTED,
            stage.id,
            run_id=run.id,
            stage=stage.name,
            by=caller.id,
            **result.model_dump(),  # attempt, status, summary, outputs
        )


def reported(db: Engine, stage_id: str, attempt: int) -> RemoteReport | None:
    """What the driver gives the ``remote`` agent: this attempt's report, once it came."""
    with unit_of_work(db) as tx:
        data = _reported(tx, stage_id, attempt)
    if data is None:
        return None
    return RemoteReport(data["status"], data["summary"], dict(data.get("outputs") or {}))


def _reported(tx: Session, stage_id: str, attempt: int) -> dict[str, Any] | None:
    found = tx.exec(
        select(Event).where(col(Event.subject_id) == stage_id, col(Event.kind) == REPORTED)
    ).all()
    return next((e.data for e in found if e.data.get("attempt") == attempt), None)


def _running_remote_stage(tx: Session, run_id: str, stage_name: str) -> tuple[Run, Stage]:
    run = runs.get_run(tx, run_id)
    stage = runs.get_stage(tx, run_id, stage_name)
    if stage.agent != REMOTE_AGENT:
        raise Conflict(
            f"stage {stage_name} is done by the {stage.agent!r} agent in the controller; "
            f"only stages with agent {REMOTE_AGENT!r} take claims and reports"
        )
    if stage.status != StageStatus.running:
        raise Conflict(
            f"stage {stage_name} is {stage.status.value}; it takes claims and reports while "
            "running",
            state=stage.status.value,
        )
    return run, stage


def _active_lease(tx: Session, run: Run) -> Lease:
    lease = tx.get(Lease, run.lease_id) if run.lease_id else None
    if lease is None or lease.state != LeaseState.active:
        raise Conflict(f"run {run.id} holds no machine right now (it may be moving to another)")
    return lease
