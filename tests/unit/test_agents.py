"""Agent logic with an in-memory machine (the real-machine tests are in integration)."""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
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


# ---------------------------------------------------------------- the review diff


@dataclass
class LocalMachine(FakeMachine):
    """Runs commands with bash in a local folder: the agents' git commands for real."""

    def run(self, cmd: str, *, cwd: str | None = None, **_: Any) -> CommandResult:
        self.ran.append(cmd)
        done = subprocess.run(
            ["bash", "-c", cmd],
            cwd=cwd or self.workdir,
            capture_output=True,
            text=True,
            check=False,
        )
        return CommandResult(done.returncode, done.stdout, done.stderr, 1.0)

    def read_file(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def write_file(self, path: str, data: bytes) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)


def local_repo(top: Path, junit: str = "test-results/*.xml") -> LocalMachine:
    """A committed repo at ``top`` whose tests write JUnit XML at ``junit`` (no .gitignore)."""
    top.mkdir(parents=True)
    (top / "app.py").write_text("print('hello')\n")
    (top / ".shopfloor.toml").write_text(f'test = "true"\njunit = [{junit!r}]\n')
    git = ["git", "-C", str(top), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "--initial-branch=main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "app"], check=True)
    return LocalMachine(workdir=str(top))


def leave_evidence(machine: LocalMachine, handoff: Path, junit_file: str) -> None:
    """What the run's own stages write: the handoff folder and the tester's JUnit XML."""
    (handoff / "plan").mkdir(parents=True)
    (handoff / "run.json").write_text("{}\n")
    (handoff / "plan" / "result.json").write_text("{}\n")
    report = Path(machine.workdir) / junit_file
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("<testsuite tests='1'/>\n")


def review(machine: LocalMachine, handoff: Path, **params: Any) -> Any:
    from agents.reviewer import ReviewerAgent

    return ReviewerAgent().run(replace(work(machine, **params), handoff_dir=str(handoff)))


def test_review_counts_the_change_not_the_runs_own_evidence(tmp_path: Path) -> None:
    """The checkout is /workspace itself here, so the handoff folder lies inside the repo."""
    machine = local_repo(tmp_path / "workspace")
    handoff = tmp_path / "workspace" / ".shopfloor"
    leave_evidence(machine, handoff, "test-results/junit.xml")
    (tmp_path / "workspace" / "app.py").write_text("print('bye')\n")
    (tmp_path / "workspace" / "test-results" / "notes.txt").write_text("not a report\n")

    result = review(machine, handoff)
    patch = next(a for a in result.artifacts if a.name == "changes.patch").data.decode()
    stat = next(a for a in result.artifacts if a.name == "diffstat.txt").data.decode()
    assert result.outputs["files_changed"] == 2, stat
    assert result.summary.startswith("2 file(s) changed")
    assert "+++ b/app.py" in patch
    assert "+++ b/test-results/notes.txt" in patch  # not a JUnit glob: a change like any other
    for evidence in ("junit.xml", ".shopfloor", "run.json"):
        assert evidence not in patch
        assert evidence not in stat


def test_review_excludes_the_globs_the_stage_was_given_and_runs_none_of_them(
    tmp_path: Path,
) -> None:
    machine = local_repo(tmp_path / "workspace" / "app")
    handoff = tmp_path / "workspace" / ".shopfloor"  # beside the checkout, as in a machine
    odd = "out $(touch pwned) 'x'/*.xml"
    leave_evidence(machine, handoff, "out $(touch pwned) 'x'/report.xml")
    (tmp_path / "workspace" / "app" / "app.py").write_text("print('bye')\n")

    result = review(machine, handoff, junit=[odd, "../elsewhere/*.xml", "/abs/*.xml"])
    stat = next(a for a in result.artifacts if a.name == "diffstat.txt").data.decode()
    assert result.outputs["files_changed"] == 1, stat
    assert "app.py" in stat
    assert not (tmp_path / "workspace" / "app" / "pwned").exists()
    assert not list(tmp_path.rglob("pwned"))


def test_external_agents_patch_leaves_out_the_runs_own_evidence(tmp_path: Path) -> None:
    machine = local_repo(tmp_path / "workspace")
    handoff = tmp_path / "workspace" / ".shopfloor"
    leave_evidence(machine, handoff, "test-results/junit.xml")
    command = "sed -i s/hello/bye/ app.py"
    result = ExternalAgent().run(replace(work(machine, command=command), handoff_dir=str(handoff)))
    assert result.status == "passed", result.summary
    patch = next(a for a in result.artifacts if a.kind == "diff").data.decode()
    assert "+print('bye')" in patch
    assert "junit.xml" not in patch
    assert ".shopfloor" not in patch


def test_review_leaves_out_the_junit_files_a_test_stage_reported(tmp_path: Path) -> None:
    """The test stage's ``with`` named other globs than the repo's file: run.json tells."""
    machine = local_repo(tmp_path / "workspace")
    handoff = tmp_path / "workspace" / ".shopfloor"
    leave_evidence(machine, handoff, "reports/junit.xml")
    stages = [{"name": "test", "agent": "tester", "outputs": {"junit": ["reports/junit.xml"]}}]
    (handoff / "run.json").write_text(json.dumps({"stages": stages}))
    (tmp_path / "workspace" / "app.py").write_text("print('bye')\n")
    result = review(machine, handoff)
    stat = next(a for a in result.artifacts if a.name == "diffstat.txt").data.decode()
    assert result.outputs["files_changed"] == 1, stat
    assert "reports" not in stat
