"""Runs and stages as records: create, read, list, cancel, finish, and their evidence.

A run is a task on a repo carried through named stages on one leased machine; the
driver (``driver.py``) does the work, these functions keep the books.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from agents import registry
from controller.domain import MachineTemplate, RunSpec, StageSpec
from controller.errors import Conflict, Forbidden, InvalidInput, NotFound
from controller.services import machines, owners, pools, repos
from controller.services.runtime import Controller
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.models import (
    FINISHED_RUN_STATUSES,
    ApiToken,
    Event,
    Machine,
    Role,
    Run,
    RunStatus,
    Stage,
    StageStatus,
    utcnow,
)
from evidence import store, verdicts

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- creating and reading runs


def check_agents(spec: RunSpec) -> None:
    known = sorted(registry.AGENTS)
    for stage in spec.stages:
        if stage.agent not in registry.AGENTS:
            raise InvalidInput(
                f"stage {stage.name!r} names unknown agent {stage.agent!r}; "
                f"known agents: {', '.join(known)}"
            )


@dataclass(frozen=True)
class RunView:
    """A run as the API shows it: its stages, its verdict, whether it is closed, and (for
    one run) its events."""

    run: Run
    stages: list[Stage]
    verdict: verdicts.VerdictState
    closed: bool
    events: list[Event] = field(default_factory=list)
    checklist: list[verdicts.Criterion] = field(default_factory=list)
    """The run's verification criteria (``evidence.verdicts.checklist``)."""


def create_run(*, ctl: Controller, spec: RunSpec, caller: ApiToken | None) -> RunView:
    """Check everything that can be checked up front, then queue the run.

    The repo policy: a run naming a pool of a repo takes the pool's repo (which ops
    named); otherwise an agent may name a local path only under ``SHOPFLOOR_REPO_ROOTS``
    (403 when it is unset), and nobody one in the engine's or the controller's data.
    """
    check_agents(spec)
    ref = repos.check_ref(spec.ref) if spec.ref else "HEAD"
    repo = ""
    if not spec.pool:
        repo = _own_repo(ctl, spec.repo, caller)
        machines.make_spec(ctl=ctl, template=MachineTemplate(repo=repo, ref=ref))
    with unit_of_work(ctl.db) as tx:
        if spec.pool:
            repo = _pool_repo(ctl, tx, spec.pool, spec.repo, caller)
        run = Run(
            task=spec.task,
            repo=repo,
            ref=ref,
            pool=spec.pool,
            created_by=caller.id if caller else None,
        )
        tx.add(run)
        for position, stage_spec in enumerate(spec.stages):
            tx.add(
                Stage(
                    run_id=run.id,
                    position=position,
                    name=stage_spec.name,
                    agent=stage_spec.agent,
                    params=dict(stage_spec.with_),
                    timeout_s=stage_spec.timeout_s,
                    retries=stage_spec.retries,
                    fork=_fork_of(stage_spec),
                )
            )
        events.record(
            tx,
            "run.created",
            run.id,
            repo=repo,
            ref=ref,
            pool=spec.pool,
            stages=[s.name for s in spec.stages],
        )
        tx.flush()
        return _view(tx, run)


def _fork_of(spec: StageSpec) -> dict[str, Any]:
    if spec.fork is None:
        return {}
    select = spec.select or "tests"
    return {
        "count": spec.fork,
        "select": select if isinstance(select, str) else select.model_dump(),
    }


def show_run(*, ctl: Controller, run_id: str) -> RunView:
    """One run with its events."""
    with unit_of_work(ctl.reader) as tx:
        return _view(tx, get_run(tx, run_id), with_events=True)


def list_runs(*, ctl: Controller, status: str | None = None, limit: int = 100) -> list[RunView]:
    """The newest runs first; stages and verdicts read for all of them at once."""
    with unit_of_work(ctl.reader) as tx:
        query = select(Run).order_by(col(Run.created_at).desc()).limit(limit)
        if status:
            query = query.where(Run.status == status)
        found = list(tx.exec(query))
        ids = [run.id for run in found]
        stages = verdicts.stages_for(tx, ids)
        checked = verdicts.verification_for(tx, ids)
    return [
        RunView(
            run=run,
            stages=stages[run.id],
            verdict=checked[run.id].state,
            closed=checked[run.id].closed,
            checklist=checked[run.id].checklist,
        )
        for run in found
    ]


def _view(tx: Session, run: Run, *, with_events: bool = False) -> RunView:
    stages = stages_of(tx, run.id)
    checked = verdicts.verification_for(tx, [run.id])[run.id]
    return RunView(
        run=run,
        stages=stages,
        verdict=checked.state,
        closed=checked.closed,
        events=events_of(tx, run, stages) if with_events else [],
        checklist=checked.checklist,
    )


