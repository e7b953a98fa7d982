"""Every JUnit report the store saves becomes history: one row per test case, and the
per-test figures (``test_stats``) that say whether a test is flaky, broken or healthy.

Rows go in with one executemany per batch, and the figures are read and written in batches
too, so a report of 100k cases costs a few hundred statements, not 200k. The caller's
transaction holds it all: the artifact, its history and the figures commit together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Table, case, delete, func, insert, select, text
from sqlalchemy.engine import Connection
from sqlmodel import Session

from controller.store.models import CaseResult, CaseStats, utcnow
from evidence.junit import Case, Report

BATCH = 1000
"""Rows per executemany and tests per ``IN (...)`` read (SQLite allows 32766 parameters)."""
FAILED = ("failed", "error")
_COMMIT = re.compile(r"^[0-9a-f]{7,64}$")
T = TypeVar("T")
RESULTS: Table = CaseResult.__table__  # type: ignore[attr-defined]
STATS: Table = CaseStats.__table__  # type: ignore[attr-defined]
"""Core tables: executemany without the ORM's bulk bookkeeping."""


def test_id(classname: str, name: str) -> str:
    """A test's id as the history keeps it: ``classname::name`` (just ``name`` without one)."""
    return f"{classname}::{name}" if classname else name


@dataclass(frozen=True)
class Tree:
    """What was tested: the commit, whether the checkout had no change, whether a rerun."""

    commit: str | None
    clean: bool | None
    retry: bool

    @classmethod
    def from_meta(cls, meta: dict[str, Any], commit: str | None) -> Tree:
        """The tester's facts in the artifact's meta win over the machine's commit."""
        said = meta.get("commit")
        if isinstance(said, str) and _COMMIT.match(said):
            commit = said
        clean = meta.get("clean")
        return cls(
            commit=commit,
            clean=clean if isinstance(clean, bool) else None,
            retry=meta.get("retry") is True,
        )

    @property
    def same_tree_key(self) -> str | None:
        """Results are comparable across runs only on a clean checkout of a known commit."""
        return self.commit if self.clean and self.commit else None


def record(
    *,
    tx: Session,
    repo: str,
    run_id: str,
    stage: str,
    attempt: int,
    artifact_id: str,
    tree: Tree,
    report: Report,
) -> int:
    """Add the report's cases to the history of ``repo``; returns how many were recorded."""
    now = utcnow()
    results = _results(report.cases, tree)
    if not results:
        return 0
    conn = tx.connection()  # Core, not the ORM: no per-row bookkeeping
    _lock_repo(conn, repo)
    seen_on_tree = _seen_on_tree(conn, repo, tree, [t for t, _s, _r in results])
    conn.execute(
        insert(RESULTS),
        [
            {
                "repo": repo,
                "test": test,
                "status": status,
                "run_id": run_id,
                "stage": stage,
                "attempt": attempt,
                "commit": tree.commit,
                "clean": tree.clean,
                "retry": retried,
                "artifact_id": artifact_id,
                "at": now,
            }
            for test, status, retried in results
        ],
    )
    _update_stats(conn, repo, run_id, tree, results, seen_on_tree, now)
    return len(results)


def _results(cases: Iterable[Case], tree: Tree) -> list[tuple[str, str, bool]]:
    """(test, status, passed-on-a-rerun) per case; a case the report itself reran and that
    passed at last (junit's ``flaky``) is a pass on a retry."""
    out: dict[str, tuple[str, str, bool]] = {}
    for c in cases:
        test = test_id(c.classname, c.name)
        if c.status == "flaky":
            out[test] = (test, "passed", True)
        else:
            out[test] = (test, c.status, tree.retry)
    return list(out.values())


