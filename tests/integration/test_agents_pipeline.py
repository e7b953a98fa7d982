"""The built-in agents through the real run driver: plan, test, review, QA on the sample app.

Then a remote agent (the Python client) adds its own evidence to a stage while the run
holds the machine, the way an agent outside the controller would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from agents.client import Client
from controller.models import Role
from controller.settings import Settings
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
        {"name": "test", "agent": "tester"},
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
    assert "screenshot" in by_stage["qa"]


def test_remote_agent_uploads_evidence_and_reports_under_the_runs_lease(
    live_client: TestClient, sample_repo: Path, settings: Settings
) -> None:
    live_client.put(
        "/api/v1/pools/remote", json={"template": {"repo": str(sample_repo)}, "min_ready": 1}
    )
    stages = [{"name": "work", "agent": "command", "with": {"cmd": "sleep 60"}}]
    created = live_client.post(
        "/api/v1/runs",
        json={"task": "remote", "repo": str(sample_repo), "pool": "remote", "stages": stages},
    )
    run_id = created.json()["id"]
    deadline = time.monotonic() + 120
    while True:
        run = live_client.get(f"/api/v1/runs/{run_id}").json()
        if run["machine_id"] and run["stages"][0]["status"] == "running":
            break
        assert time.monotonic() < deadline, run
        time.sleep(0.3)
    token = live_client.get(f"/api/v1/machines/{run['machine_id']}").json()["lease_token"]
    client = Client("http://testserver", issue_token(settings, Role.agent), http=live_client)
    try:
        uploaded = client.upload_artifact(
            run_id, "work", b"remote log\n", kind="log", name="remote.log", lease_token=token
        )
        assert uploaded["kind"] == "log"
        report = client.report_stage(
            run_id, "work", status="passed", summary="done remotely", lease_token=token
        )
        assert report["name"] == "stage-report.json"
        names = {
            a["name"] for a in live_client.get(f"/api/v1/runs/{run_id}/artifacts").json()["data"]
        }
        assert {"remote.log", "stage-report.json"} <= names
    finally:
        live_client.post(f"/api/v1/runs/{run_id}/cancel")
