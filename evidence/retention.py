"""Retention: evidence ages out by days and by total size; pinned runs and baselines stay.

Artifact records go first, then blobs nobody references any more are collected. A blob
younger than ``grace_s`` is never collected: a save may have written it and not yet
committed its record.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.settings import Settings
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.models import Artifact, Baseline, RunPin, utcnow
from evidence.store import ArtifactStore

DEFAULT_GRACE_S = 3600.0


@dataclass
class RetentionReport:
    expired_artifacts: int = 0
    expired_runs: list[str] = field(default_factory=list)
    collected_blobs: int = 0
    freed_bytes: int = 0


def blob_refs(facts: Mapping[str, Any]) -> list[str]:
    """Blobs an artifact's derived facts point at (thumbnail, diff, the baseline compared)."""
    refs = [facts.get("thumb_sha256")]
    comparison = facts.get("comparison") or {}
    refs += [comparison.get("diff_sha256"), comparison.get("baseline_sha256")]
    return [ref for ref in refs if isinstance(ref, str)]


def pin_run(*, tx: Session, run_id: str) -> RunPin:
    pin = tx.get(RunPin, run_id) or RunPin(run_id=run_id)
    tx.add(pin)
    events.record(tx, "run.pinned", run_id)
    return pin


def unpin_run(*, tx: Session, run_id: str) -> None:
    pin = tx.get(RunPin, run_id)
    if pin is not None:
        tx.delete(pin)
        events.record(tx, "run.unpinned", run_id)


def apply_retention(
    *,
    tx: Session,
    store: ArtifactStore,
    max_age_days: float,
    max_total_bytes: int,
    now: datetime | None = None,
    grace_s: float = DEFAULT_GRACE_S,
) -> RetentionReport:
    """Expire by age, then by size (oldest unpinned runs first), then collect blobs."""
    report = RetentionReport()
    pinned = set(tx.exec(select(RunPin.run_id)))
    if max_age_days > 0:
        cutoff = (now or utcnow()) - timedelta(days=max_age_days)
        stale = select(Artifact.run_id).where(col(Artifact.created_at) < cutoff).distinct()
        old_runs = [run_id for run_id in tx.exec(stale) if run_id not in pinned]
        report.expired_artifacts += _delete_runs_evidence(tx, old_runs, before=cutoff)
        report.expired_runs += old_runs
    if max_total_bytes > 0:
        over = _runs_to_drop_for_size(tx, store, pinned, max_total_bytes)
        report.expired_artifacts += _delete_runs_evidence(tx, over, before=None)
        report.expired_runs += [r for r in over if r not in report.expired_runs]
    tx.flush()
    report.collected_blobs, report.freed_bytes = collect_blobs(tx=tx, store=store, grace_s=grace_s)
    if report.expired_artifacts or report.collected_blobs:
        events.record(
            tx,
            "evidence.expired",
            "retention",
            artifacts=report.expired_artifacts,
            runs=len(report.expired_runs),
            blobs=report.collected_blobs,
            freed_bytes=report.freed_bytes,
        )
    return report


def _delete_runs_evidence(tx: Session, run_ids: list[str], before: datetime | None) -> int:
    if not run_ids:
        return 0
    query = delete(Artifact).where(col(Artifact.run_id).in_(run_ids))
    if before is not None:
        query = query.where(col(Artifact.created_at) < before)
    result = tx.exec(query)
    return int(result.rowcount or 0)


def _runs_to_drop_for_size(
    tx: Session, store: ArtifactStore, pinned: set[str], max_total_bytes: int
) -> list[str]:
    """Oldest unpinned runs whose evidence must go so the blobs fit in ``max_total_bytes``."""
    sizes = {sha: path.stat().st_size for sha, path in store.iter_blobs()}
    usage = sum(sizes.values())
    if usage <= max_total_bytes:
        return []
    refs: Counter[str] = Counter(tx.exec(select(Baseline.sha256)))
    per_run: dict[str, list[str]] = {}
    first_seen: dict[str, datetime] = {}
    rows = tx.exec(select(Artifact.run_id, Artifact.sha256, Artifact.facts, Artifact.created_at))
    for run_id, sha256, facts, created_at in rows:
        shas = [sha256, *blob_refs(facts or {})]
        refs.update(shas)
        per_run.setdefault(run_id, []).extend(shas)
        first_seen[run_id] = min(created_at, first_seen.get(run_id, created_at))
    dropped: list[str] = []
    for run_id in sorted(per_run, key=lambda r: first_seen[r]):
        if usage <= max_total_bytes:
            break
        if run_id in pinned:
            continue
        for sha in per_run[run_id]:
            refs[sha] -= 1
            if refs[sha] == 0:
                usage -= sizes.get(sha, 0)
        dropped.append(run_id)
    return dropped


def referenced_blobs(tx: Session) -> set[str]:
    referenced = set(tx.exec(select(Baseline.sha256)))
    for sha256, facts in tx.exec(select(Artifact.sha256, Artifact.facts)):
        referenced.add(sha256)
        referenced.update(blob_refs(facts or {}))
    return referenced


def collect_blobs(*, tx: Session, store: ArtifactStore, grace_s: float) -> tuple[int, int]:
    """Delete blobs (and stray temp files) no record references; returns (count, bytes)."""
    referenced = referenced_blobs(tx)
    horizon = time.time() - grace_s
    count = freed = 0
    for sha, path in list(store.iter_blobs()):
        if sha in referenced or path.stat().st_mtime > horizon:
            continue
        freed += store.delete(sha)
        count += 1
    if store.blobs.exists():
        for temp in store.blobs.glob("*/.tmp-*"):
            if temp.stat().st_mtime <= horizon:
                temp.unlink(missing_ok=True)
    return count, freed


def retention_tick(*, db: Engine, settings: Settings) -> RetentionReport:
    """One pass of the background retention loop, with the limits from settings."""
    with unit_of_work(db) as tx:
        return apply_retention(
            tx=tx,
            store=ArtifactStore.from_settings(settings),
            max_age_days=settings.retention_days,
            max_total_bytes=settings.retention_max_bytes,
        )
