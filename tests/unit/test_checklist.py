"""Verification criteria (issue 13): the checklist from a run's [verify] policy decides
``closed``; the run list reads it in a fixed number of queries."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session

from agents.config import RepoPolicy, VerifyPolicy
from controller.store.models import Artifact, ArtifactKind, RunStatus, StageStatus, Verdict
from evidence.store import ArtifactStore, save_artifact
from evidence.verdicts import (
    checklist,
    closed_for,
    flaky_facts,
    give_verdict,
    is_closed,
    verification_for,
)
from tests.unit.evidence_db import engine, make_run, png, store, tx
from tests.unit.test_verdicts import REVIEWER

__all__ = ["engine", "tx", "store"]


def policy(**verify: object) -> dict[str, object]:
    return asdict(RepoPolicy(verify=VerifyPolicy(**verify)))  # type: ignore[arg-type]


def shot(page: str, *, share: float | None, errors: int = 0) -> Artifact:
    comparison = None if share is None else {"changed_share": share, "identical": share == 0}
    return Artifact(
        run_id="r-1",
        stage="qa",
        kind=ArtifactKind.screenshot,
        name=f"{page.strip('/') or 'index'}.png",
        sha256="0" * 64,
        size=1,
        content_type="image/png",
        meta={"page": page, "console_errors": [f"boom {i}" for i in range(errors)]},
        facts={"page": page, "comparison": comparison},
    )


def by_name(items: list[object]) -> dict[str, object]:
    return {item.criterion: item for item in items}  # type: ignore[attr-defined]


def approve() -> list[Verdict]:
    return [Verdict(run_id="r-1", decision="approve", reviewer_token_id="t")]


def test_defaults_need_required_stages_and_one_approval(tx: Session) -> None:
    run = make_run(tx)
    stages = list(verification_for(tx, [run.id]).values())[0].checklist
    items = by_name(stages)  # type: ignore[arg-type]
    assert items["required stages passed"].met is True  # type: ignore[attr-defined]
    assert items["approvals"].met is False  # type: ignore[attr-defined]
    assert items["changed pixels"].met is None  # type: ignore[attr-defined]
    assert items["console errors"].met is None  # type: ignore[attr-defined]
    assert items["flaky tests"].met is None  # type: ignore[attr-defined]


def test_required_stages_named_by_the_policy(tx: Session) -> None:
    run = make_run(tx, stages=("plan", "lint"))
    from controller.services.runs import stages_of

    stages = stages_of(tx, run.id)
    stages[1].status = StageStatus.failed
    only_plan = checklist(
        policy=policy(required_stages=["plan"]), stages=stages, verdicts=approve()
    )
    assert is_closed(only_plan)
    every = checklist(policy=None, stages=stages, verdicts=approve())
    assert not is_closed(every)
    assert "lint (failed)" in by_name(every)["required stages passed"].detail  # type: ignore[arg-type, attr-defined]
    missing = checklist(policy=policy(required_stages=["qa"]), stages=stages, verdicts=approve())
    assert "no stage qa" in by_name(missing)["required stages passed"].detail  # type: ignore[arg-type, attr-defined]
    assert not is_closed(missing)


def test_approvals_count_approving_verdicts(tx: Session) -> None:
    run = make_run(tx)
    from controller.services.runs import stages_of

    stages = stages_of(tx, run.id)
    assert is_closed(checklist(policy=policy(approvals=0), stages=stages, verdicts=[]))
    two = checklist(policy=policy(approvals=2), stages=stages, verdicts=approve())
    assert by_name(two)["approvals"].detail == "1 of 2 approval(s)"  # type: ignore[arg-type, attr-defined]
    assert not is_closed(two)
    rejected = [Verdict(run_id="r-1", decision="reject", reviewer_token_id="t")]
    assert not is_closed(checklist(policy=policy(approvals=0), stages=stages, verdicts=rejected))


def test_changed_pixels_against_the_limit(tx: Session) -> None:
    run = make_run(tx)
    from controller.services.runs import stages_of

    stages = stages_of(tx, run.id)
    rule = policy(max_changed_pixels=0.02)
    small = [shot("/", share=0.01), shot("/about", share=None)]
    items = by_name(checklist(policy=rule, stages=stages, verdicts=approve(), screenshots=small))
    assert items["changed pixels"].met is True  # type: ignore[attr-defined]
    assert "no baseline yet: /about" in items["changed pixels"].detail  # type: ignore[attr-defined]
    big = [shot("/", share=0.01), shot("/about", share=0.3)]
    listed = checklist(policy=rule, stages=stages, verdicts=approve(), screenshots=big)
    assert by_name(listed)["changed pixels"].met is False  # type: ignore[attr-defined]
    assert "over 2.00%: /about" in by_name(listed)["changed pixels"].detail  # type: ignore[arg-type, attr-defined]
    assert not is_closed(listed)
    unlimited = checklist(policy=None, stages=stages, verdicts=approve(), screenshots=big)
    assert by_name(unlimited)["changed pixels"].met is None  # type: ignore[attr-defined]
    assert is_closed(unlimited)


@pytest.mark.parametrize(("rule", "met", "closed"), [("fail", False, False), ("warn", None, True)])
def test_console_errors_fail_or_warn(
    tx: Session, rule: str, met: bool | None, closed: bool
) -> None:
    run = make_run(tx)
    from controller.services.runs import stages_of

    stages = stages_of(tx, run.id)
    shots = [shot("/", share=0.0, errors=2), shot("/about", share=0.0)]
    items = checklist(
        policy=policy(console_errors=rule), stages=stages, verdicts=approve(), screenshots=shots
    )
    assert by_name(items)["console errors"].met is met  # type: ignore[attr-defined]
    assert "/: 2" in by_name(items)["console errors"].detail  # type: ignore[arg-type, attr-defined]
    assert is_closed(items) is closed
    clean = checklist(
        policy=policy(console_errors="fail"),
        stages=stages,
        verdicts=approve(),
        screenshots=[shot("/", share=0.0)],
    )
    assert by_name(clean)["console errors"].met is True  # type: ignore[attr-defined]


def test_flaky_tests_come_from_what_the_tester_reported(tx: Session) -> None:
    run = make_run(tx)
    from controller.services.runs import stages_of

    stages = stages_of(tx, run.id)
    assert flaky_facts(stages) is None  # no test stage said anything: no data
    stages[0].outputs = {"failed": [], "passed_on_retry": ["test_app::test_title"]}
    facts = flaky_facts(stages)
    assert facts == {"flaky_failures": ["test_app::test_title"], "quarantined": []}
    failing = checklist(policy=None, stages=stages, verdicts=approve(), flaky=facts)
    assert by_name(failing)["flaky tests"].met is False  # type: ignore[attr-defined]
    quarantined = checklist(
        policy=policy(flaky="quarantine"), stages=stages, verdicts=approve(), flaky=facts
    )
    assert by_name(quarantined)["flaky tests"].met is None  # type: ignore[attr-defined]


def test_closed_follows_the_policy_kept_on_the_run(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx, policy=policy(console_errors="fail"))
    save_artifact(
        tx=tx,
        store=store,
        run_id=run.id,
        stage="qa",
        attempt=1,
        machine_id=None,
        commit=None,
        kind="screenshot",
        name="home.png",
        data=png(),
        meta={"page": "/", "console_errors": ["TypeError: x is undefined"]},
    )
    give_verdict(tx=tx, run_id=run.id, decision="approve", comment="", reviewer=REVIEWER)
    assert closed_for(tx, [run.id])[run.id] == ("approved", False)
    open_items = verification_for(tx, [run.id])[run.id].open
    assert [c.criterion for c in open_items] == ["console errors"]


def test_the_run_list_reads_checklists_in_a_fixed_number_of_queries(
    engine: Engine, tx: Session
) -> None:
    ids = [make_run(tx, status=RunStatus.passed).id for _ in range(30)]
    tx.commit()
    verification_for(tx, ids[:1])  # the transaction's own first statements aside
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        few = verification_for(tx, ids[:2])
        small = len(statements)
        statements.clear()
        many = verification_for(tx, ids)
        assert len(statements) == small <= 5
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(few) == 2
    assert len(many) == 30
