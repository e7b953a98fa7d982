"""Verdicts close the loop: a reviewer approves or rejects a finished run, once.

``checklist`` turns a run's verification policy (the repo's ``.shopfloor.toml``
``[verify]``, kept on the run as ``Run.policy``) into criteria, each met, not met or only
informational (``None``); ``is_closed`` is the one place that says whether a run is done:
no criterion is unmet. Approval is also the only thing that moves the screenshot baselines.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

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


@dataclass(frozen=True)
class Criterion:
    """One line of a run's checklist: ``met`` is None when it only informs (or cannot be
    judged yet, e.g. no screenshots)."""

    criterion: str
    met: bool | None
    detail: str


@dataclass(frozen=True)
class Verification:
    state: VerdictState
    checklist: list[Criterion]

    @property
    def closed(self) -> bool:
        return is_closed(self.checklist)

    @property
    def open(self) -> list[Criterion]:
        return [c for c in self.checklist if c.met is False]


def flaky_facts(stages: Sequence[Stage]) -> dict[str, Any] | None:
    """What the run's test stages said of flaky tests (the tester's outputs): failures that
    passed on its rerun, and quarantined failures it let through. None: no test stage
    reported either (no flaky-test data)."""
    recovered: list[str] = []
    quarantined: list[str] = []
    seen = False
    for stage in stages:
        outputs = stage.outputs or {}
        if "passed_on_retry" in outputs or "quarantined" in outputs or "failed" in outputs:
            seen = True
        recovered += [str(t) for t in outputs.get("passed_on_retry") or []]
        quarantined += [str(t) for t in outputs.get("quarantined") or []]
    if not seen:
        return None
    return {"flaky_failures": recovered, "quarantined": quarantined}


def verify_policy(policy: dict[str, Any] | None) -> dict[str, Any]:
    """The ``[verify]`` table of a run's policy with the defaults of
    ``agents.config.VerifyPolicy`` (which checked it when the run started)."""
    given = (policy or {}).get("verify") or {}
    return {
        "required_stages": given.get("required_stages"),
        "approvals": int(given.get("approvals", 1)),
        "max_changed_pixels": given.get("max_changed_pixels"),
        "console_errors": given.get("console_errors", "warn"),
        "flaky": given.get("flaky", "fail"),
    }


def checklist(
    *,
    policy: dict[str, Any] | None,
    stages: Sequence[Stage],
    verdicts: Sequence[Verdict],
    screenshots: Sequence[Artifact] = (),
    flaky: dict[str, Any] | None = None,
) -> list[Criterion]:
    """The run's criteria under its policy (defaults when the run has none yet)."""
    rules = verify_policy(policy)
    return [
        _stages_criterion(stages, rules["required_stages"]),
        _approvals_criterion(verdicts, rules["approvals"]),
        _pixels_criterion(screenshots, rules["max_changed_pixels"]),
        _console_criterion(screenshots, rules["console_errors"]),
        _flaky_criterion(flaky, rules["flaky"]),
    ]


def is_closed(items: Sequence[Criterion]) -> bool:
    """Done means: every criterion of the checklist is met (informational ones aside)."""
    return bool(items) and all(item.met is not False for item in items)


def _stages_criterion(stages: Sequence[Stage], named: list[str] | None) -> Criterion:
    if named is None:
        required = [s for s in stages if is_required(s)]
        what = "every required stage"
    else:
        by_name = {s.name: s for s in stages}
        missing = [name for name in named if name not in by_name]
        if missing:
            return Criterion(
                "required stages passed", False, f"the run has no stage {', '.join(missing)}"
            )
        required = [by_name[name] for name in named]
        what = ", ".join(named)
    if not required:
        return Criterion("required stages passed", False, "the run has no required stage")
    waiting = [f"{s.name} ({s.status.value})" for s in required if s.status != StageStatus.passed]
    if waiting:
        return Criterion("required stages passed", False, "not passed: " + ", ".join(waiting))
    return Criterion("required stages passed", True, f"passed: {what}")


def _approvals_criterion(verdicts: Sequence[Verdict], needed: int) -> Criterion:
    approving = sum(1 for v in verdicts if v.decision == Decision.approve)
    rejected = any(v.decision == Decision.reject for v in verdicts)
    detail = f"{approving} of {needed} approval(s)"
    if rejected:
        return Criterion("approvals", False, detail + "; rejected")
    return Criterion("approvals", approving >= needed, detail)


