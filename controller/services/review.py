"""What the gallery pages show, gathered in a fixed number of queries per page.

Queries never go once per run or once per artifact: lists batch by ``IN (...)``, and a
run page reads each artifact kind with a limit, so a run with thousands of artifacts
costs the same handful of queries as a small one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from controller.errors import ShopfloorError
from controller.services import flow, owners
from controller.services.runtime import Controller
from controller.store.db import unit_of_work
from controller.store.models import Artifact, ArtifactKind, Run, RunStatus, Stage, Verdict
from evidence import junit, logs
from evidence.store import ArtifactStore
from evidence.verdicts import (
    Criterion,
    VerdictState,
    stages_for,
    verdicts_for,
    verification_for,
)

RUNS_PER_PAGE = 50
SHOWN_PER_KIND = 100
"""A run page lists at most this many artifacts of a kind; the artifact list has the rest."""
INLINE_TEXT_BYTES = 256 * 1024
INLINE_REPORTS = 5
"""JUnit reports, plans and diffs parsed into the run page; further ones are linked."""
FAILURE_LINES_SHOWN = 30


@dataclass(frozen=True)
class RunFilters:
    status: str = ""
    repo: str = ""
    verdict: str = ""
    page: int = 1

    def query(self, **changes: Any) -> str:
        """The URL query for these filters with ``changes`` applied (for links)."""
        values = {"status": self.status, "repo": self.repo, "verdict": self.verdict}
        values.update({k: v for k, v in changes.items() if k != "page"})
        page = changes.get("page", 1)
        pairs = [(k, str(v)) for k, v in values.items() if v]
        if page and page != 1:
            pairs.append(("page", str(page)))
        from urllib.parse import urlencode

        return urlencode(pairs)


@dataclass
class RunRow:
    run: Run
    stages: list[Stage]
    verdict: VerdictState
    closed: bool
    artifacts: int


@dataclass
class RunsPage:
    rows: list[RunRow]
    filters: RunFilters
    repos: list[str]
    has_next: bool


def runs_page(*, ctl: Controller, filters: RunFilters) -> RunsPage:
    with unit_of_work(ctl.reader) as tx:
        return _runs_page(tx, filters)


def _runs_page(tx: Session, filters: RunFilters) -> RunsPage:
    query = select(Run).outerjoin(Verdict, col(Verdict.run_id) == col(Run.id))
    if filters.status:
        query = query.where(Run.status == filters.status)
    if filters.repo:
        query = query.where(Run.repo == filters.repo)
    if filters.verdict == VerdictState.pending:
        query = query.where(col(Verdict.id).is_(None))
    elif filters.verdict == VerdictState.approved:
        query = query.where(Verdict.decision == "approve")
    elif filters.verdict == VerdictState.rejected:
        query = query.where(Verdict.decision == "reject")
    offset = (max(filters.page, 1) - 1) * RUNS_PER_PAGE
    query = query.order_by(col(Run.created_at).desc(), col(Run.id).desc())
    found = list(tx.exec(query.offset(offset).limit(RUNS_PER_PAGE + 1)))
    runs = found[:RUNS_PER_PAGE]
    ids = [r.id for r in runs]
    checked = verification_for(tx, ids)
    stages = stages_for(tx, ids)
    counts = artifact_counts(tx, ids)
    rows = [
        RunRow(
            run=r,
            stages=stages[r.id],
            verdict=checked[r.id].state,
            closed=checked[r.id].closed,
            artifacts=counts.get(r.id, 0),
        )
        for r in runs
    ]
    repos = list(tx.exec(select(Run.repo).distinct().order_by(col(Run.repo)).limit(200)))
    return RunsPage(rows=rows, filters=filters, repos=repos, has_next=len(found) > len(runs))


def artifact_counts(tx: Session, run_ids: list[str]) -> dict[str, int]:
    if not run_ids:
        return {}
    query = (
        select(Artifact.run_id, func.count())
        .where(col(Artifact.run_id).in_(run_ids))
        .group_by(col(Artifact.run_id))
    )
    return {str(run_id): int(count) for run_id, count in tx.exec(query)}


@dataclass
class StageRow:
    stage: Stage
    duration_s: float | None
    machine_id: str | None
    commit: str | None


@dataclass
class ScreenshotRow:
    artifact: Artifact
    comparison: dict[str, Any] | None


@dataclass
class LogRow:
    artifact: Artifact
    failures: list[logs.Line]
    truncated: bool


@dataclass
class JunitRow:
    artifact: Artifact
    report: junit.Report | None
    error: str | None


@dataclass
class TextRow:
    artifact: Artifact
    text: str
    truncated: bool


@dataclass
class ForkColumn:
    """One fork of a forking stage's attempt: its result and its own evidence."""

    fork: int
    winner: bool
    status: str
    summary: str
    machine_id: str | None
    diffs: list[TextRow] = field(default_factory=list)
    reports: list[JunitRow] = field(default_factory=list)
    screenshots: list[ScreenshotRow] = field(default_factory=list)
    logs: list[Artifact] = field(default_factory=list)