def _lock_repo(conn: Connection, repo: str) -> None:
    """Two reports of one repo must not both insert the same new figures: PostgreSQL takes
    a per-repo advisory lock for the transaction; SQLite already has one writer at a time."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"test_stats:{repo}"}
        )


def _seen_on_tree(
    conn: Connection, repo: str, tree: Tree, tests: list[str]
) -> dict[str, tuple[bool, bool]]:
    """(passed before, failed before) on this same clean tree, for the tests that ran there."""
    commit = tree.same_tree_key
    if commit is None:
        return {}
    passed = func.max(case((CaseResult.status == "passed", 1), else_=0))  # type: ignore[arg-type]
    failed = func.max(case((CaseResult.status.in_(FAILED), 1), else_=0))  # type: ignore[attr-defined]
    found: dict[str, tuple[bool, bool]] = {}
    for chunk in _chunks(tests, BATCH):
        rows = conn.execute(
            select(CaseResult.test, passed, failed)  # type: ignore[call-overload]
            .where(
                CaseResult.repo == repo,
                CaseResult.commit == commit,
                CaseResult.clean.is_(True),  # type: ignore[union-attr]
                CaseResult.test.in_(chunk),  # type: ignore[attr-defined]
            )
            .group_by(CaseResult.test)
        )
        for test, p, f in rows:
            found[test] = (bool(p), bool(f))
    return found


def _update_stats(
    conn: Connection,
    repo: str,
    run_id: str,
    tree: Tree,
    results: list[tuple[str, str, bool]],
    seen_on_tree: dict[str, tuple[bool, bool]],
    now: datetime,
) -> None:
    existing: dict[str, dict[str, Any]] = {}
    columns = list(STATS.columns)
    for chunk in _chunks([t for t, _s, _r in results], BATCH):
        rows = conn.execute(
            select(*columns).where(
                CaseStats.repo == repo,  # type: ignore[arg-type]
                CaseStats.test.in_(chunk),  # type: ignore[attr-defined]
            )
        )
        for row in rows.mappings():
            existing[row["test"]] = dict(row)
    new: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    clean = tree.same_tree_key is not None
    for test, status, retried in results:
        stats = existing.get(test)
        if stats is None:
            stats = _fresh(repo, test, now)
            new.append(stats)
        else:
            changed.append(stats)
        _add(stats, status=status, retried=retried, clean=clean)
        before_pass, before_fail = seen_on_tree.get(test, (False, False))
        if clean and ((status == "passed" and before_fail) or (status in FAILED and before_pass)):
            stats["same_tree"] = True
        stats.update(last_commit=tree.commit, last_run_id=run_id, last_seen=now)
    # Changed figures are replaced (a delete per batch, then one multi-row insert with the
    # new ones): 100k single-row UPDATEs took twice as long as the whole report's insert.
    for rows_changed in _chunks(changed, BATCH):
        conn.execute(
            delete(STATS).where(
                STATS.c.repo == repo, STATS.c.test.in_([s["test"] for s in rows_changed])
            )
        )
    for batch in _chunks(new + changed, BATCH):
        conn.execute(insert(STATS), list(batch))


def _fresh(repo: str, test: str, now: datetime) -> dict[str, Any]:
    return {
        "repo": repo,
        "test": test,
        "runs": 0,
        "passes": 0,
        "failures": 0,
        "skipped": 0,
        "clean_passes": 0,
        "clean_failures": 0,
        "retry_passes": 0,
        "same_tree": False,
        "fail_streak": 0,
        "last_status": "passed",
        "last_commit": None,
        "last_run_id": None,
        "first_seen": now,
        "last_seen": now,
    }


def _add(stats: dict[str, Any], *, status: str, retried: bool, clean: bool) -> None:
    stats["runs"] += 1
    stats["last_status"] = status
    if status == "passed":
        stats["passes"] += 1
        stats["clean_passes"] += int(clean)
        stats["retry_passes"] += int(retried)
        stats["fail_streak"] = 0
    elif status in FAILED:
        stats["failures"] += 1
        stats["clean_failures"] += int(clean)
        stats["fail_streak"] += 1
    else:
        stats["skipped"] += 1


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
