"""Runs driven through their stages on one machine, against the real engine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from controller.providers.docker import DockerProvider
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token
from tests.integration.test_leases import put_pool, wait_for, wait_ready

API = "/api/v1"
CTX = "/workspace/.shopfloor"


def cmd(name: str, command: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "agent": "command", "with": {"cmd": command}, **extra}


FIVE_STAGES = [
    cmd(
        "plan",
        f"grep -q 'greet loudly' {CTX}/run.json && echo '1. shout the greeting' > {CTX}/plan.md",
    ),
    cmd(
        "implement",
        f"test -s {CTX}/plan.md && grep -q passed {CTX}/plan/result.json"
        " && sed -i 's/!/!!/' app.py",
    ),
    cmd(
        "test",
        "grep -q '!!' app.py && python3 -c 'from app import greeting; print(greeting(\"Ada\"))'",
    ),
    cmd("review", "git diff --stat | grep -q app.py && git diff > " + CTX + "/review.diff"),
    cmd("qa", f"test -s {CTX}/review.diff && grep -q Ada {CTX}/test/command.log"),
]


def create_run(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post(f"{API}/runs", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_run(client: TestClient, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (
            (r := client.get(f"{API}/runs/{run_id}").json())["status"]
            in ("passed", "failed", "cancelled")
            and r
        ),
        timeout_s=timeout_s,
        what=f"run {run_id} to end",
    )


def test_five_stage_run_keeps_one_machine_and_counts_in_flow(
    live_client: TestClient, settings: Settings, sample_repo: Path
) -> None:
    client = live_client
    put_pool(client, "app", template={"repo": str(sample_repo)}, min_ready=1, max_machines=2)
    wait_ready(client, "app", 1)
    agent = {"Authorization": f"Bearer {issue_token(settings, Role.agent)}"}
    response = client.post(
        f"{API}/runs",
        json={
            "task": "greet loudly",
            "repo": str(sample_repo),
            "pool": "app",
            "stages": FIVE_STAGES,
        },
        headers=agent,
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "queued"
    assert [s["status"] for s in created["stages"]] == ["pending"] * 5

    run = wait_run(client, created["id"])
    assert run["status"] == "passed", json.dumps(run, indent=1)
    assert [s["status"] for s in run["stages"]] == ["passed"] * 5
    assert {s["machine_id"] for s in run["stages"]} == {run["machine_id"]}
    assert all(s["attempts"] == 1 and s["started_at"] and s["finished_at"] for s in run["stages"])
    assert run["context_recreations"] == 0
    kinds = [e["kind"] for e in run["events"]]
    assert kinds[0] == "run.created"
    assert kinds[-1] == "run.finished"
    assert kinds.count("stage.attempt") == 5

    # The lease is given back and the machine returns to the pool, cleaned.
    machine = wait_for(
        lambda: (
            (m := client.get(f"{API}/machines/{run['machine_id']}").json())["state"] == "ready"
            and m
        ),
        what="the run's machine back to ready",
    )
    clean = client.post(
        f"{API}/machines/{machine['id']}/exec", json={"cmd": "git status --short; ls -A /workspace"}
    )
    assert clean.json()["stdout"].split() == ["sample-app"]

    figure = client.get(f"{API}/flow?window_h=1").json()
    assert figure["headline"]["numerator"] == 1
    assert figure["headline"]["denominator"] == 1
    assert figure["headline"]["share"] == 1.0
    assert figure["stages"]["plan"]["attempts"] == 1
    assert figure["stages"]["test"]["duration_ms_p50"] > 0
    assert figure["lease_wait_ms"]["count"] >= 1
    assert 0 < figure["machines"]["utilization"] <= 1

    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "shopfloor_flow_share 1.0" in metrics.text
    assert 'shopfloor_stage_duration_ms{quantile="p50",stage="qa"}' in metrics.text

    page = client.get(f"{API}/events?since=0&limit=5").json()
    assert page["count"] == 5
    rest = client.get(f"{API}/events?since={page['next']}&limit=1000").json()
    ids = [e["id"] for e in page["data"] + rest["data"]]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert any(e["kind"] == "lease.granted" for e in rest["data"])


def test_retry_timeout_and_failure_reason(live_client: TestClient, sample_repo: Path) -> None:
    client = live_client
    put_pool(client, "r", template={"repo": str(sample_repo)}, min_ready=1, max_machines=1)
    flaky = f"if [ -f {CTX}/tried ]; then echo second; else touch {CTX}/tried; exit 7; fi"
    run = create_run(
        client,
        task="retry then time out",
        repo=str(sample_repo),
        pool="r",
        stages=[
            cmd("plan", flaky, retries=1),
            cmd("test", "sleep 60", timeout_s=1),
            cmd("qa", "true"),
        ],
    )
    began = time.monotonic()
    ended = wait_run(client, run["id"])
    assert time.monotonic() - began < 60  # the 60 s sleep did not run to its end
    assert ended["status"] == "failed"
    plan, test, qa = ended["stages"]
    assert plan["status"] == "passed"
    assert plan["attempts"] == 2
    assert [h["status"] for h in plan["history"]] == ["failed", "passed"]
    assert "exit 7" in plan["history"][0]["summary"]
    assert test["status"] == "failed"
    assert "timed out" in test["summary"]
    assert qa["status"] == "skipped"
    assert "stage test failed after 1 attempt(s)" in ended["reason"]
    assert "timed out" in ended["reason"]

    figure = client.get(f"{API}/flow?window_h=1").json()
    assert figure["headline"]["numerator"] == 0
    assert figure["headline"]["denominator"] == 1
    assert figure["stages"]["plan"]["retries"] == 1
    assert figure["stages"]["plan"]["failures"] == 1


def test_cancel_stops_a_running_stage(live_client: TestClient, sample_repo: Path) -> None:
    client = live_client
    put_pool(
        client, "c", template={"repo": str(sample_repo)}, min_ready=1, max_machines=1, reset="keep"
    )
    run = create_run(
        client,
        task="cancel me",
        repo=str(sample_repo),
        pool="c",
        stages=[cmd("implement", "sleep 300"), cmd("test", "true")],
    )
    wait_for(
        lambda: client.get(f"{API}/runs/{run['id']}").json()["stages"][0]["status"] == "running",
        what="the stage to start",
    )
    cancelled = client.post(f"{API}/runs/{run['id']}/cancel")
    assert cancelled.status_code == 200
    ended = wait_run(client, run["id"], timeout_s=60)
    assert ended["status"] == "cancelled"
    assert [s["status"] for s in ended["stages"]] == ["cancelled", "cancelled"]
    machine_id = ended["machine_id"]
    machine = wait_for(
        lambda: (m := client.get(f"{API}/machines/{machine_id}").json())["state"] == "ready" and m,
        what="machine back to ready",
    )
    left = client.post(
        f"{API}/machines/{machine['id']}/exec", json={"cmd": "pgrep -x sleep || true"}
    )
    assert left.json()["stdout"] == ""
    again = client.post(f"{API}/runs/{run['id']}/cancel")
    assert again.status_code == 409


def test_lost_machine_moves_the_run_and_counts_a_recreation(
    live_client: TestClient, provider: DockerProvider, sample_repo: Path
) -> None:
    client = live_client
    put_pool(
        client, "l", template={"repo": str(sample_repo)}, min_ready=2, max_machines=3, reset="keep"
    )
    wait_ready(client, "l", 2)
    run = create_run(
        client,
        task="survive a lost machine",
        repo=str(sample_repo),
        pool="l",
        stages=[
            cmd("plan", f"echo planned > {CTX}/plan.md"),
            cmd("implement", "sleep 4; echo done"),
        ],
    )
    first = wait_for(
        lambda: (
            (r := client.get(f"{API}/runs/{run['id']}").json())["stages"][1]["status"] == "running"
            and r
        ),
        what="the second stage to start",
    )
    provider.remove_container(f"shopfloor-{first['machine_id']}")

    ended = wait_run(client, run["id"])
    assert ended["status"] == "passed", json.dumps(ended, indent=1)
    assert ended["context_recreations"] == 1
    assert ended["machine_id"] != first["machine_id"]
    implement = ended["stages"][1]
    assert implement["attempts"] == 2
    assert implement["history"][0]["machine_id"] == first["machine_id"]
    assert implement["machine_id"] == ended["machine_id"]
    lost = client.get(f"{API}/machines/{first['machine_id']}").json()
    assert lost["state"] == "lost"
    assert any(e["kind"] == "run.context_recreated" for e in ended["events"])
    figure = client.get(f"{API}/flow?window_h=1").json()
    assert figure["headline"]["numerator"] == 0
    assert figure["context_recreations"] == 1


def test_bad_run_input_gets_clear_4xx_or_a_failed_run(
    live_client: TestClient, sample_repo: Path
) -> None:
    client = live_client
    base = {"task": "t", "repo": str(sample_repo)}

    unknown_agent = client.post(
        f"{API}/runs", json={**base, "stages": [{"name": "x", "agent": "wizard"}]}
    )
    assert unknown_agent.status_code == 422
    assert "unknown agent 'wizard'" in unknown_agent.json()["detail"]
    assert "command" in unknown_agent.json()["detail"]
    no_stages = client.post(f"{API}/runs", json={**base, "stages": []})
    assert no_stages.status_code == 422
    twice = client.post(
        f"{API}/runs", json={**base, "stages": [cmd("a", "true"), cmd("a", "true")]}
    )
    assert twice.status_code == 422
    assert "repeated: a" in twice.json()["detail"]
    no_pool = client.post(
        f"{API}/runs", json={**base, "pool": "ghost", "stages": [cmd("a", "true")]}
    )
    assert no_pool.status_code == 404
    assert "unknown pool 'ghost'" in no_pool.json()["detail"]
    bad_retries = client.post(
        f"{API}/runs", json={**base, "stages": [cmd("a", "true", retries=99)]}
    )
    assert bad_retries.status_code == 422
    relative = client.post(
        f"{API}/runs", json={**base, "repo": "../etc", "stages": [cmd("a", "true")]}
    )
    assert relative.status_code == 422
    assert client.get(f"{API}/runs/r-missing").status_code == 404

    put_pool(
        client,
        "broken",
        template={"repo": str(sample_repo), "setup": ["exit 5"]},
        min_ready=1,
        max_machines=2,
    )
    doomed = create_run(client, **base, pool="broken", stages=[cmd("a", "true")])
    ended = wait_run(client, doomed["id"], timeout_s=120)
    assert ended["status"] == "failed"
    assert "pool broken cannot provide machines" in ended["reason"]
    assert "setup command 1" in ended["reason"]
    assert ended["stages"][0]["status"] == "skipped"


def test_run_without_pool_gets_its_own_machine(live_client: TestClient, sample_repo: Path) -> None:
    client = live_client
    run = create_run(
        client,
        task="private machine",
        repo=str(sample_repo),
        ref="main",
        stages=[cmd("test", "git rev-parse --abbrev-ref HEAD")],
    )
    ended = wait_run(client, run["id"])
    assert ended["status"] == "passed", ended
    assert "main" in ended["stages"][0]["history"][0]["log_tail"]
    gone = wait_for(
        lambda: (
            client.get(f"{API}/machines/{ended['machine_id']}").json().get("state")
            in (None, "destroyed")
        ),
        what="the run's private machine to be destroyed",
    )
    assert gone
    bad_ref = create_run(
        client, task="t", repo=str(sample_repo), ref="no-such-branch", stages=[cmd("a", "true")]
    )
    failed = wait_run(client, bad_ref["id"])
    assert failed["status"] == "failed"
    assert "unknown ref" in failed["reason"]