@dataclass
class ForkAttempt:
    """A forking stage's attempt: its forks side by side."""

    stage: str
    attempt: int
    select: str
    columns: list[ForkColumn]


@dataclass
class RunPage:
    run: Run
    stages: list[StageRow]
    verdict: Verdict | None
    verdict_state: VerdictState
    closed: bool
    finished: bool
    counts: dict[str, int]
    checklist: list[Criterion] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    """Who answers for the run's stages (its repo's ``[owners]`` and its pool's owner)."""
    plans: list[TextRow] = field(default_factory=list)
    diffs: list[TextRow] = field(default_factory=list)
    reports: list[JunitRow] = field(default_factory=list)
    logs: list[LogRow] = field(default_factory=list)
    screenshots: list[ScreenshotRow] = field(default_factory=list)
    files: list[Artifact] = field(default_factory=list)
    forks: list[ForkAttempt] = field(default_factory=list)
    """Forking stages' attempts, each fork with its own diff, tests and screenshots."""

    @property
    def failed_cases(self) -> list[tuple[Artifact, junit.Case]]:
        return [
            (row.artifact, case)
            for row in self.reports
            if row.report is not None
            for case in row.report.problems
        ]

    @property
    def test_counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for row in self.reports:
            if row.report is not None:
                total.update(row.report.counts())
        return dict(total)


def run_page(*, ctl: Controller, run_id: str) -> RunPage | None:
    """What the run page shows, or None when there is no such run."""
    store = ArtifactStore.from_settings(ctl.settings)
    with unit_of_work(ctl.reader) as tx:
        return _run_page(tx, store, run_id)


def artifacts_page(
    *, ctl: Controller, run_id: str, kind: ArtifactKind, limit: int, offset: int
) -> tuple[Run, list[Artifact]] | None:
    """A run and a page of its artifacts of one kind, or None when there is no such run."""
    with unit_of_work(ctl.reader) as tx:
        run = tx.get(Run, run_id)
        if run is None:
            return None
        return run, artifacts_of(tx, run_id, kind, limit=limit, offset=offset)


