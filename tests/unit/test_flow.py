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
