"""Run validation and attempt records (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from controller.api.schemas import RunBody
from controller.errors import InvalidInput
from controller.services.driver import _history_entry
from controller.services.runs import check_agents


def body(*stages: dict[str, object]) -> RunBody:
    return RunBody.model_validate({"task": "t", "repo": "/r", "stages": list(stages)})


def test_unknown_agent_is_refused_with_the_known_ones() -> None:
    check_agents(body({"name": "plan", "agent": "command"}))
    with pytest.raises(InvalidInput, match=r"unknown agent 'wizard'; known agents: .*command"):
        check_agents(body({"name": "plan", "agent": "wizard"}))


@pytest.mark.parametrize(
    ("stages", "problem"),
    [
        ([], "at least 1"),
        ([{"name": "a", "agent": "command"}] * 2, "repeated: a"),
        ([{"name": "Bad Name", "agent": "command"}], "pattern"),
        ([{"name": "a", "agent": "command", "retries": 6}], "less than or equal to 5"),
        ([{"name": "a", "agent": "command", "timeout_s": 0}], "greater than 0"),
        ([{"name": "a", "agent": "command", "colour": "red"}], "Extra inputs"),
    ],
)
def test_bad_stage_lists_say_what_to_fix(stages: list[dict[str, object]], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        RunBody.model_validate({"task": "t", "repo": "/r", "stages": stages})


def test_history_entry_measures_the_attempt() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    entry = _history_entry(2, "failed", "exit 1", "m-1", start, start + timedelta(seconds=1.5))
    assert entry["attempt"] == 2
    assert entry["duration_ms"] == 1500.0
    assert _history_entry(1, "failed", "restart", None, None, None)["duration_ms"] is None


PREPARE = {"name": "prepare", "agent": "command"}
TESTER = {"name": "test", "agent": "tester"}


@pytest.mark.parametrize(
    ("stages", "problem"),
    [
        ([PREPARE, {"name": "x", "agent": "command", "fork": 1}, TESTER], "greater than or equal"),
        ([PREPARE, {"name": "x", "agent": "command", "fork": 9}, TESTER], "less than or equal"),
        ([{"name": "x", "agent": "command", "fork": 2}, TESTER], "has no machine yet"),
        ([PREPARE, {"name": "x", "agent": "remote", "fork": 2}, TESTER], "remote agent"),
        ([PREPARE, {"name": "x", "agent": "command", "fork": 2}], "next stage is missing"),
        ([PREPARE, {"name": "x", "agent": "command", "select": "first"}], "select needs fork"),
        ([PREPARE, {"name": "x", "agent": "command", "fork": 2, "select": "any"}], "select"),
        (
            [PREPARE, {"name": "x", "agent": "command", "fork": 2, "select": {"cmd": "true"}}],
            "command",
        ),
    ],
)
def test_bad_fork_stages_say_what_to_fix(stages: list[dict[str, object]], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        RunBody.model_validate({"task": "t", "repo": "/r", "stages": stages})


def test_fork_stages_that_can_run() -> None:
    forked = {"name": "x", "agent": "command", "fork": 3}
    body(PREPARE, forked, TESTER)
    body(PREPARE, {**forked, "select": "first"})
    spec = body(PREPARE, {**forked, "select": {"command": "make check"}}).stages[1]
    assert spec.select is not None
    assert not isinstance(spec.select, str)
    assert spec.select.command == "make check"