def overview(*, ctl: Controller, window_h: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The flow figures over the window, and the headline share per day of the last week."""
    with unit_of_work(ctl.reader) as tx:
        return flow.flow(tx=tx, window_h=window_h), trend(tx=tx)


def _run_page(tx: Session, store: ArtifactStore, run_id: str) -> RunPage | None:
    run = tx.get(Run, run_id)
    if run is None:
        return None
    stages = stages_for(tx, [run_id])[run_id]
    verdict = verdicts_for(tx, [run_id]).get(run_id)
    counts = kind_counts(tx, run_id)
    by_kind = {kind: artifacts_of(tx, run_id, kind) for kind in ArtifactKind if counts[kind]}
    commits = stage_commits(tx, run_id)
    checked = verification_for(tx, [run_id])[run_id]
    page = RunPage(
        run=run,
        stages=[stage_row(s, commits.get(s.name)) for s in stages],
        verdict=verdict,
        verdict_state=checked.state,
        closed=checked.closed,
        finished=run.status in (RunStatus.passed, RunStatus.failed, RunStatus.cancelled),
        counts={kind.value: counts[kind] for kind in ArtifactKind},
        checklist=checked.checklist,
        owners=owners.run_owners(tx, run),
    )
    page.plans = [text_row(store, a) for a in by_kind.get(ArtifactKind.plan, [])[:INLINE_REPORTS]]
    page.diffs = [text_row(store, a) for a in by_kind.get(ArtifactKind.diff, [])[:INLINE_REPORTS]]
    page.reports = [
        junit_row(store, a) for a in by_kind.get(ArtifactKind.junit, [])[:INLINE_REPORTS]
    ]
    page.logs = [
        log_row(store, a, read=i < INLINE_REPORTS * 2)
        for i, a in enumerate(by_kind.get(ArtifactKind.log, []))
    ]
    page.screenshots = [
        ScreenshotRow(artifact=a, comparison=a.facts.get("comparison"))
        for a in by_kind.get(ArtifactKind.screenshot, [])
    ]
    page.files = by_kind.get(ArtifactKind.file, [])
    page.forks = fork_attempts(tx, store, run_id, stages)
    return page


def fork_attempts(
    tx: Session, store: ArtifactStore, run_id: str, stages: list[Stage]
) -> list[ForkAttempt]:
    """Each attempt of a forking stage, its forks in order with the evidence each kept
    (artifacts carry their fork's number in ``meta["fork"]``)."""
    forked = [s for s in stages if s.fork]
    if not forked:
        return []
    names = [s.name for s in forked]
    found: dict[tuple[str, int, int], list[Artifact]] = {}
    for artifact in tx.exec(
        select(Artifact)
        .where(Artifact.run_id == run_id, col(Artifact.stage).in_(names))
        .order_by(col(Artifact.created_at), col(Artifact.id))
    ):
        fork = artifact.meta.get("fork")
        if isinstance(fork, int):
            found.setdefault((artifact.stage, artifact.attempt, fork), []).append(artifact)
    attempts: list[ForkAttempt] = []
    for stage in forked:
        by_attempt: dict[int, list[dict[str, Any]]] = {}
        for entry in stage.history:
            if "fork" in entry:
                by_attempt.setdefault(int(entry["attempt"]), []).append(entry)
        for attempt, entries in sorted(by_attempt.items()):
            columns = []
            for entry in sorted(entries, key=lambda e: int(e["fork"])):
                mine = found.get((stage.name, attempt, int(entry["fork"])), [])
                columns.append(
                    ForkColumn(
                        fork=int(entry["fork"]),
                        winner=bool(entry.get("winner")),
                        status=str(entry.get("status")),
                        summary=str(entry.get("summary") or ""),
                        machine_id=entry.get("machine_id"),
                        diffs=[text_row(store, a) for a in mine if a.kind is ArtifactKind.diff][
                            :INLINE_REPORTS
                        ],
                        reports=[junit_row(store, a) for a in mine if a.kind is ArtifactKind.junit][
                            :INLINE_REPORTS
                        ],
                        screenshots=[
                            ScreenshotRow(artifact=a, comparison=a.facts.get("comparison"))
                            for a in mine
                            if a.kind is ArtifactKind.screenshot
                        ],
                        logs=[a for a in mine if a.kind is ArtifactKind.log],
                    )
                )
            select_rule = str(entries[0].get("select") or "tests")
            attempts.append(ForkAttempt(stage.name, attempt, select_rule, columns))
    return attempts


def kind_counts(tx: Session, run_id: str) -> Counter[ArtifactKind]:
    query = (
        select(Artifact.kind, func.count())
        .where(Artifact.run_id == run_id)
        .group_by(col(Artifact.kind))
    )
    return Counter({ArtifactKind(kind): count for kind, count in tx.exec(query)})


def artifacts_of(
    tx: Session,
    run_id: str,
    kind: ArtifactKind,
    *,
    limit: int = SHOWN_PER_KIND,
    offset: int = 0,
) -> list[Artifact]:
    query = (
        select(Artifact)
        .where(Artifact.run_id == run_id, Artifact.kind == kind)
        .order_by(col(Artifact.created_at), col(Artifact.id))
        .offset(offset)
        .limit(limit)
    )
    return list(tx.exec(query))


def stage_commits(tx: Session, run_id: str) -> dict[str, str]:
    """The newest commit each stage's evidence was recorded at."""
    query = (
        select(Artifact.stage, func.max(Artifact.commit))
        .where(Artifact.run_id == run_id, col(Artifact.commit).is_not(None))
        .group_by(col(Artifact.stage))
    )
    return {stage: commit for stage, commit in tx.exec(query) if commit}


def stage_row(stage: Stage, commit: str | None) -> StageRow:
    duration = None
    if stage.started_at and stage.finished_at:
        duration = (stage.finished_at - stage.started_at).total_seconds()
    machine = stage.machine_id
    if machine is None and stage.history:
        machine = stage.history[-1].get("machine_id")
    return StageRow(stage=stage, duration_s=duration, machine_id=machine, commit=commit)


def read_text(
    store: ArtifactStore, artifact: Artifact, limit: int = INLINE_TEXT_BYTES
) -> tuple[str, bool]:
    try:
        data = store.get(artifact.sha256)
    except ShopfloorError:
        return "(the content is no longer stored)", False
    return logs.decode(data[:limit]), len(data) > limit


def text_row(store: ArtifactStore, artifact: Artifact) -> TextRow:
    text, truncated = read_text(store, artifact)
    return TextRow(artifact=artifact, text=text, truncated=truncated)


def junit_row(store: ArtifactStore, artifact: Artifact) -> JunitRow:
    try:
        report = junit.parse_junit(store.get(artifact.sha256), max_bytes=store.junit_cap_bytes)
    except ShopfloorError as exc:
        return JunitRow(artifact=artifact, report=None, error=exc.message)
    return JunitRow(artifact=artifact, report=report, error=None)


def log_row(store: ArtifactStore, artifact: Artifact, *, read: bool) -> LogRow:
    if not read:
        return LogRow(artifact=artifact, failures=[], truncated=False)
    try:
        rendered = logs.render(store.get(artifact.sha256))
    except ShopfloorError:
        return LogRow(artifact=artifact, failures=[], truncated=False)
    return LogRow(
        artifact=artifact,
        failures=rendered.failures[:FAILURE_LINES_SHOWN],
        truncated=rendered.truncated,
    )


def diff_lines(text: str) -> list[tuple[str, str]]:
    """(css class, line) for a unified diff."""
    rows = []
    for line in text.splitlines():
        if line.startswith(("+++", "---")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = ""
        rows.append((kind, line))
    return rows


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_ms(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1000:
        return f"{value:.0f} ms"
    seconds = value / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def trend(*, tx: Session, days: int = 7) -> list[dict[str, Any]]:
    """The headline share per day, from the flow service (controller/services/flow.py)."""
    from datetime import timedelta

    from controller.store.models import utcnow

    now = utcnow()
    points = []
    for back in range(days - 1, -1, -1):
        end = now - timedelta(days=back)
        figure = flow.flow(tx=tx, window_h=24, now=end)["headline"]
        points.append({"day": end.strftime("%Y-%m-%d"), **figure})
    return points
