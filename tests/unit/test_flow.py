"""The headline figure and percentiles, on hand-made rows (pure logic)."""

from __future__ import annotations

from controller.services.flow import completed_flow, percentile, phase_of
from controller.store.models import Run, RunStatus, Stage, StageStatus


def stage(name: str, agent: str = "command", status: StageStatus = StageStatus.passed) -> Stage:
    return Stage(run_id="r-1", position=0, name=name, agent=agent, status=status)


def full(status: StageStatus = StageStatus.passed) -> list[Stage]:
    return [stage("plan"), stage("implement"), stage("test"), stage("qa", status=status)]


def test_phases_by_stage_name_or_agent() -> None:
    assert phase_of(stage("plan")) == "plan"
    assert phase_of(stage("think", agent="planner")) == "plan"
    assert phase_of(stage("review")) == "evidence"
    assert phase_of(stage("shots", agent="qa")) == "evidence"
    assert phase_of(stage("lint")) is None


def test_a_run_counts_only_with_every_phase_passed_and_no_recreation() -> None:
    run = Run(task="t", repo="r", status=RunStatus.passed)
    assert completed_flow(run, full())
    assert not completed_flow(run, full(StageStatus.failed))
    assert not completed_flow(run, full()[:3])
    moved = Run(task="t", repo="r", status=RunStatus.passed, context_recreations=1)
    assert not completed_flow(moved, full())


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(list(reversed(values)), 99) == 99.0


def test_flow_says_where_runs_wait(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Queued -> first stage, between stages, finished -> verdict, per owner (issue 13)."""
    from datetime import timedelta

    from controller.services.flow import LEARNING, flow
    from controller.store.db import make_engine, migrate, unit_of_work
    from controller.store.models import OwnerItem, OwnerItemState, Verdict, utcnow

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    t0 = utcnow() - timedelta(hours=1)
    at = lambda s: t0 + timedelta(seconds=s)  # noqa: E731
    with unit_of_work(engine) as tx:
        for n, (first, gap, verdict_after) in enumerate([(2, 5, 60), (4, 15, None)]):
            run = Run(
                id=f"r-{n}",
                task="t",
                repo="r",
                status=RunStatus.passed,
                created_at=at(0),
                finished_at=at(100),
            )
            tx.add(run)
            tx.add(
                Stage(
                    run_id=run.id,
                    position=0,
                    name="plan",
                    agent="command",
                    status=StageStatus.passed,
                    started_at=at(first),
                    finished_at=at(first + 10),
                )
            )
            tx.add(
                Stage(
                    run_id=run.id,
                    position=1,
                    name="test",
                    agent="command",
                    status=StageStatus.passed,
                    started_at=at(first + 10 + gap),
                    finished_at=at(99),
                )
            )
            if verdict_after is not None:
                tx.add(
                    Verdict(
                        run_id=run.id,
                        decision="approve",
                        reviewer_token_id="t",
                        created_at=at(100 + verdict_after),
                    )
                )
        tx.add(OwnerItem(owner="qa-team", kind="stage_failed", subject="s", created_at=at(0)))
        tx.add(
            OwnerItem(
                owner="qa-team",
                kind="verdict_waiting",
                subject="r",
                state=OwnerItemState.done,
                created_at=at(0),
                done_at=at(30),
            )
        )
    with unit_of_work(engine) as tx:
        figures = flow(tx=tx, window_h=24)
    engine.dispose()
    waits = figures["waits"]
    assert waits["queued_to_first_stage_ms"] == {"count": 2, "p50": 2000.0, "p95": 4000.0}
    assert waits["between_stages_ms"] == {"test": {"count": 2, "p50": 5000.0, "p95": 15000.0}}
    assert waits["finished_to_verdict_ms"]["p50"] == 60000.0
    assert waits["finished_to_verdict_ms"]["waiting"] == 1
    team = figures["owners"]["qa-team"]
    assert (team["open"], team["done"]) == (1, 1)
    assert team["wait_ms"]["p50"] == 30000.0
    assert (
        set(figures["learning"])
        == set(LEARNING)
        == {
            "signatures",
            "flaky_tests",
            "quarantined_machines",
        }
    )
    assert all(found == [] for found in figures["learning"].values())
