"""Pools with ``prebuild`` on the real engine (issue 15): setup once per pool and commit."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.integration.test_leases import put_pool, wait_for

API = "/api/v1"
SETUP = "hostname >> /workspace/setup-runs"
"""Each run of the setup appends the machine's own hostname: a machine made from the
snapshot has the builder's line, and only that one."""


def ready_machines(client: TestClient, pool: str) -> list[dict[str, Any]]:
    found = client.get(f"{API}/machines", params={"pool": pool, "state": "ready"}).json()
    return list(found["data"])


def setup_runs(client: TestClient, machine_id: str) -> list[str]:
    ran = client.post(
        f"{API}/machines/{machine_id}/exec", json={"cmd": "cat /workspace/setup-runs"}
    )
    assert ran.status_code == 200, ran.text
    assert ran.json()["exit_code"] == 0, ran.json()
    return list(ran.json()["stdout"].split())


def full_pool(client: TestClient, pool: str, n: int) -> list[dict[str, Any]]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: len(m := ready_machines(client, pool)) >= n and m,
        timeout_s=180,
        what=f"{n} ready machines in pool {pool}",
    )


def commit(repo: Path) -> str:
    (repo / "NEWS").write_text("a new commit\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "NEWS"], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "news"], check=True)
    return subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_a_prebuild_pool_runs_its_setup_once_and_rebuilds_on_a_new_commit(
    live_client: TestClient, sample_repo: Path
) -> None:
    client = live_client
    template = {"repo": str(sample_repo), "setup": [SETUP], "prebuild": True}
    put_pool(client, "pre", template=template, min_ready=3, max_machines=3)
    machines = full_pool(client, "pre", 3)
    pool = client.get(f"{API}/pools/pre").json()
    first_snapshot = pool["prebuilt"]
    assert first_snapshot
    runs = {m["id"]: setup_runs(client, m["id"]) for m in machines}
    # One setup for the whole pool: every machine has exactly the builder's one line.
    assert all(len(lines) == 1 for lines in runs.values()), runs
    assert len({lines[0] for lines in runs.values()}) == 1, runs
    from_snapshot = [m for m in machines if m["snapshot_id"] == first_snapshot]
    assert len(from_snapshot) == 2  # the builder itself joined the pool
    builder = next(m for m in machines if m["snapshot_id"] is None)
    assert builder["labels"]["prebuild-of"] == "pre"
    events = client.get(f"{API}/events", params={"subject": "pre"}).json()["data"]
    assert [e["kind"] for e in events].count("pool.prebuilt") == 1

    # A new commit on the ref: the next machines come from a new snapshot of it.
    head = commit(sample_repo)
    for machine in machines:
        gone = client.delete(f"{API}/machines/{machine['id']}")
        assert gone.status_code == 200, gone.text
    wait_for(
        lambda: client.get(f"{API}/pools/pre").json()["prebuilt"] not in (None, first_snapshot),
        timeout_s=180,
        what="a new prebuilt snapshot",
    )
    second = client.get(f"{API}/pools/pre").json()["prebuilt"]
    assert client.get(f"{API}/snapshots/{second}").json()["commit"] == head
    renewed = full_pool(client, "pre", 3)
    assert all(m["commit"] == head for m in renewed), renewed
    assert {m["snapshot_id"] for m in renewed} <= {second, None}
    lines = {setup_runs(client, m["id"])[0] for m in renewed}
    assert len(lines) == 1
    assert not lines & {runs[builder["id"]][0]}
    # The old snapshot is used by nothing now: retention may delete it (and so may ops).
    time.sleep(0.5)
    assert client.delete(f"{API}/snapshots/{first_snapshot}").status_code == 200
    refused = client.delete(f"{API}/snapshots/{second}")
    assert refused.status_code == 409
    assert "pools pre" in refused.json()["detail"]


def test_prebuild_bad_input(client: TestClient, sample_repo: Path) -> None:
    for template, words in (
        ({"prebuild": True}, "prebuild needs a repo or setup"),
        ({"prebuild": True, "snapshot": "snap-x"}, "leave out snapshot"),
    ):
        answer = client.put(f"{API}/pools/bad", json={"template": template})
        assert answer.status_code == 422, answer.text
        assert words in answer.json()["detail"]
    single = client.post(f"{API}/machines", json={"repo": str(sample_repo), "prebuild": True})
    assert single.status_code == 422
    assert "prebuild is for pools" in single.json()["detail"]
