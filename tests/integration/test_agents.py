"""Stage agents against a real machine holding the sample repo (one machine per module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from make_repo import make_sample_repo

from agents.base import Assignment, MachineHandle, StageResult
from agents.registry import get_agent
from controller.services.handles import handle_for
from controller.services.machines import get_machine
from controller.services.runtime import Controller
from controller.store.db import unit_of_work


@pytest.fixture(scope="module")
def repo_machine(module_client: TestClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    repo = make_sample_repo(tmp_path_factory.mktemp("repo") / "sample-app")
    response = module_client.post("/api/v1/machines?wait=true", json={"repo": str(repo)})
    assert response.json()["state"] == "ready", response.text
    return str(response.json()["id"])


@pytest.fixture
def handle(module_client: TestClient, repo_machine: str) -> Iterator[MachineHandle]:
    ctl: Controller = module_client.app.state.controller  # type: ignore[attr-defined]
    with unit_of_work(ctl.db) as tx:
        machine = get_machine(tx, repo_machine)
    machine_handle = handle_for(ctl, machine)
    yield machine_handle
    machine_handle.run("git reset -q --hard && git clean -fdxq && rm -rf /workspace/.shopfloor")


def stage(
    agent: str, handle: MachineHandle, task: str = "Add a farewell page", **params: Any
) -> StageResult:
    work = Assignment(
        run_id="r-test",
        task=task,
        repo="sample-app",
        ref="HEAD",
        stage=agent,
        attempt=1,
        params=params,
        machine=handle,
        timeout_s=120,
    )
    return get_agent(agent).run(work)


def kinds(result: StageResult) -> list[str]:
    return [a.kind for a in result.artifacts]


def test_planner_writes_a_plan_from_the_template(handle: MachineHandle) -> None:
    result = stage("planner", handle)
    assert result.status == "passed", result.summary
    plan = handle.read_file("/workspace/.shopfloor/plan.md").decode()
    assert "Add a farewell page" in plan
    assert "`run_tests.py`" in plan
    assert "`.shopfloor.toml`" in plan
    assert kinds(result) == ["plan"]


def test_external_gets_the_task_as_one_literal_argument(handle: MachineHandle) -> None:
    task = 'it\'s "$(touch /tmp/pwned)" `id` ; rm -rf /'
    command = "sh -c 'printf %s \"$1\" > notes.txt; echo agent done' agent {task}"
    result = stage("external", handle, task=task, command=command)
    assert result.status == "passed", result.summary
    assert handle.read_file("notes.txt").decode() == task
    assert handle.run("test -e /tmp/pwned").exit_code == 1
    transcript = next(a for a in result.artifacts if a.kind == "log").data.decode()
    assert "agent done" in transcript
    patch = next(a for a in result.artifacts if a.kind == "diff").data.decode()
    assert "+++ b/notes.txt" in patch


def test_external_command_not_installed_fails_clearly(handle: MachineHandle) -> None:
    result = stage("external", handle, command="claude -p {task}")
    assert result.status == "failed"
    assert "'claude' is not installed in the machine" in result.summary
    missing = stage("external", handle)
    assert missing.status == "failed"
    assert "command template" in missing.summary


def test_planner_through_an_external_agent(handle: MachineHandle) -> None:
    command = 'sh -c \'mkdir -p "$(dirname "$2")"; printf "# Plan by agent\\n%s\\n" "$1" > "$2"\' a {task} {plan}'
    result = stage("planner", handle, command=command)
    assert result.status == "passed", result.summary
    plan = handle.read_file("/workspace/.shopfloor/plan.md").decode()
    assert plan.startswith("# Plan by agent\n")
    assert "Add a farewell page" in plan
    assert "plan" in kinds(result)


def test_tester_collects_junit_and_log(handle: MachineHandle) -> None:
    result = stage("tester", handle)
    assert result.status == "passed", result.summary
    assert sorted(kinds(result)) == ["junit", "log"]
    junit = next(a for a in result.artifacts if a.kind == "junit").data.decode()
    assert 'tests="2"' in junit
    assert 'failures="0"' in junit
    assert b"Ran 2 tests" in next(a for a in result.artifacts if a.kind == "log").data


def test_tester_fails_on_a_failing_test_and_keeps_the_evidence(handle: MachineHandle) -> None:
    handle.run("sed -i 's/Hello, /Bye, /' app.py")
    result = stage("tester", handle)
    assert result.status == "failed"
    assert "exit 1" in result.summary
    junit = next(a for a in result.artifacts if a.kind == "junit").data.decode()
    assert 'failures="1"' in junit
    assert stage("tester", handle, test="true", junit=[]).status == "passed"  # `with` wins


def test_reviewer_reports_the_change_and_lint(handle: MachineHandle) -> None:
    handle.run("echo '# reviewed' >> app.py && echo new > added.txt")
    result = stage("reviewer", handle)
    assert result.status == "passed", result.summary
    patch = next(a for a in result.artifacts if a.kind == "diff").data.decode()
    assert "+# reviewed" in patch
    assert "+++ b/added.txt" in patch
    assert result.outputs["files_changed"] == 2
    assert (
        handle.run("git status --porcelain").stdout == " M app.py\n?? added.txt\n"
    )  # index untouched
    assert any(a.name == "lint.log" for a in result.artifacts)
    broken = stage("reviewer", handle, lint="python3 -c 'raise SystemExit(2)'")
    assert broken.status == "failed"
    assert "lint failed (exit 2)" in broken.summary


def test_qa_screenshots_the_sample_app(handle: MachineHandle) -> None:
    result = stage("qa", handle)
    assert result.status == "passed", result.summary
    shots = [a for a in result.artifacts if a.kind == "screenshot"]
    assert [a.meta["page"] for a in shots] == ["/", "/about"]
    assert all(a.data.startswith(b"\x89PNG") for a in shots)
    assert shots[0].meta["status"] == 200
    assert shots[0].meta["console_errors"] == []
    assert handle.run("(exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null").exit_code != 0  # stopped


BAD_SERVER = """
import http.server, os, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/hang":
            time.sleep(60)
            return
        self.send_response(500 if self.path == "/boom" else 200)
        body = b"<h1>page</h1><script>console.error('broken script')</script>"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