def _newest_per_page(screenshots: Sequence[Artifact]) -> dict[str, Artifact]:
    newest: dict[str, Artifact] = {}
    for shot in sorted(screenshots, key=lambda a: (a.created_at, a.id)):
        newest[str(shot.facts.get("page") or shot.meta.get("page") or shot.name)] = shot
    return newest


def _pixels_criterion(screenshots: Sequence[Artifact], limit: float | None) -> Criterion:
    name = "changed pixels"
    pages = _newest_per_page(screenshots)
    if not pages:
        return Criterion(name, None, "no screenshots")
    changed = {
        page: float((shot.facts.get("comparison") or {}).get("changed_share", 0.0))
        for page, shot in pages.items()
    }
    new = [p for p, s in pages.items() if not s.facts.get("comparison")]
    worst_page = max(changed, key=lambda p: changed[p])
    worst = changed[worst_page]
    detail = f"largest change {worst:.2%} ({worst_page}) on {len(pages)} page(s)"
    if new:
        detail += f"; no baseline yet: {', '.join(sorted(new))}"
    if limit is None:
        return Criterion(name, None, detail + "; no limit set")
    over = sorted(p for p, share in changed.items() if share > limit)
    if over:
        return Criterion(name, False, f"{detail}; over {limit:.2%}: {', '.join(over)}")
    return Criterion(name, True, f"{detail}; limit {limit:.2%}")


def _console_criterion(screenshots: Sequence[Artifact], rule: str) -> Criterion:
    name = "console errors"
    pages = _newest_per_page(screenshots)
    if not pages:
        return Criterion(name, None, "no pages captured")
    noisy = {p: len(s.meta.get("console_errors") or []) for p, s in pages.items()}
    noisy = {p: n for p, n in noisy.items() if n}
    if not noisy:
        return Criterion(name, True, f"none on {len(pages)} page(s)")
    detail = ", ".join(f"{p}: {n}" for p, n in sorted(noisy.items()))
    if rule == "fail":
        return Criterion(name, False, detail)
    return Criterion(name, None, f'{detail} (console_errors = "warn": shown only)')


def _flaky_criterion(facts: dict[str, Any] | None, rule: str) -> Criterion:
    name = "flaky tests"
    if not facts:
        return Criterion(name, None, "no flaky-test data")
    flaky = list(facts.get("flaky_failures") or [])
    quarantined = list(facts.get("quarantined") or [])
    if not flaky:
        extra = f"; quarantined: {', '.join(quarantined)}" if quarantined else ""
        return Criterion(name, True, "no flaky failures" + extra)
    detail = "flaky failures: " + ", ".join(flaky)
    if rule == "quarantine":
        return Criterion(name, None, detail + " (quarantined: shown only)")
    return Criterion(name, False, detail)


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


def screenshots_for(tx: Session, run_ids: Iterable[str]) -> dict[str, list[Artifact]]:
    ids = list(set(run_ids))
    grouped: dict[str, list[Artifact]] = {run_id: [] for run_id in ids}
    if not ids:
        return grouped
    query = select(Artifact).where(
        col(Artifact.run_id).in_(ids), Artifact.kind == ArtifactKind.screenshot
    )
    for shot in tx.exec(query):
        grouped[shot.run_id].append(shot)
    return grouped


def verification_for(tx: Session, run_ids: Iterable[str]) -> dict[str, Verification]:
    """Verdict state and checklist per run, in five queries whatever the number of runs."""
    ids = list(set(run_ids))
    if not ids:
        return {}
    policies: dict[str, dict[str, Any] | None] = {}
    for run_id, policy in tx.exec(select(Run.id, Run.policy).where(col(Run.id).in_(ids))):
        policies[run_id] = dict(policy) if policy is not None else None
    given = verdicts_for(tx, ids)
    stages = stages_for(tx, ids)
    shots = screenshots_for(tx, ids)
    found: dict[str, Verification] = {}
    for run_id in ids:
        verdict = given.get(run_id)
        found[run_id] = Verification(
            state=verdict_state(verdict),
            checklist=checklist(
                policy=policies.get(run_id),
                stages=stages[run_id],
                verdicts=[verdict] if verdict else [],
                screenshots=shots[run_id],
                flaky=flaky_facts(stages[run_id]),
            ),
        )
    return found


def closed_for(tx: Session, run_ids: Iterable[str]) -> dict[str, tuple[VerdictState, bool]]:
    """(verdict state, closed) per run, in a fixed number of queries."""
    return {
        run_id: (found.state, found.closed)
        for run_id, found in verification_for(tx, run_ids).items()
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
