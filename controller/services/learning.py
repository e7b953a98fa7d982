"""Flow learning: failure signatures, the fixes that closed them, machine health, lessons.

The run driver hands every finished stage attempt to :func:`observe_attempt` (its own
transaction, after the agent ran). A failed attempt gets a signature
(``evidence.signatures``: a hash of what failed, with its class) counted per repo and stage,
and a hit (run, stage, attempt, machine). A passed attempt links the repo's open signatures
of that stage, seen in other runs, to the passing run as their fix (``fixed_by``, with the
start of its review diff). An infra-class failure may quarantine its machine
(:func:`evidence.signatures.quarantine_verdict`): the machine is never leased again until
ops unquarantine it, its pool makes a replacement and the driver moves the run.

Learning never fails a run: :func:`observe_attempt` and :func:`lessons_for` log what went
wrong and answer nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlmodel import Session, col, select

from controller.domain import CaseHealth
from controller.errors import Conflict, ShopfloorError
from controller.services import flaky, leases, machines, owners
from controller.services.runtime import Controller
from controller.store import events
from controller.store import learning as learning_rows
from controller.store.db import unit_of_work
from controller.store.models import (
    Artifact,
    ArtifactKind,
    FailureSignature,
    Lease,
    LeaseState,
    Machine,
    MachineState,
    Pool,
    Run,
    SignatureHit,
    Stage,
    StageStatus,
    utcnow,
)
from controller.store.rawsql import transaction
from evidence import junit, store
from evidence.lessons import render_markdown
from evidence.signatures import (
    AttemptFacts,
    AttemptRecord,
    Quarantine,
    Signature,
    quarantine_verdict,
    signature_of,
)

log = logging.getLogger(__name__)

DIFF_EXCERPT_CHARS = 2000
RUNS_LISTED = 50
"""Runs listed per signature in the API (the newest)."""


@dataclass(frozen=True)
class Learned:
    """What one attempt taught: its signature (failed attempts), the machine it benched."""

    signature: Signature | None = None
    quarantined: Quarantine | None = None
    fixed: list[str] = field(default_factory=list)
    """Signatures this (passed) attempt closed."""


@dataclass(frozen=True)
class FailureView:
    row: FailureSignature
    runs: list[str]


# ---------------------------------------------------------------- recording


def observe_attempt(
    *,
    ctl: Controller,
    run_id: str,
    stage: str,
    attempt: int,
    machine_id: str | None,
    passed: bool,
    facts: AttemptFacts | None = None,
    repo: str | None = None,
) -> Learned:
    """Learn from one finished attempt; never raises (a run must not fail for learning).
    ``repo``: the run's, when the caller knows it (one read less on every passed attempt)."""
    if not ctl.settings.learning:
        return Learned()
    try:
        if passed:
            return Learned(fixed=_record_pass(ctl, run_id, stage, repo))
        assert facts is not None
        return _record_failure(ctl, run_id, stage, attempt, machine_id, facts)
    except Exception:  # noqa: BLE001 - logged; learning is a courtesy to the next runs
        log.exception("learning from run %s stage %s attempt %s failed", run_id, stage, attempt)
        return Learned()


def _record_failure(
    ctl: Controller,
    run_id: str,
    stage: str,
    attempt: int,
    machine_id: str | None,
    facts: AttemptFacts,
) -> Learned:
    reports = _junit_reports(ctl, run_id, stage, attempt)
    found = signature_of(
        AttemptFacts(
            stage=facts.stage,
            summary=facts.summary,
            log=facts.log,
            reports=reports or facts.reports,
            machine_lost=facts.machine_lost,
            timed_out=facts.timed_out,
            error_type=facts.error_type,
            exit_codes=facts.exit_codes,
        )
    )
    now = utcnow()
    verdict: Quarantine | None = None
    with unit_of_work(ctl.db) as tx:
        run = tx.get(Run, run_id)
        if run is None:
            return Learned()
        row = tx.exec(
            select(FailureSignature).where(
                FailureSignature.signature == found.signature,
                FailureSignature.repo == run.repo,
                FailureSignature.stage == stage,
            )
        ).first()
        new = row is None
        row = row or FailureSignature(
            signature=found.signature,
            kind=found.kind,
            repo=run.repo,
            stage=stage,
            first_seen=now,
            normalized=found.normalized,
        )
        reopened = row.fixed_by is not None and not row.open
        row.count += 1
        row.last_seen, row.sample, row.kind = now, found.sample, found.kind
        tx.add(row)
        tx.add(
            SignatureHit(
                signature=found.signature,
                kind=found.kind,
                repo=run.repo,
                run_id=run_id,
                stage=stage,
                attempt=attempt,
                machine_id=machine_id,
                at=now,
            )
        )
        events.record(
            tx,
            "learning.signature",
            found.signature,
            run_id=run_id,
            repo=run.repo,
            stage=stage,
            attempt=attempt,
            failure_kind=found.kind,
            count=row.count,
            new=new,
            reopened=reopened,
            machine_id=machine_id,
        )
        owner = owners.owner_for(tx, run, stage)
        if owner and (new or reopened or row.count > 1):
            owners.notify_in(
                tx,
                owner=owner,
                kind="signature_new" if new else "signature_recurring",
                subject=found.signature,
                data={
                    "repo": run.repo,
                    "stage": stage,
                    "kind": found.kind,
                    "count": row.count,
                    "sample": found.sample[:500],
                },
                run_id=run_id,
                stage=stage,
            )
        if found.kind == "infra" and machine_id and ctl.settings.quarantine_after > 0:
            tx.flush()
            verdict = _quarantine_if_due(tx, ctl, machine_id, run.repo, run_id)
    if verdict is not None:
        leases.runtime(ctl).notify()  # waiters look again (the pool makes a replacement)
    return Learned(signature=found, quarantined=verdict)


