"""Retention by age and size, pins and baselines kept, unreferenced blobs collected."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, select

from controller.store.models import Artifact, Baseline, utcnow
from evidence.retention import apply_retention, collect_blobs, pin_run
from evidence.store import ArtifactStore, save_artifact
from tests.unit.evidence_db import engine, make_run, png, store, tx

__all__ = ["engine", "tx", "store"]


def add(
    tx: Session,
    store: ArtifactStore,
    run_id: str,
    data: bytes,
    days_old: float = 0,
    kind: str = "file",
    name: str = "f.bin",
) -> Artifact:
    artifact = save_artifact(
        tx=tx,
        store=store,
        run_id=run_id,
        stage="test",
        attempt=1,
        machine_id=None,
        commit=None,
        kind=kind,
        name=name,
        data=data,
    )
    artifact.created_at = utcnow() - timedelta(days=days_old)
    tx.add(artifact)
    tx.flush()
    return artifact


def test_old_evidence_expires_but_pinned_runs_stay(tx: Session, store: ArtifactStore) -> None:
    old, pinned, fresh = (make_run(tx) for _ in range(3))
    gone = add(tx, store, old.id, b"old", days_old=40)
    kept_pin = add(tx, store, pinned.id, b"pinned", days_old=40)
    kept_new = add(tx, store, fresh.id, b"fresh", days_old=1)
    pin_run(tx=tx, run_id=pinned.id)

    report = apply_retention(tx=tx, store=store, max_age_days=30, max_total_bytes=0, grace_s=0)
    remaining = {a.id for a in tx.exec(select(Artifact))}
    assert remaining == {kept_pin.id, kept_new.id}
    assert report.expired_artifacts == 1
    assert report.expired_runs == [old.id]
    assert not store.exists(gone.sha256)
    assert store.exists(kept_pin.sha256)
    assert store.exists(kept_new.sha256)
    assert report.collected_blobs == 1
    assert report.freed_bytes == 3


def test_size_limit_drops_oldest_unpinned_runs_first(tx: Session, store: ArtifactStore) -> None:
    runs = [make_run(tx) for _ in range(4)]
    for age, run in zip((4, 3, 2, 1), runs, strict=True):
        add(tx, store, run.id, bytes([age]) * 1000, days_old=age)
    pin_run(tx=tx, run_id=runs[0].id)

    report = apply_retention(tx=tx, store=store, max_age_days=0, max_total_bytes=2500, grace_s=0)
    assert report.expired_runs == [runs[1].id, runs[2].id]
    left = {a.run_id for a in tx.exec(select(Artifact))}
    assert left == {runs[0].id, runs[3].id}
    assert sum(p.stat().st_size for _, p in store.iter_blobs()) == 2000


def test_shared_blob_survives_while_referenced(tx: Session, store: ArtifactStore) -> None:
    old, new = make_run(tx), make_run(tx)
    shared = add(tx, store, old.id, b"same bytes", days_old=40)
    add(tx, store, new.id, b"same bytes")
    apply_retention(tx=tx, store=store, max_age_days=30, max_total_bytes=0, grace_s=0)
    assert store.exists(shared.sha256)


def test_baseline_and_thumbnail_blobs_are_referenced(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx)
    big = png((640, 480), box=(1, 1, 9, 9))
    shot = add(tx, store, run.id, big, days_old=40, kind="screenshot", name="home.png")
    tx.add(
        Baseline(repo=run.repo, page="home", artifact_id=shot.id, run_id=run.id, sha256=shot.sha256)
    )
    tx.flush()
    thumb = shot.facts["thumb_sha256"]
    apply_retention(tx=tx, store=store, max_age_days=30, max_total_bytes=0, grace_s=0)
    assert store.exists(shot.sha256)  # still the baseline
    assert not store.exists(thumb)  # its record expired, so its thumbnail went too


def test_young_unreferenced_blobs_are_in_grace(tx: Session, store: ArtifactStore) -> None:
    sha = store.put(b"written, record not yet committed")
    assert collect_blobs(tx=tx, store=store, grace_s=3600) == (0, 0)
    assert store.exists(sha)
    assert collect_blobs(tx=tx, store=store, grace_s=0)[0] == 1