def _own_repo(ctl: Controller, value: str, caller: ApiToken | None) -> str:
    """A repo the run names itself (no pool, or a pool without a repo), under the policy."""
    agent = caller is not None and caller.role != Role.ops
    if agent and not ctl.settings.repo_roots.strip() and repos.local_text(value) is not None:
        raise Forbidden(  # before the path is looked at: no answer says what the host holds
            "an agent may not name a local path as a repo: use a URL, or a pool of that repo "
            "(ops put pools), or ask ops to allow a folder with SHOPFLOOR_REPO_ROOTS"
        )
    return machines.repo_source(provider=ctl.provider, settings=ctl.settings, value=value).value


def _pool_repo(
    ctl: Controller, tx: Session, pool_name: str, value: str, caller: ApiToken | None
) -> str:
    """The pool's repo, which ``value`` must name (422 otherwise)."""
    pool = pools.get_pool(tx, pool_name)
    pool_repo = pool.template.get("repo")
    if not pool_repo:
        return _own_repo(ctl, value, caller)
    resolved = repos.parse_repo(pool_repo, roots=[]).value
    if not repos.same_repo(value, pool_repo, resolved):
        raise InvalidInput(
            f"pool {pool_name!r} holds checkouts of {pool_repo}, not {value}; "
            "pick a pool of this repo or leave pool out"
        )
    return resolved


def get_run(tx: Session, run_id: str) -> Run:
    run = tx.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    return run


def get_stage(tx: Session, run_id: str, name: str) -> Stage:
    stage = tx.exec(
        select(Stage).where(col(Stage.run_id) == run_id, col(Stage.name) == name)
    ).first()
    if stage is None:
        raise NotFound(f"run {run_id} has no stage {name!r}")
    return stage


def stages_of(tx: Session, run_id: str) -> list[Stage]:
    return list(tx.exec(select(Stage).where(Stage.run_id == run_id).order_by(col(Stage.position))))


def events_of(tx: Session, run: Run, stages: list[Stage], limit: int = 500) -> list[Event]:
    subjects = [run.id, *(s.id for s in stages)]
    query = (
        select(Event)
        .where(col(Event.subject_id).in_(subjects))
        .order_by(col(Event.id))
        .limit(limit)
    )
    return list(tx.exec(query))


def check_creator(run: Run, caller: ApiToken | None, action: str) -> None:
    """Only the API token that created the run, or an ops token, may ``action`` it."""
    if caller is None or caller.role == Role.ops or run.created_by == caller.id:
        return
    raise Forbidden(
        f"run {run.id} was created by another API token; only that token or an ops token "
        f"may {action}"
    )


def cancel_run(*, ctl: Controller, run_id: str, caller: ApiToken | None) -> RunView:
    """Queued runs end at once; running ones are stopped by their driver within a second.
    Only the run's creator or ops may (``caller`` None: the controller itself)."""
    with unit_of_work(ctl.db) as tx:
        run = get_run(tx, run_id)
        check_creator(run, caller, "cancel it")
        if run.status in FINISHED_RUN_STATUSES:
            raise Conflict(f"run {run_id} already ended ({run.status.value})", state=run.status)
        run.cancel_requested = True
        tx.add(run)
        events.record(tx, "run.cancel_requested", run.id)
        if run.status == RunStatus.queued:
            end_run(tx, run, RunStatus.cancelled, "cancelled before it started")
        tx.flush()
        return _view(tx, run)


def end_run(tx: Session, run: Run, status: RunStatus, reason: str | None) -> None:
    run.status, run.reason, run.finished_at = status, reason, utcnow()
    tx.add(run)
    for stage in stages_of(tx, run.id):
        if stage.status in (StageStatus.pending, StageStatus.running):
            stage.status = (
                StageStatus.cancelled if status == RunStatus.cancelled else StageStatus.skipped
            )
            stage.finished_at = stage.finished_at or run.finished_at
            tx.add(stage)
            events.record(tx, "stage.state", stage.id, run_id=run.id, state=stage.status)
    events.record(tx, "run.finished", run.id, status=status.value, reason=reason)
    if status == RunStatus.passed:
        owners.verdict_waiting_in(tx, run=run)


def finish_run(
    *,
    ctl: Controller,
    run_id: str,
    status: RunStatus,
    reason: str | None,
    driver: str | None = None,
) -> None:
    """End a run that has not ended yet, skipping or cancelling its unfinished stages;
    ``driver``: only if that driver still holds the run (:class:`ClaimLost` otherwise)."""
    with unit_of_work(ctl.db) as tx:
        if driver is not None:
            hold_claim(tx, run_id, driver=driver, ttl_s=ctl.settings.run_claim_ttl_s)
        run = get_run(tx, run_id)
        if run.status not in FINISHED_RUN_STATUSES:
            end_run(tx, run, status, reason)


