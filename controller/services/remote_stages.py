"""Stages done by a remote agent: a program outside the controller claims the stage, works
on the run's machine under the run's lease, and reports its result.

The ``remote`` agent (agents/remote.py) holds the stage open until the report arrives or
the stage's timeout passes. Only the run's creator or ops may claim (403 otherwise). A
claim hands out what the agent needs (the task, the stage's ``with`` block, the machine)
and a new secret bound to the run's current lease and to the claiming API token: the
run's own lease secret stays with the driver. The lease row keeps the secret's SHA-256
(``claim_hash``) and the claimer (``claimed_by``), so machine access accepts the secret
from that token alone, while the run holds that lease; a new claim replaces it. The report
must carry that secret (``X-Lease-Token``), come from the claiming token (403 otherwise)
and name the attempt it is for, so a report from an agent that lost the machine, or from
an earlier attempt, is refused with 409 and changes nothing. Reports are events
(``stage.reported``), written under the writer lock with their checks, so a stage attempt
takes exactly one.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from agents.base import HANDOFF_DIR, RemoteReport
from controller.domain import StageClaim, StageReport
from controller.errors import Conflict, Forbidden, StaleLease
from controller.services import auth, runs
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
        runs.check_creator(run, caller, "claim its stages")
        lease = _active_lease(tx, run)
        machine = tx.get(Machine, lease.machine_id)
        assert machine is not None
        secret = secrets.token_urlsafe(32)
        lease.claim_hash, lease.claimed_by = auth.hash_token(secret), caller.id
        tx.add(lease)
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
            lease_token=secret,
            fence=lease.fence,
            workdir=machine.workdir,
            handoff_dir=HANDOFF_DIR,
        )


def report(
    *,
    db: Engine,
    run_id: str,
    stage_name: str,
    result: StageReport,
    lease_token: str | None,
    caller: ApiToken,
) -> None:
    with unit_of_work(db) as tx:
        run, stage = _running_remote_stage(tx, run_id, stage_name)
        runs.check_creator(run, caller, "report its stages")
        lease = _active_lease(tx, run)
        if lease_token is None:
            raise Conflict("a stage report must carry the claim's token in X-Lease-Token")
        if lease.claim_hash is None or not hmac.compare_digest(
            auth.hash_token(lease_token), lease.claim_hash
        ):
            raise StaleLease(
                "X-Lease-Token is not the token of the stage's current claim (the run moved "
                "to another lease, or the stage was claimed again); claim the stage again"
            )
        if lease.claimed_by != caller.id:
            raise Forbidden(
                f"stage {stage.name} was claimed by another API token; only it may report"
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