def _junit_reports(ctl: Controller, run_id: str, stage: str, attempt: int) -> list[junit.Report]:
    """The attempt's JUnit reports from the evidence store (unreadable ones are skipped)."""
    with unit_of_work(ctl.reader) as tx:
        found = tx.exec(
            select(Artifact.sha256).where(
                Artifact.run_id == run_id,
                Artifact.stage == stage,
                Artifact.attempt == attempt,
                Artifact.kind == ArtifactKind.junit,
            )
        ).all()
    blobs = store.ArtifactStore.from_settings(ctl.settings)
    reports = []
    for sha256 in found:
        try:
            reports.append(
                junit.parse_junit(blobs.get(sha256), max_bytes=ctl.settings.junit_cap_bytes)
            )
        except ShopfloorError as exc:
            log.info("JUnit %s of run %s not used for its signature: %s", sha256, run_id, exc)
    return reports


def _quarantine_if_due(
    tx: Session, ctl: Controller, machine_id: str, repo: str, run_id: str
) -> Quarantine | None:
    now = utcnow()
    window = timedelta(seconds=ctl.settings.quarantine_window_s)
    since = now - window
    hits = tx.exec(
        select(SignatureHit).where(
            SignatureHit.machine_id == machine_id,
            SignatureHit.kind == "infra",
            col(SignatureHit.at) >= since,
        )
    ).all()
    attempts = [
        AttemptRecord(h.machine_id or "", h.stage, False, h.at, h.kind, h.signature) for h in hits
    ]
    stages = sorted({h.stage for h in hits})
    passes = tx.exec(
        select(Stage.machine_id, Stage.name, Stage.finished_at)
        .join(Run, col(Run.id) == col(Stage.run_id))
        .where(
            Run.repo == repo,
            Stage.status == StageStatus.passed,
            col(Stage.name).in_(stages),
            col(Stage.machine_id) != machine_id,
            col(Stage.finished_at) >= since,
        )
    ).all()
    attempts += [AttemptRecord(m or "", name, True, at) for m, name, at in passes if m and at]
    verdict = quarantine_verdict(
        attempts,
        machine_id=machine_id,
        now=now,
        threshold=ctl.settings.quarantine_after,
        window=window,
    )
    machine = tx.get(Machine, machine_id)
    if verdict is None or machine is None:
        return None
    if machine.state not in (MachineState.ready, MachineState.leased):
        return None  # lost, destroyed or quarantined already
    machines.set_state(tx, machine, MachineState.quarantined, verdict.reason)
    events.record(
        tx,
        "machine.quarantined",
        machine_id,
        reason=verdict.reason,
        signature=verdict.signature,
        count=verdict.count,
        stages=list(verdict.stages),
        passed_elsewhere=list(verdict.passed_elsewhere),
        run_id=run_id,
    )
    run = tx.get(Run, run_id)
    owner = owners.pool_owner(tx, machine.pool) or (
        owners.owner_for(tx, run, None) if run else None
    )
    if owner:
        owners.notify_in(
            tx,
            owner=owner,
            kind="machine_quarantined",
            subject=machine_id,
            data={"reason": verdict.reason, "signature": verdict.signature},
            run_id=run_id,
        )
    log.warning("machine %s %s", machine_id, verdict.reason)
    return verdict