def save_artifact(
    *,
    ctl: Controller,
    run_id: str,
    stage: str,
    attempt: int,
    machine: Machine,
    kind: str,
    name: str,
    data: bytes,
    content_type: str | None,
    meta: dict[str, Any],
) -> None:
    """Hand one piece of evidence to the evidence store, in its own transaction."""
    attributes = {
        "run.id": run_id,
        "stage.name": stage,
        "stage.attempt": attempt,
        "machine.id": machine.id,
        "commit": machine.commit,
        "artifact.kind": kind,
        "artifact.name": name,
        "artifact.bytes": len(data),
    }
    with ctl.tracing.span("evidence.upload", attributes, run_id=run_id), unit_of_work(ctl.db) as tx:
        store.save_artifact(
            tx=tx,
            store=store.ArtifactStore.from_settings(ctl.settings),
            run_id=run_id,
            stage=stage,
            attempt=attempt,
            machine_id=machine.id,
            commit=machine.commit,
            kind=kind,
            name=name,
            data=data,
            content_type=content_type,
            meta=meta,
        )


# ---------------------------------------------------------------- who drives a run


class ClaimLost(Conflict):
    """Another driver took the run over (this one stopped heartbeating): stop, write nothing."""

    code = "run_claim_lost"


def claim_in(tx: Session, run: Run, *, driver: str, ttl_s: float) -> str | None:
    """Claim ``run`` for ``driver`` unless another driver's claim is alive; answer the
    previous driver when it is taken over. Raises :class:`ClaimLost` when it is not free."""
    now = utcnow()
    previous = run.driver
    alive = run.driver_expires_at is not None and run.driver_expires_at > now
    if previous not in (None, driver) and alive:
        raise ClaimLost(f"run {run.id} is driven by {previous}")
    run.driver, run.driver_expires_at = driver, now + timedelta(seconds=ttl_s)
    tx.add(run)
    if previous not in (None, driver):
        events.record(tx, "run.claimed", run.id, driver=driver, previous=previous)
    return previous if previous != driver else None


def set_policy(*, ctl: Controller, run_id: str, policy: dict[str, Any], driver: str) -> None:
    """Keep the repo's policy on the run (read by its driver when the run starts)."""
    with unit_of_work(ctl.db) as tx:
        hold_claim(tx, run_id, driver=driver, ttl_s=ctl.settings.run_claim_ttl_s)
        run = get_run(tx, run_id)
        run.policy = policy
        tx.add(run)
        events.record(tx, "run.policy", run.id, **policy)


def fail_stage(*, ctl: Controller, stage_id: str, summary: str, driver: str) -> None:
    """A stage that failed before its agent could start (its repo's policy is wrong)."""
    with unit_of_work(ctl.db) as tx:
        stage = tx.get(Stage, stage_id)
        if stage is None:
            raise NotFound(f"stage {stage_id} does not exist")
        hold_claim(tx, stage.run_id, driver=driver, ttl_s=ctl.settings.run_claim_ttl_s)
        now = utcnow()
        stage.status, stage.summary = StageStatus.failed, summary
        stage.started_at, stage.finished_at = stage.started_at or now, now
        tx.add(stage)
        events.record(tx, "stage.state", stage.id, run_id=stage.run_id, state=stage.status)
        owners.stage_failed_in(tx, run=get_run(tx, stage.run_id), stage=stage)


def hold_claim(tx: Session, run_id: str, *, driver: str, ttl_s: float) -> None:
    """Extend ``driver``'s claim on the run inside ``tx`` (a heartbeat, and the fence of the
    driver's writes in the same transaction): :class:`ClaimLost` if it is not its any more."""
    renewed = tx.connection().execute(
        update(Run)
        .where(col(Run.id) == run_id, col(Run.driver) == driver)
        .values(driver_expires_at=utcnow() + timedelta(seconds=ttl_s))
    )
    if renewed.rowcount != 1:
        raise ClaimLost(f"run {run_id} was taken over by another driver")


def drop_claim(*, ctl: Controller, run_id: str, driver: str) -> None:
    """A controller stopping lets another take the run over at once."""
    with unit_of_work(ctl.db) as tx:
        tx.connection().execute(
            update(Run)
            .where(col(Run.id) == run_id, col(Run.driver) == driver)
            .values(driver_expires_at=utcnow())
        )
