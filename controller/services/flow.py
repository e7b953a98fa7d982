"""Flow figures: the factory's headline share, and what slows runs down.

Where the flow gets stuck (issue 13): the waits of the runs that finished in the window —
queued until their first stage started, between one stage's end and the next one's start
(per stage: the wait before it), finished until their verdict — and per owner how long
their queue's items waited (done or still open), plus what the learning services know (top
failure signatures, flaky tests, quarantined machines; hooks that answer [] until they
exist).

The headline: of the runs that finished in the window, how many went through planning,
implementation, testing and an evidence stage (review or QA), all passed, without a single
context re-creation (the run never had to move to a fresh machine).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from controller.services import flaky
from controller.services.runtime import Controller
from controller.store.db import unit_of_work
from controller.store.models import (
    FINISHED_RUN_STATUSES,
    CaseStats,
    FailureSignature,
    Lease,
    Machine,
    MachineState,
    OwnerItem,
    OwnerItemState,
    Run,
    Stage,
    StageStatus,
    Verdict,
    utcnow,
)

PHASES: dict[str, tuple[set[str], set[str]]] = {
    "plan": ({"plan", "planning"}, {"planner"}),
    "implement": ({"implement", "implementation", "code"}, {"external"}),
    "test": ({"test", "tests", "testing"}, {"tester"}),
    "evidence": ({"review", "qa"}, {"reviewer", "qa"}),
}
"""Which stages count as each phase: by stage name, or by the agent that ran it."""


def phase_of(stage: Stage) -> str | None:
    for phase, (names, agents) in PHASES.items():
        if stage.name in names or stage.agent in agents:
            return phase
    return None


def completed_flow(run: Run, stages: list[Stage]) -> bool:
    """Every phase passed on the run, and its context was never re-created."""
    passed = {phase_of(s) for s in stages if s.status == StageStatus.passed}
    return run.context_recreations == 0 and set(PHASES) <= passed


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass
class StageFigures:
    attempts: int = 0
    failures: int = 0
    retries: int = 0
    durations_ms: list[float] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "failures": self.failures,
            "retries": self.retries,
            "duration_ms_p50": percentile(self.durations_ms, 50),
            "duration_ms_p95": percentile(self.durations_ms, 95),
        }


def figures(*, ctl: Controller, window_h: float) -> dict[str, Any]:
    """:func:`flow` over the last ``window_h`` hours, read without the write lock."""
    with unit_of_work(ctl.reader) as tx:
        return flow(tx=tx, window_h=window_h)


def flow(*, tx: Session, window_h: float, now: datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    since = now - timedelta(hours=window_h)
    runs = list(
        tx.exec(
            select(Run).where(
                col(Run.status).in_(list(FINISHED_RUN_STATUSES)),
                col(Run.finished_at) >= since,
            )
        )
    )
    stages_by_run: dict[str, list[Stage]] = defaultdict(list)
    if runs:
        for stage in tx.exec(select(Stage).where(col(Stage.run_id).in_([r.id for r in runs]))):
            stages_by_run[stage.run_id].append(stage)
    numerator = sum(1 for r in runs if completed_flow(r, stages_by_run[r.id]))
    figures: dict[str, StageFigures] = defaultdict(StageFigures)
    for stage_list in stages_by_run.values():
        for stage in stage_list:
            _add_stage(figures[stage.name], stage)
    waits = [
        lease.wait_ms for lease in tx.exec(select(Lease).where(col(Lease.acquired_at) >= since))
    ]
    return {
        "window_h": window_h,
        "since": since.isoformat(),
        "headline": {
            "what": "share of finished runs that passed plan, implement, test and evidence "
            "(review or qa) with zero context re-creations",
            "numerator": numerator,
            "denominator": len(runs),
            "share": round(numerator / len(runs), 4) if runs else None,
        },
        "runs": {
            status.value: sum(1 for r in runs if r.status == status)
            for status in FINISHED_RUN_STATUSES
        },
        "context_recreations": sum(r.context_recreations for r in runs),
        "stages": {name: fig.public() for name, fig in sorted(figures.items())},
        "lease_wait_ms": {
            "count": len(waits),
            "p50": percentile(waits, 50),
            "p95": percentile(waits, 95),
        },
        "machines": utilization(tx=tx, since=since, now=now),
        "waits": stuck(tx=tx, runs=runs, stages_by_run=stages_by_run, since=since, now=now),
        "owners": owner_waits(tx=tx, since=since, now=now),
        "learning": {name: hook(tx, since) for name, hook in LEARNING.items()},
    }


Learned = Callable[[Session, datetime], list[dict[str, Any]]]


def top_signatures(tx: Session, since: datetime) -> list[dict[str, Any]]:
    """The most frequent failure signatures seen since ``since``."""
    rows = tx.exec(
        select(FailureSignature)
        .where(col(FailureSignature.last_seen) >= since)
        .order_by(col(FailureSignature.count).desc())
        .limit(10)
    )
    return [
        {
            "signature": r.signature,
            "kind": r.kind,
            "repo": r.repo,
            "stage": r.stage,
            "count": r.count,
            "open": r.open,
        }
        for r in rows
    ]


def flaky_tests(tx: Session, since: datetime) -> list[dict[str, Any]]:
    """Flaky and quarantined tests seen since ``since`` (``test``, ``repo``, ``state``,
    ``score``)."""
    rows = tx.exec(
        select(CaseStats).where(
            col(CaseStats.last_seen) >= since,
            col(CaseStats.same_tree) | (col(CaseStats.retry_passes) > 0),
        )
    )
    found: list[dict[str, Any]] = []
    for stats in rows:
        health = flaky.health(stats, quarantine=flaky.quarantines(tx, stats.repo))
        if health.state in ("flaky", "quarantined"):
            found.append(
                {
                    "test": health.test,
                    "repo": health.repo,
                    "state": health.state,
                    "score": round(health.score, 4),
                }
            )
    return sorted(found, key=lambda t: -t["score"])[:20]


def quarantined_machines(tx: Session, since: datetime) -> list[dict[str, Any]]:
    """Machines quarantined now (``machine``, ``reason``, ``since``)."""
    rows = tx.exec(select(Machine).where(Machine.state == MachineState.quarantined))
    return [{"machine": m.id, "reason": m.reason, "since": m.updated_at} for m in rows]


LEARNING: dict[str, Learned] = {
    "signatures": top_signatures,
    "flaky_tests": flaky_tests,
    "quarantined_machines": quarantined_machines,
}
"""What flow learning adds to the flow figures."""


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": _round(percentile(values, 50)),
        "p95": _round(percentile(values, 95)),
    }


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds() * 1000)


def stuck(
    *,
    tx: Session,
    runs: list[Run],
    stages_by_run: dict[str, list[Stage]],
    since: datetime,
    now: datetime,
) -> dict[str, Any]:
    """Queued -> first stage, between stages (per stage: the wait before it), finished ->
    verdict (and how many finished runs still wait, with the oldest wait)."""
    to_first: list[float] = []
    before: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        stages = sorted(stages_by_run[run.id], key=lambda s: s.position)
        started = [s for s in stages if s.started_at is not None]
        if started:
            first = min(s.started_at for s in started if s.started_at is not None)
            wait = _ms(run.created_at, first)
            if wait is not None:
                to_first.append(wait)
        for previous, stage in zip(stages, stages[1:], strict=False):
            wait = _ms(previous.finished_at, stage.started_at)
            if wait is not None:
                before[stage.name].append(wait)
    given: dict[str, datetime] = {}
    if runs:
        query = select(Verdict.run_id, Verdict.created_at).where(
            col(Verdict.run_id).in_([r.id for r in runs])
        )
        for run_id, at in tx.exec(query):
            given[run_id] = at
    to_verdict = [
        w for r in runs if r.id in given if (w := _ms(r.finished_at, given[r.id])) is not None
    ]
    waiting = [w for r in runs if r.id not in given if (w := _ms(r.finished_at, now)) is not None]
    return {
        "queued_to_first_stage_ms": spread(to_first),
        "between_stages_ms": {name: spread(values) for name, values in sorted(before.items())},
        "finished_to_verdict_ms": {
            **spread(to_verdict),
            "waiting": len(waiting),
            "oldest_waiting_ms": _round(max(waiting)) if waiting else None,
        },
    }


def owner_waits(*, tx: Session, since: datetime, now: datetime) -> dict[str, Any]:
    """Per owner: items open now, items done in the window, and how long items waited
    (until done, or until now for open ones)."""
    found: dict[str, dict[str, Any]] = defaultdict(lambda: {"open": 0, "done": 0, "w": []})
    query = select(OwnerItem).where(
        (col(OwnerItem.state) == OwnerItemState.open) | (col(OwnerItem.done_at) >= since)
    )
    for item in tx.exec(query):
        entry = found[item.owner]
        done = item.state == OwnerItemState.done
        entry["done" if done else "open"] += 1
        wait = _ms(item.created_at, item.done_at if done else now)
        if wait is not None:
            entry["w"].append(wait)
    return {
        owner: {"open": e["open"], "done": e["done"], "wait_ms": spread(e["w"])}
        for owner, e in sorted(found.items())
    }


def _add_stage(figures: StageFigures, stage: Stage) -> None:
    figures.attempts += len(stage.history)
    figures.retries += max(0, len(stage.history) - 1)
    for attempt in stage.history:
        if attempt.get("status") != "passed":
            figures.failures += 1
        if attempt.get("duration_ms") is not None:
            figures.durations_ms.append(float(attempt["duration_ms"]))


def utilization(*, tx: Session, since: datetime, now: datetime) -> dict[str, Any]:
    """Leased machine-time over live machine-time in the window, and the fleet right now."""
    machines = list(tx.exec(select(Machine)))
    live_s = 0.0
    for machine in machines:
        start = max(machine.ready_at or machine.created_at, since)
        ended = machine.state in (MachineState.destroyed, MachineState.failed, MachineState.lost)
        end = machine.updated_at if ended else now
        live_s += max(0.0, (end - start).total_seconds())
    leased_s = 0.0
    for lease in tx.exec(
        select(Lease).where((col(Lease.ended_at).is_(None)) | (col(Lease.ended_at) >= since))
    ):
        start = max(lease.acquired_at, since)
        end = lease.ended_at or now
        leased_s += max(0.0, (end - start).total_seconds())
    states: dict[str, int] = defaultdict(int)
    for machine in machines:
        states[machine.state.value] += 1
    in_service = states["ready"] + states["leased"]
    return {
        "utilization": round(min(1.0, leased_s / live_s), 4) if live_s else None,
        "leased_machine_s": round(leased_s, 1),
        "live_machine_s": round(live_s, 1),
        "now": dict(states),
        "leased_share_now": round(states["leased"] / in_service, 4) if in_service else None,
    }
