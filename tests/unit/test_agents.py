"""Agent logic with an in-memory machine (the real-machine tests are in integration)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from agents.base import Assignment, CommandResult
from agents.external import ExternalAgent, program, render
from agents.planner import MAX_FILES, template_plan
from agents.qa import QaAgent
from agents.tester import _glob_word
from evidence.capture import PageShot


@dataclass
class FakeMachine:
    """Answers commands from a script of (substring -> result); records what ran."""

    answers: dict[str, CommandResult] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    machine_id: str = "m-fake"
    workdir: str = "/workspace/app"

    def run(self, cmd: str, **_: Any) -> CommandResult:
        self.ran.append(cmd)
        for needle, result in self.answers.items():
            if needle in cmd:
                return result
        return CommandResult(0, "", "", 1.0)

    def read_file(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]

    def write_file(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def forward(self, port: int) -> str:
        return f"http://127.0.0.1:1{port}"


def work(machine: FakeMachine, **params: Any) -> Assignment:
    return Assignment(
        run_id="r",
        task="do it",
        repo="app",
        ref="HEAD",
        stage="s",
        attempt=1,
        params=params,
        machine=machine,
        timeout_s=30,
    )


def test_render_quotes_every_placeholder_and_leaves_other_braces() -> None:
    task = "it's $(rm -rf /) `x`"
    command = render("agent -p {task} --json '{\"a\": 1}' {unknown}", {"task": task})
    words = shlex.split(command)
    assert words[2] == task
    assert "{unknown}" in command
    assert "'{\"a\": 1}'" in command


def test_program_skips_env_assignments() -> None:
    assert program("FOO=1 BAR=2 claude -p {task}") == "claude"
    assert program("aider --yes") == "aider"
    assert program("'unbalanced") == "'unbalanced"


def test_external_not_installed_runs_nothing_else() -> None:
    machine = FakeMachine({"command -v": CommandResult(1, "", "", 1.0)})
    result = ExternalAgent().run(work(machine, command="codex exec {task}"))
    assert result.status == "failed"
    assert "'codex' is not installed" in result.summary
    assert len(machine.ran) == 1


def test_template_plan_lists_files_and_caps_the_list() -> None:
    plan = template_plan("Fix it", [f"f{i}.py" for i in range(MAX_FILES + 5)])
    assert "## Task\n\nFix it" in plan
    assert "`f0.py`" in plan
    assert "... and 5 more" in plan


def test_glob_word_expands_globs_only() -> None:
    assert _glob_word("test-results/*.xml") == "test-results/*.xml"
    assert _glob_word("a b;rm/*.xml") == "a' 'b';'rm/*.xml"


def test_qa_reports_page_failures_and_stops_the_app() -> None:
    machine = FakeMachine({"setsid": CommandResult(0, "4242\n", "", 1.0)})
    shots = [
        PageShot(page="/", url="u/", ok=True, status=200, png=b"\x89PNG"),
        PageShot(
            page="/boom", url="u/boom", ok=False, status=500, reason="HTTP 500", png=b"\x89PNG"
        ),
        PageShot(page="/hang", url="u/hang", ok=False, reason="did not load within 1s"),
    ]
    seen: dict[str, Any] = {}

    def capture(url: str, pages: list[str], **kwargs: Any) -> list[PageShot]:
        seen.update(url=url, pages=pages, **kwargs)
        return shots

    result = QaAgent(capture).run(
        work(machine, serve="app", port=8000, pages=["/", "/boom", "/hang"])
    )
    assert result.status == "failed"
    assert result.summary == "pages failed: /boom: HTTP 500; /hang: did not load within 1s"
    assert seen["url"] == "http://127.0.0.1:18000"
    assert [a.name for a in result.artifacts if a.kind == "screenshot"] == ["index.png", "boom.png"]
    assert any("kill -TERM -- -4242" in cmd for cmd in machine.ran)


def test_qa_without_config_says_what_is_missing() -> None:
    result = QaAgent().run(work(FakeMachine(), serve="app"))
    assert result.status == "failed"
    assert "qa needs port, pages" in result.summary
