"""The built-in agents through the real run driver: plan, test, review, QA on the sample app.

Then a remote agent (the Python client) claims a ``remote`` stage, works on the run's
machine under the run's lease, adds its evidence and reports, the way an agent outside the
controller would.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agents.client import Client
from controller.errors import Conflict, InvalidInput, StaleLease
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token


def wait_run(
    client: TestClient, run_id: str, done: set[str], timeout_s: float = 240
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        run: dict[str, Any] = client.get(f"/api/v1/runs/{run_id}").json()
        if run["status"] in done or time.monotonic() > deadline:
            return run
        time.sleep(0.3)


def test_plan_test_review_qa_leave_their_evidence(
    live_client: TestClient, sample_repo: Path
) -> None:
    pool = live_client.put(
        "/api/v1/pools/sample", json={"template": {"repo": str(sample_repo)}, "min_ready": 1}
    )
    assert pool.status_code == 200, pool.text
    stages = [
        {"name": "plan", "agent": "planner"},
        {  # reports where the repo's .gitignore does not hide them
            "name": "test",
            "agent": "tester",
            "with": {
                "test": "python3 run_tests.py --junit reports/junit.xml",
                "junit": "reports/*.xml",
            },
        },
        {"name": "review", "agent": "reviewer"},
        {"name": "qa", "agent": "qa", "with": {"pages": ["/", "/about"]}},
    ]
    created = live_client.post(
        "/api/v1/runs",
        json={
            "task": "Say goodbye too",
            "repo": str(sample_repo),
            "pool": "sample",
            "stages": stages,
        },
    )
    assert created.status_code == 201, created.text
    run = wait_run(live_client, created.json()["id"], {"passed", "failed", "cancelled"})
    assert run["status"] == "passed", run
    artifacts = live_client.get(f"/api/v1/runs/{run['id']}/artifacts").json()["data"]
    by_stage: dict[str, set[str]] = {}
    for artifact in artifacts:
        by_stage.setdefault(artifact["stage"], set()).add(artifact["kind"])
    assert "plan" in by_stage["plan"]
    assert {"junit", "log"} <= by_stage["test"]
    assert "diff" in by_stage["review"]
    review = run["stages"][2]  # the tester's reports are evidence, not a change of the run
    assert review["outputs"]["files_changed"] == 0, review
    assert review["summary"].startswith("0 file(s) changed"), review
    assert "screenshot" in by_stage["qa"]


def wait_stage(client: TestClient, run_id: str, stage: int, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        run: dict[str, Any] = client.get(f"/api/v1/runs/{run_id}").json()
        if run["stages"][stage]["status"] == status:
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)


def test_a_remote_agent_claims_a_stage_works_under_the_runs_lease_and_reports(
    live_client: TestClient, sample_repo: Path, settings: Settings
) -> None:
    live_client.put(
        "/api/v1/pools/remote", json={"template": {"repo": str(sample_repo)}, "min_ready": 1}
    )
    stages = [
        {"name": "plan", "agent": "command", "with": {"cmd": "echo planned > ../.shopfloor/p"}},
        {"name": "implement", "agent": "remote", "with": {"model": "any"}, "timeout_s": 120},
        {"name": "test", "agent": "command", "with": {"cmd": "cat ../.shopfloor/remote-was-here"}},
    ]
    token = issue_token(settings, Role.agent)
    created = live_client.post(  # the agent's own run: it may claim and report its stages
        "/api/v1/runs",
        json={"task": "remote", "repo": str(sample_repo), "pool": "remote", "stages": stages},
        headers={"Authorization": f"Bearer {token}"},
    )
    run_id = created.json()["id"]
    client = Client("http://testserver", token, http=live_client)

    with pytest.raises(Conflict, match="done by the 'command' agent"):
        client.claim_stage(run_id, "plan")
    wait_stage(live_client, run_id, 1, "running")
    claim = client.claim_stage(run_id, "implement")
    assert (claim.attempt, claim.task, claim.params) == (1, "remote", {"model": "any"})
    with claim.machine.session() as shell:  # the run's machine: the plan stage's notes are there
        shell.run(f"cd {claim.handoff_dir}")
        assert shell.run("cat p").output == "planned\n"
        assert shell.run("touch remote-was-here").ok
    client.upload_artifact(
        run_id, "implement", b"remote log\n", kind="log", name="remote.log",
        lease_token=claim.machine.token,
    )  # fmt: skip

    stale = replace(claim, machine=client.machine(claim.machine.id, str(claim.fence)))
    with pytest.raises(StaleLease):  # not the claim's token: refused, nothing kept
        client.report_stage(stale, status="failed", summary="from an old lease")
    earlier, claim = claim, client.claim_stage(run_id, "implement")  # a new claim, a new token
    assert claim.machine.token != earlier.machine.token
    with pytest.raises(StaleLease):  # the earlier claim's token stopped working
        client.report_stage(earlier, status="failed", summary="from an earlier claim")
    with pytest.raises(Conflict, match="is on attempt 1"):
        client.report_stage(replace(claim, attempt=2), status="passed", summary="wrong attempt")
    with pytest.raises(InvalidInput):
        client.report_stage(claim, status="maybe", summary="not a status")
    client.report_stage(claim, status="passed", summary="done remotely", outputs={"files": 1})
    with pytest.raises(Conflict, match="was already reported|is passed"):
        client.report_stage(claim, status="failed", summary="second thoughts")

    run = wait_run(live_client, run_id, {"passed", "failed", "cancelled"})
    assert run["status"] == "passed", run
    implement = run["stages"][1]
    assert (implement["summary"], implement["outputs"]) == ("done remotely", {"files": 1})
    assert run["stages"][1]["machine_id"] == run["stages"][2]["machine_id"] == claim.machine.id
    names = {a["name"] for a in live_client.get(f"/api/v1/runs/{run_id}/artifacts").json()["data"]}
    assert "remote.log" in names
    with pytest.raises(Conflict, match="is passed"):
        client.claim_stage(run_id, "implement")


def test_a_remote_stage_nobody_reports_fails_at_its_timeout(
    live_client: TestClient, sample_repo: Path
) -> None:
    live_client.put(
        "/api/v1/pools/remote", json={"template": {"repo": str(sample_repo)}, "min_ready": 1}
    )
    stages = [{"name": "implement", "agent": "remote", "timeout_s": 1}]
    created = live_client.post(
        "/api/v1/runs",
        json={"task": "nobody", "repo": str(sample_repo), "pool": "remote", "stages": stages},
    )
    run = wait_run(live_client, created.json()["id"], {"passed", "failed", "cancelled"})
    assert run["status"] == "failed", run
    assert "no remote agent reported within the stage's 1s" in run["stages"][0]["summary"]