def _record_pass(ctl: Controller, run_id: str, stage: str, repo: str | None) -> list[str]:
    """Link the open signatures of this repo's stage, seen in other runs, to this run.
    Nearly every pass finds none: that answer is one plain statement (``store.learning``)."""
    if repo is None:
        with unit_of_work(ctl.reader) as tx:
            run = tx.get(Run, run_id)
            if run is None:
                return []
            repo = run.repo
    with transaction(ctl.reader, write=False) as raw:
        if not learning_rows.open_elsewhere(raw, repo=repo, stage=stage, run_id=run_id):
            return []
    with unit_of_work(ctl.reader) as tx:
        diff = tx.exec(
            select(Artifact.sha256)
            .where(
                Artifact.run_id == run_id,
                Artifact.kind == ArtifactKind.diff,
                Artifact.stage == "review",
            )
            .order_by(col(Artifact.created_at).desc())
        ).first()
    excerpt = None
    if diff is not None:
        try:
            data = store.ArtifactStore.from_settings(ctl.settings).get(diff)
            excerpt = data[:DIFF_EXCERPT_CHARS].decode("utf-8", errors="replace")
        except ShopfloorError as exc:
            log.info("diff of run %s not kept as a fix: %s", run_id, exc.message)
    fixed: list[str] = []
    now = utcnow()
    with unit_of_work(ctl.db) as tx:
        for row in _open_elsewhere(tx, repo, stage, run_id):
            row.fixed_by, row.fixed_at, row.fix_excerpt = run_id, now, excerpt
            tx.add(row)
            events.record(
                tx,
                "learning.fixed",
                row.signature,
                run_id=run_id,
                repo=row.repo,
                stage=stage,
                failure_kind=row.kind,
                count=row.count,
            )
            fixed.append(row.signature)
    return fixed


def _open_elsewhere(tx: Session, repo: str, stage: str, run_id: str) -> list[FailureSignature]:
    """Open signatures of the repo's stage that this run did not hit itself (a pass after
    the run's own failure is a retry, not a fix). Closed ones stay in the database: every
    passed attempt asks, and a repo's history of fixed failures only grows."""
    own = select(SignatureHit.signature).where(
        SignatureHit.run_id == run_id, SignatureHit.stage == stage
    )
    fixed_at = col(FailureSignature.fixed_at)
    rows = tx.exec(
        select(FailureSignature).where(
            FailureSignature.repo == repo,
            FailureSignature.stage == stage,
            fixed_at.is_(None) | (col(FailureSignature.last_seen) > fixed_at),
            col(FailureSignature.signature).not_in(own),
        )
    ).all()
    return [row for row in rows if row.open]


def exit_codes(outputs: dict[str, Any]) -> list[int | None]:
    """The exit codes an agent reported in its outputs (``exit_codes`` or ``exit_code``)."""
    if "exit_codes" in outputs:
        found = outputs["exit_codes"]
    elif "exit_code" in outputs:
        found = [outputs["exit_code"]]
    else:
        return []
    codes = found if isinstance(found, list) else [found]
    return [code if isinstance(code, int) else None for code in codes]


# ---------------------------------------------------------------- reading


def list_failures(
    *,
    ctl: Controller,
    repo: str | None = None,
    stage: str | None = None,
    kind: str | None = None,
    limit: int = 200,
) -> list[FailureView]:
    """Signatures, most frequent first, each with the runs that hit it (newest first)."""
    query = select(FailureSignature)
    if repo:
        query = query.where(FailureSignature.repo == repo)
    if stage:
        query = query.where(FailureSignature.stage == stage)
    if kind:
        query = query.where(FailureSignature.kind == kind)
    query = query.order_by(
        col(FailureSignature.count).desc(), col(FailureSignature.last_seen).desc()
    ).limit(limit)
    with unit_of_work(ctl.reader) as tx:
        rows = list(tx.exec(query))
        return [FailureView(row, _runs_of(tx, row)) for row in rows]


def _runs_of(tx: Session, row: FailureSignature) -> list[str]:
    found = tx.exec(
        select(SignatureHit.run_id)
        .where(
            SignatureHit.signature == row.signature,
            SignatureHit.repo == row.repo,
            SignatureHit.stage == row.stage,
        )
        .order_by(col(SignatureHit.at).desc())
    )
    runs: list[str] = []
    for run_id in found:
        if run_id not in runs:
            runs.append(run_id)
        if len(runs) >= RUNS_LISTED:
            break
    return runs


