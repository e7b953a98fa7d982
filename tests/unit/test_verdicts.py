"""Verdicts: who may give one, when, how often; closed; baselines move only on approval."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from controller.errors import Conflict, InvalidInput, NotFound
from controller.store.models import ApiToken, Baseline, Event, Role, RunStatus, StageStatus
from evidence.store import ArtifactStore, save_artifact
from evidence.verdicts import closed_for, give_verdict
from tests.unit.evidence_db import engine, make_run, png, store, tx

__all__ = ["engine", "tx", "store"]

REVIEWER = ApiToken(id="t-rev", role=Role.reviewer, name="qa-ann", token_hash="x")


def shoot(tx: Session, store: ArtifactStore, run_id: str, data: bytes, page: str = "/"):  # type: ignore[no-untyped-def]
    return save_artifact(
        tx=tx,
        store=store,
        run_id=run_id,
        stage="qa",
        attempt=1,
        machine_id=None,
        commit=None,
        kind="screenshot",
        name="home.png",
        data=data,
        meta={"page": page},
    )


def test_approval_closes_a_passed_run(tx: Session) -> None:
    run = make_run(tx)
    assert closed_for(tx, [run.id])[run.id] == ("pending", False)
    give_verdict(tx=tx, run_id=run.id, decision="approve", comment="", reviewer=REVIEWER)
    assert closed_for(tx, [run.id])[run.id] == ("approved", True)
    assert tx.exec(select(Event).where(Event.kind == "run.verdict")).one().subject_id == run.id


def test_approved_run_with_failed_stage_is_not_closed(tx: Session) -> None:
    run = make_run(tx, status=RunStatus.failed, stage_status=StageStatus.failed)
    give_verdict(tx=tx, run_id=run.id, decision="approve", comment="", reviewer=REVIEWER)
    assert closed_for(tx, [run.id])[run.id] == ("approved", False)


def test_rejection_needs_a_comment_and_does_not_close(tx: Session) -> None:
    run = make_run(tx)
    with pytest.raises(InvalidInput, match="needs a comment"):
        give_verdict(tx=tx, run_id=run.id, decision="reject", comment="  ", reviewer=REVIEWER)
    give_verdict(
        tx=tx,
        run_id=run.id,
        decision="reject",
        comment="title is wrong",
        reviewer=REVIEWER,
    )
    assert closed_for(tx, [run.id])[run.id] == ("rejected", False)


@pytest.mark.parametrize("status", [RunStatus.queued, RunStatus.running])
def test_verdict_on_a_run_still_going_conflicts(tx: Session, status: RunStatus) -> None:
    run = make_run(tx, status=status, stage_status=StageStatus.running)
    with pytest.raises(Conflict, match="still"):
        give_verdict(tx=tx, run_id=run.id, decision="approve", comment="", reviewer=REVIEWER)


def test_second_verdict_conflicts(tx: Session) -> None:
    run = make_run(tx)
    give_verdict(tx=tx, run_id=run.id, decision="approve", comment="", reviewer=REVIEWER)
    with pytest.raises(Conflict, match="already has a verdict"):
        give_verdict(
            tx=tx,
            run_id=run.id,
            decision="reject",
            comment="changed my mind",
            reviewer=REVIEWER,
        )


def test_bad_decision_and_unknown_run(tx: Session) -> None:
    run = make_run(tx)
    with pytest.raises(InvalidInput, match="approve"):
        give_verdict(tx=tx, run_id=run.id, decision="maybe", comment="", reviewer=REVIEWER)
    with pytest.raises(NotFound):
        give_verdict(tx=tx, run_id="r-nope", decision="approve", comment="", reviewer=REVIEWER)


def test_only_approval_moves_the_baseline(tx: Session, store: ArtifactStore) -> None:
    first = make_run(tx)
    original = png((50, 50))
    shoot(tx, store, first.id, original)
    give_verdict(tx=tx, run_id=first.id, decision="approve", comment="", reviewer=REVIEWER)
    baseline = tx.get(Baseline, (first.repo, "/"))
    assert baseline is not None
    assert baseline.run_id == first.id

    rejected = make_run(tx)
    changed = png((50, 50), box=(0, 0, 4, 4))
    shot = shoot(tx, store, rejected.id, changed)
    comparison = shot.facts["comparison"]
    assert comparison["baseline_run_id"] == first.id
    assert comparison["identical"] is False
    assert comparison["changed_pixels"] == 25
    assert comparison["bbox"] == [0, 0, 5, 5]
    assert store.exists(comparison["diff_sha256"])
    give_verdict(tx=tx, run_id=rejected.id, decision="reject", comment="no", reviewer=REVIEWER)
    assert tx.get(Baseline, (first.repo, "/")).run_id == first.id  # type: ignore[union-attr]

    same = make_run(tx)
    assert shoot(tx, store, same.id, original).facts["comparison"]["identical"] is True
    other_repo = make_run(tx, repo="/repos/other")
    assert shoot(tx, store, other_repo.id, changed).facts["comparison"] is None
