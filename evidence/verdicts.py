"""Verdicts close the loop: a reviewer approves or rejects a finished run, once.

``is_closed`` is the one place that says whether a run is done: every required stage
passed and the evidence was approved. Approval is also the only thing that moves the
screenshot baselines.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import StrEnum

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from controller.errors import Conflict, InvalidInput, NotFound
from controller.store import events
from controller.store.models import (
    FINISHED_RUN_STATUSES,
    ApiToken,
    Artifact,
    ArtifactKind,
    Baseline,
    Run,
    Stage,
    StageStatus,
    Verdict,
    utcnow,
)

COMMENT_MAX = 4000


class Decision(StrEnum):
    approve = "approve"
    reject = "reject"


class VerdictState(StrEnum):
    pending = "pending"
    approved = "approved"
    rejected = "rejected"


def verdict_state(verdict: Verdict | None) -> VerdictState:
    if verdict is None:
        return VerdictState.pending
    return VerdictState.approved if verdict.decision == Decision.approve else VerdictState.rejected


def is_required(stage: Stage) -> bool:
    """Stages are required unless their ``with`` block says ``required: false``."""
    return stage.params.get("required", True) is not False


def is_closed(stages: Sequence[Stage], verdict: Verdict | None) -> bool:
    """Done means: every required stage passed and a reviewer approved the evidence."""
    required = [s for s in stages if is_required(s)]
    stages_passed = bool(required) and all(s.status == StageStatus.passed for s in required)
    return stages_passed and verdict_state(verdict) is VerdictState.approved


def verdicts_for(tx: Session, run_ids: Iterable[str]) -> dict[str, Verdict]:
    """Verdicts of many runs in one query (lists must not ask once per run)."""
    ids = list(set(run_ids))
    if not ids:
        return {}
    found = tx.exec(select(Verdict).where(col(Verdict.run_id).in_(ids)))
    return {v.run_id: v for v in found}


def stages_for(tx: Session, run_ids: Iterable[str]) -> dict[str, list[Stage]]:
    ids = list(set(run_ids))
    grouped: dict[str, list[Stage]] = {run_id: [] for run_id in ids}
    if not ids:
        return grouped
    query = select(Stage).where(col(Stage.run_id).in_(ids)).order_by(col(Stage.position))
    for stage in tx.exec(query):
        grouped[stage.run_id].append(stage)
    return grouped


def closed_for(tx: Session, run_ids: Iterable[str]) -> dict[str, tuple[VerdictState, bool]]:
    """(verdict state, closed) per run, in two queries whatever the number of runs."""
    ids = list(set(run_ids))
    verdicts = verdicts_for(tx, ids)
    stages = stages_for(tx, ids)
    return {
        run_id: (
            verdict_state(verdicts.get(run_id)),
            is_closed(stages[run_id], verdicts.get(run_id)),
        )
        for run_id in ids
    }


def give_verdict(
    *, tx: Session, run_id: str, decision: str, comment: str, reviewer: ApiToken
) -> Verdict:
    """Record the one verdict of a finished run; approval makes its screenshots the baseline."""
    try:
        chosen = Decision(decision)
    except ValueError:
        raise InvalidInput("decision must be 'approve' or 'reject'") from None
    comment = comment.strip()
    if len(comment) > COMMENT_MAX:
        raise InvalidInput(f"the comment must be at most {COMMENT_MAX} characters")
    if chosen is Decision.reject and not comment:
        raise InvalidInput("a rejection needs a comment that says what to fix")
    run = require_run(tx, run_id)
    if run.status not in FINISHED_RUN_STATUSES:
        raise Conflict(
            f"run {run_id} is still {run.status.value}; give the verdict when it has finished",
            status=run.status.value,
        )
    existing = tx.exec(select(Verdict).where(Verdict.run_id == run_id)).first()
    if existing is not None:
        raise Conflict(
            f"run {run_id} already has a verdict ({verdict_state(existing).value})",
            verdict=verdict_state(existing).value,
        )
    verdict = Verdict(
        run_id=run_id,
        decision=chosen.value,
        comment=comment,
        reviewer_token_id=reviewer.id,
        reviewer_name=reviewer.name,
    )
    tx.add(verdict)
    try:
        tx.flush()
    except IntegrityError:
        raise Conflict(f"run {run_id} already has a verdict") from None
    events.record(
        tx,
        "run.verdict",
        run_id,
        decision=chosen.value,
        reviewer=reviewer.name or reviewer.id,
        comment=comment[:200],
    )
    if chosen is Decision.approve:
        promote_baselines(tx=tx, run=run)
    return verdict


def promote_baselines(*, tx: Session, run: Run) -> list[Baseline]:
    """Each page's newest screenshot in the run becomes that page's baseline for the repo."""
    query = (
        select(Artifact)
        .where(Artifact.run_id == run.id, Artifact.kind == ArtifactKind.screenshot)
        .order_by(col(Artifact.created_at), col(Artifact.id))
    )
    newest: dict[str, Artifact] = {}
    for shot in tx.exec(query):
        newest[str(shot.facts.get("page") or shot.name)] = shot
    promoted: list[Baseline] = []
    for page, shot in newest.items():
        baseline = tx.get(Baseline, (run.repo, page)) or Baseline(
            repo=run.repo, page=page, artifact_id=shot.id, run_id=run.id, sha256=shot.sha256
        )
        baseline.artifact_id, baseline.run_id, baseline.sha256 = shot.id, run.id, shot.sha256
        baseline.approved_at = utcnow()
        tx.add(baseline)
        promoted.append(baseline)
        events.record(tx, "baseline.updated", run.id, repo=run.repo, page=page, artifact_id=shot.id)
    return promoted


def require_run(tx: Session, run_id: str) -> Run:
    run = tx.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    return run


def get_verdict(tx: Session, run_id: str) -> Verdict | None:
    return tx.exec(select(Verdict).where(Verdict.run_id == run_id)).first()