server.daemon_threads = True
server.serve_forever()
"""


def test_qa_records_500_and_never_loading_pages_as_failures(handle: MachineHandle) -> None:
    handle.write_file("/tmp/bad_server.py", BAD_SERVER.encode())
    result = stage(
        "qa",
        handle,
        serve="python3 /tmp/bad_server.py",
        port=8100,
        pages=["/", "/boom", "/hang"],
        page_timeout_s=3,
    )
    assert result.status == "failed"
    assert "/boom: HTTP 500" in result.summary
    assert "/hang: did not load within 3s" in result.summary
    pages = {p["page"]: p for p in result.outputs["pages"]}
    assert pages["/"]["ok"] is True
    assert pages["/"]["console_errors"] == ["broken script"]
    assert pages["/boom"]["status"] == 500
    assert any("500" in r for r in pages["/boom"]["failed_requests"])
    assert [a.meta["page"] for a in result.artifacts if a.kind == "screenshot"] == ["/", "/boom"]


def test_qa_app_that_never_listens(handle: MachineHandle) -> None:
    result = stage("qa", handle, serve="echo starting; exit 1", port=8101, pages=["/"])
    assert result.status == "failed"
    assert "exited before it listened" in result.summary
    assert b"starting" in next(a for a in result.artifacts if a.name == "qa-serve.log").data
    missing = stage("qa", handle, serve=None, port=None, pages=[])
    assert missing.status == "failed"
    assert "qa needs serve, port, pages" in missing.summary


def test_bad_shopfloor_toml_is_a_clear_error(handle: MachineHandle, tmp_path: Path) -> None:
    handle.write_file(".shopfloor.toml", b"test = 'x'\nprot = 8000\n")
    with pytest.raises(ValueError, match="unknown key"):
        stage("tester", handle)