# ---------------------------------------------------------------- lessons


LESSONS_MD = "lessons.md"
LESSONS_JSON = "lessons.json"
LESSONS_SCANNED = 500
"""Signatures of a repo a run's lessons choose from (the most frequent)."""


def lessons_for(
    *, ctl: Controller, repo: str, known: list[CaseHealth] | None = None
) -> dict[str, Any] | None:
    """What the factory knows about ``repo`` for a new run's handoff folder (``lessons.json``;
    :func:`evidence.lessons.render_markdown` makes ``lessons.md``). None when learning is off
    or failed (logged). ``known``: the repo's known flaky tests, when the caller read them
    already (the driver does, for the tester)."""
    if not ctl.settings.learning:
        return None
    limit = ctl.settings.lessons_limit
    try:
        with transaction(ctl.reader, write=False) as raw:
            signatures = learning_rows.repo_signatures(raw, repo=repo, limit=LESSONS_SCANNED)
        flaky_tests = [
            {"test": t.test, "state": t.state, "score": round(t.score, 4)}
            for t in (flaky.known_flaky(ctl=ctl, repo=repo) if known is None else known)
        ]
        fixed = sorted(
            (row for row in signatures if row.fixed_by is not None),
            key=lambda row: row.fixed_at or row.last_seen,
            reverse=True,
        )
        return {
            "repo": repo,
            "generated_at": utcnow().isoformat(),
            "open_failures": [_failure_doc(row) for row in signatures if row.open][:limit],
            "fixes": [
                {
                    **_failure_doc(row),
                    "fixed_by": row.fixed_by,
                    "diff_excerpt": (row.fix_excerpt or "")[:800] or None,
                }
                for row in fixed[:limit]
            ],
            "flaky_tests": [t for t in flaky_tests if t["state"] != "quarantined"],
            "quarantined_tests": [t for t in flaky_tests if t["state"] == "quarantined"],
        }
    except Exception:  # noqa: BLE001 - a run starts without lessons rather than not at all
        log.exception("lessons for %s could not be gathered", repo)
        return None


def lessons_files(doc: dict[str, Any]) -> dict[str, str]:
    """The two files of the handoff folder, by name."""
    return {LESSONS_JSON: json.dumps(doc, indent=2), LESSONS_MD: render_markdown(doc)}


def _failure_doc(row: FailureSignature) -> dict[str, Any]:
    return {
        "signature": row.signature,
        "kind": row.kind,
        "stage": row.stage,
        "count": row.count,
        "last_seen": row.last_seen.isoformat(),
        "sample": row.sample,
    }


# ---------------------------------------------------------------- machine health


def unquarantine(*, ctl: Controller, machine_id: str) -> Machine:
    """Return a quarantined machine to service: ``leased`` if a lease on it is still active
    (its holder keeps it), otherwise ``ready`` — after a reset when its pool cleans machines
    between leases (the run that was moved off it left its workspace), with a new fence so
    no secret of before works."""
    with unit_of_work(ctl.reader) as tx:
        machine = machines.get_machine(tx, machine_id)
        _check_quarantined(machine)
        active = _active_lease(tx, machine_id)
        pool = tx.get(Pool, machine.pool) if machine.pool else None
    if active is None and pool is not None and pool.reset != "keep":
        machines.reset_machine(
            db=ctl.db,
            provider=ctl.provider,
            settings=ctl.settings,
            access=ctl.access,
            machine_id=machine_id,
            allowed=(MachineState.quarantined,),
        )
    with unit_of_work(ctl.db) as tx:
        machine = machines.get_machine(tx, machine_id)
        _check_quarantined(machine)
        was = machine.reason
        leased = _active_lease(tx, machine_id) is not None
        if not leased:
            machine.fence += 1
        target = MachineState.leased if leased else MachineState.ready
        machines.set_state(tx, machine, target)
        events.record(tx, "machine.unquarantined", machine_id, state=target.value, was=was)
    if not leased:
        ctl.access.close_machine(machine=machine, why="the machine was unquarantined")
        leases.runtime(ctl).notify()
    return machine


def _check_quarantined(machine: Machine) -> None:
    if machine.state != MachineState.quarantined:
        raise Conflict(
            f"machine {machine.id} is {machine.state.value}, not quarantined",
            state=machine.state.value,
        )


def _active_lease(tx: Session, machine_id: str) -> Lease | None:
    return tx.exec(
        select(Lease).where(Lease.machine_id == machine_id, Lease.state == LeaseState.active)
    ).first()
