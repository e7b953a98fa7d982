"""Lessons: their markdown, the planner putting them into plan.md, ``{lessons}`` for an
external agent, and the exit codes the driver hands to learning."""

from __future__ import annotations

from typing import Any

from agents.base import CommandResult
from agents.external import ExternalAgent
from agents.planner import PlannerAgent
from controller.services.learning import exit_codes, lessons_files
from evidence.lessons import render_markdown
from tests.unit.test_agents import FakeMachine, work

DOC: dict[str, Any] = {
    "repo": "/repos/app",
    "open_failures": [
        {
            "signature": "a1b2c3d4e5f6a7b8c9d0e1f2",
            "kind": "test",
            "stage": "test",
            "count": 4,
            "last_seen": "2026-12-03T19:00:00+00:00",
            "sample": "test_app::test_sum (AssertionError): assert 2 == 3",
        }
    ],
    "fixes": [
        {
            "signature": "ffeeddccbbaa998877665544",
            "kind": "setup",
            "stage": "test",
            "count": 2,
            "last_seen": "2026-12-02T10:00:00+00:00",
            "sample": "ModuleNotFoundError: No module named 'flask'\nmore",
            "fixed_by": "r-0123456789",
            "diff_excerpt": "+flask==3.0\n",
        }
    ],
    "flaky_tests": [{"test": "test_app::test_clock", "state": "flaky", "score": 0.3}],
    "quarantined_tests": [],
}


def test_markdown_names_failures_samples_fixes_and_flaky_tests() -> None:
    text = render_markdown(DOC)
    assert text.startswith("# Lessons from earlier runs of /repos/app")
    assert "seen 4 time(s) (signature `a1b2c3d4e5f6`)" in text
    assert "assert 2 == 3" in text
    assert "fixed by run `r-0123456789`" in text
    assert "No module named 'flask'" in text
    assert "+flask==3.0" in text
    assert "`test_app::test_clock`" in text
    empty = render_markdown({"repo": "x", "open_failures": [], "fixes": []})
    assert "Nothing learned yet" in empty
    assert set(lessons_files(DOC)) == {"lessons.md", "lessons.json"}


def test_planner_puts_the_lessons_into_plan_md() -> None:
    machine = FakeMachine(answers={"git ls-files": CommandResult(0, "app.py\n", "", 1.0)})
    machine.files["/workspace/.shopfloor/lessons.md"] = render_markdown(DOC).encode()
    result = PlannerAgent().run(work(machine))
    plan = machine.files["/workspace/.shopfloor/plan.md"].decode()
    assert result.status == "passed"
    assert "## Lessons from earlier runs of /repos/app" in plan  # one level down
    assert "assert 2 == 3" in plan
    without = FakeMachine(answers={"git ls-files": CommandResult(0, "app.py\n", "", 1.0)})
    PlannerAgent().run(work(without))
    assert b"Lessons" not in without.files["/workspace/.shopfloor/plan.md"]


def test_external_agent_gets_the_lessons_path() -> None:
    machine = FakeMachine()
    ExternalAgent().run(work(machine, command="agent --notes {lessons} {task}"))
    assert any("agent --notes /workspace/.shopfloor/lessons.md 'do it'" in c for c in machine.ran)


def test_exit_codes_as_agents_report_them() -> None:
    assert exit_codes({"exit_codes": [0, 137]}) == [0, 137]
    assert exit_codes({"exit_codes": [0, None]}) == [0, None]
    assert exit_codes({"exit_code": 2}) == [2]
    assert exit_codes({}) == []
