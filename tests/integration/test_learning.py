"""Flow learning on the real engine: signatures counted across runs and fixed by a later
run, lessons in a new run's handoff folder (and its plan), and a machine whose stage keeps
being OOM-killed (exit 137) quarantined, moved off, never leased, and brought back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from controller.settings import Settings
from tests.integration.test_leases import agent, lease, put_pool, wait_ready
from tests.integration.test_runs import CTX, cmd, create_run, wait_run

API = "/api/v1"
FAILING = "python3 -c \"import time; assert 1 + 1 == 3, f'sum wrong at {time.time()}'\""
PASSING = "python3 -c 'assert 1 + 1 == 2'"


def failures(client: TestClient, **query: str) -> dict[str, Any]:
    response = client.get(f"{API}/learning/failures", params=query)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_signature_counted_across_runs_fixed_later_and_taught_in_lessons(
    live_client: TestClient, settings: Settings, sample_repo: Path
) -> None:
    client = live_client
    repo = str(sample_repo)
    put_pool(client, "sig", template={"repo": repo}, min_ready=1, max_machines=2, reset="keep")
    wait_ready(client, "sig", 1)
    failed = []
    for _ in range(2):
        run = create_run(client, task="sum", repo=repo, pool="sig", stages=[cmd("test", FAILING)])
        failed.append(wait_run(client, run["id"]))
    assert [r["status"] for r in failed] == ["failed", "failed"]

    found = failures(client, repo=repo, stage="test")
    assert found["count"] == 1, json.dumps(found, indent=1)
    sig = found["data"][0]
    assert (sig["kind"], sig["count"], sig["fixed_by"]) == ("test", 2, None)
    assert sig["runs"] == [failed[1]["id"], failed[0]["id"]]
    assert "AssertionError: sum wrong at" in sig["sample"]
    assert failures(client, kind="infra")["count"] == 0
    # any role reads them
    assert client.get(f"{API}/learning/failures", headers=agent(settings)).status_code == 200

    # A new run finds the lessons (and its plan carries them), passes the stage: the fix.
    check = (
        f"grep -q 'sum wrong at' {CTX}/lessons.md && grep -q 'Lessons from earlier runs' "
        f"{CTX}/plan.md && python3 -c \"import json; d = json.load(open('{CTX}/lessons.json'));"
        f" assert d['open_failures'][0]['count'] == 2\" && {PASSING}"
    )
    fixing = create_run(
        client,
        task="fix the sum",
        repo=repo,
        pool="sig",
        stages=[{"name": "plan", "agent": "planner"}, cmd("test", check)],
    )
    done = wait_run(client, fixing["id"])
    assert done["status"] == "passed", json.dumps(done, indent=1)
    sig = failures(client, repo=repo, stage="test")["data"][0]
    assert sig["fixed_by"] == fixing["id"]
    assert sig["open"] is False
    events = client.get(f"{API}/events", params={"kind": "learning."}).json()["data"]
    assert [e["kind"] for e in events] == ["learning.signature"] * 2 + ["learning.fixed"]


KILLED_ON_BAD = f"test ! -e /home/runner/bad-machine || kill -9 $$; {PASSING}"


def test_machine_with_repeated_infra_failures_is_quarantined_and_run_moves(
    live_client: TestClient, settings: Settings, sample_repo: Path
) -> None:
    client = live_client
    repo = str(sample_repo)
    build = cmd("build", KILLED_ON_BAD, retries=2)
    put_pool(client, "q", template={"repo": repo}, min_ready=1, max_machines=3, reset="keep")
    wait_ready(client, "q", 1)
    good_run = wait_run(
        client, create_run(client, task="b", repo=repo, pool="q", stages=[build])["id"]
    )
    assert good_run["status"] == "passed"
    good = good_run["machine_id"]

    # A second machine, the only one free (the good one is held), gets OOM-killed commands.
    put_pool(client, "q", template={"repo": repo}, min_ready=2, max_machines=3, reset="keep")
    wait_ready(client, "q", 2)
    held = lease(client, {}, machine_id=good)
    bad = next(
        m["id"]
        for m in client.get(f"{API}/machines", params={"pool": "q", "state": "ready"}).json()[
            "data"
        ]
    )
    marked = client.post(f"{API}/machines/{bad}/exec", json={"cmd": "touch ~/bad-machine"})
    assert marked.json()["exit_code"] == 0, marked.text

    run = wait_run(client, create_run(client, task="b", repo=repo, pool="q", stages=[build])["id"])
    assert run["status"] == "passed", json.dumps(run, indent=1)
    assert run["context_recreations"] == 1
    stage = run["stages"][0]
    assert [a["machine_id"] for a in stage["history"]] == [bad] * 3 + [run["machine_id"]]
    assert run["machine_id"] not in (bad, good)

    machine = client.get(f"{API}/machines/{bad}").json()
    assert machine["state"] == "quarantined"
    assert "3 infra failures" in machine["reason"]
    infra = failures(client, kind="infra")["data"]
    assert [(s["stage"], s["count"]) for s in infra] == [("build", 3)]
    assert infra[0]["signature"][:12] in machine["reason"]
    refused = client.post(f"{API}/leases", json={"holder": "x", "machine_id": bad})
    assert refused.status_code == 409, refused.text
    assert client.get(f"{API}/pools/q").json()["counts"]["quarantined"] == 1
    kinds = [e["kind"] for e in client.get(f"{API}/events", params={"subject": bad}).json()["data"]]
    assert "machine.quarantined" in kinds

    back = client.post(f"{API}/machines/{bad}/unquarantine")
    assert back.status_code == 200, back.text
    assert back.json()["state"] == "ready"
    assert client.post(f"{API}/machines/{bad}/unquarantine").status_code == 409
    again = lease(client, {}, machine_id=bad)
    assert again["machine_id"] == bad
    for lease_id in (again["id"], held["id"]):
        assert client.delete(f"{API}/leases/{lease_id}").status_code == 200
    kinds = [e["kind"] for e in client.get(f"{API}/events", params={"subject": bad}).json()["data"]]
    assert "machine.unquarantined" in kinds
