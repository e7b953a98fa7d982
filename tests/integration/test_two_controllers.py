"""Two real controllers on one PostgreSQL; the one driving a run is SIGKILLed mid-run.

Before issue 12 both controllers ran every loop: each reconciled the database's machines
against its own install id's containers (and marked the other's ``lost``), and each started
a driver for every queued run (a stage ran on two machines; the run ended ``failed`` with
all its stages ``passed``). Now the loops run in the leader only, each run is claimed by
one driver with a heartbeat, and all controllers on one database share its install id.

Each has its own data dir (its SSH key, mirrors, disks): the install id they label
containers with comes from the database, not from the data dir, so with two data dirs the
old code gave them two ids and each judged the other's machines lost.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
from pg_cluster import PgCluster

from controller.store.models import Role
from tests.integration.conftest import ControllerProcess, wait_json

CTX = "/workspace/.shopfloor"


def test_two_controllers_drive_a_run_once_and_take_it_over_when_one_dies(
    tmp_path: Path, runner_image: str, sample_repo: Path, pg_cluster: PgCluster
) -> None:
    env = {
        # Over TCP, as controllers on two hosts reach it (the other tests take its socket).
        "SHOPFLOOR_DATABASE_URL": pg_cluster.tcp_url,
        "SHOPFLOOR_POOL_INTERVAL_S": "0.3",
        "SHOPFLOOR_RUN_POLL_INTERVAL_S": "0.2",
        "SHOPFLOOR_LEASE_REAP_INTERVAL_S": "0.3",
        "SHOPFLOOR_RECONCILE_INTERVAL_S": "0.5",
        "SHOPFLOOR_LEADER_TTL_S": "3",
        "SHOPFLOOR_RUN_CLAIM_TTL_S": "4",
        "SHOPFLOOR_RUN_LEASE_TTL_S": "60",
    }
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = ControllerProcess(tmp_path / "a" / "data", runner_image, **env).start()
    second = ControllerProcess(tmp_path / "b" / "data", runner_image, **env).start()
    try:
        ops = {"Authorization": f"Bearer {first.token(Role.ops)}"}
        one = httpx.Client(base_url=first.url, headers=ops, timeout=60)
        two = httpx.Client(base_url=second.url, headers=ops, timeout=60)
        pool = {"template": {"repo": str(sample_repo)}, "min_ready": 2, "max_machines": 3}
        assert two.put("/api/v1/pools/two", json=pool).status_code == 200
        wait_json(
            one, "/api/v1/machines?state=ready", lambda p: p["count"] >= 2, "two ready machines"
        )
        stages = [
            {"name": "plan", "agent": "command", "with": {"cmd": f"echo p > {CTX}/plan.md"}},
            {
                "name": "implement",
                "agent": "command",
                "with": {"cmd": f"touch {CTX}/started-$(date +%s%N); sleep 8"},
            },
            {"name": "test", "agent": "command", "with": {"cmd": f"test -f {CTX}/plan.md"}},
        ]
        body = {"task": "two", "repo": str(sample_repo), "pool": "two", "stages": stages}
        created = two.post("/api/v1/runs", json=body)  # any controller serves the API
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        running = wait_json(
            one,
            f"/api/v1/runs/{run_id}",
            lambda r: r["stages"][1]["status"] == "running",
            "the implement stage to start",
        )
        started = [e for e in running["events"] if e["kind"] == "run.started"]
        assert len(started) == 1, running["events"]
        driver = str(started[0]["data"]["driver"])
        pid = int(driver.split(":")[1])
        assert pid in (first.process.pid, second.process.pid), driver
        dying, survivor = (first, second) if pid == first.process.pid else (second, first)
        dying.kill()
        http = httpx.Client(base_url=survivor.url, headers=ops, timeout=60)

        ended = wait_json(
            http,
            f"/api/v1/runs/{run_id}",
            lambda r: r["status"] in ("passed", "failed", "cancelled"),
            "the run to end on the surviving controller",
        )
        assert ended["status"] == "passed", ended
        kinds = Counter(e["kind"] for e in ended["events"])
        assert kinds["run.finished"] == 1, ended["events"]
        assert kinds["run.started"] == 1, ended["events"]
        assert kinds["run.resumed"] == 1, ended["events"]
        for stage in ended["stages"]:
            assert stage["status"] == "passed", stage
            machines = {entry["machine_id"] for entry in stage["history"]}
            assert len(machines) == 1, stage["history"]  # every attempt on one machine
        # every attempt of every stage started once
        page = http.get("/api/v1/events?limit=1000").json()["data"]
        starts = Counter(
            (e["data"].get("stage"), e["data"].get("attempt"))
            for e in page
            if e["kind"] == "stage.started" and e["data"].get("run_id") == run_id
        )
        assert starts, page
        assert set(starts.values()) == {1}, starts
        implement = ended["stages"][1]
        assert implement["attempts"] == 2
        assert "controller restarted during attempt 1" in implement["history"][0]["summary"]
        assert ended["context_recreations"] == 0
        # no machine was marked lost by either controller
        assert http.get("/api/v1/machines?state=lost").json()["count"] == 0
        assert not [
            e for e in page if e["kind"] == "machine.state" and e["data"].get("state") == "lost"
        ]
        wait_json(
            http, "/api/v1/machines?state=leased", lambda p: p["count"] == 0, "no machine leased"
        )
        # the survivor leads the loops now (it took over, or kept, the leader lease)
        elected = [e for e in page if e["kind"] == "leader.elected"]
        assert elected, page
        assert str(elected[-1]["data"]["holder"]).split(":")[1] == str(survivor.process.pid)
    finally:
        first.stop()
        second.stop()
