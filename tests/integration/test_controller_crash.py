"""The controller is killed (SIGKILL) in the middle of a run and started again.

The run must end in a definite state with a reason, and no machine may stay leased.
Here the run's lease is still valid at restart, so the driver adopts it (same machine,
same workspace: no context re-creation), records the interrupted attempt as failed with
the reason, kills what the dead controller left running and retries the stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from controller.store.models import Role
from tests.integration.conftest import ControllerProcess, wait_json

CTX = "/workspace/.shopfloor"


def test_sigkill_mid_run_then_restart_ends_the_run_and_frees_the_machine(
    tmp_path: Path, runner_image: str, sample_repo: Path
) -> None:
    controller = ControllerProcess(
        tmp_path / "data",
        runner_image,
        SHOPFLOOR_POOL_INTERVAL_S="0.3",
        SHOPFLOOR_RUN_POLL_INTERVAL_S="0.2",
        SHOPFLOOR_LEASE_REAP_INTERVAL_S="0.3",
        SHOPFLOOR_RUN_LEASE_TTL_S="60",
    ).start()
    try:
        ops_token = controller.token(Role.ops)
        ops = {"Authorization": f"Bearer {ops_token}"}
        http = httpx.Client(base_url=controller.url, headers=ops, timeout=60)
        pool = {"template": {"repo": str(sample_repo)}, "min_ready": 1, "max_machines": 2}
        assert http.put("/api/v1/pools/crash", json=pool).status_code == 200
        stages = [
            {"name": "plan", "agent": "command", "with": {"cmd": f"echo p > {CTX}/plan.md"}},
            {
                "name": "implement",
                "agent": "command",
                "with": {"cmd": f"touch {CTX}/started-$(date +%s%N); sleep 6"},
                "retries": 1,
            },
            # Passes only in the same workspace: both attempts' markers are there.
            {
                "name": "test",
                "agent": "command",
                "with": {"cmd": f"test $(ls {CTX}/started-* | wc -l) -eq 2"},
            },
        ]
        body = {
            "task": "survive a crash",
            "repo": str(sample_repo),
            "pool": "crash",
            "stages": stages,
        }
        created = http.post("/api/v1/runs", json=body)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        before = wait_json(
            http,
            f"/api/v1/runs/{run_id}",
            lambda r: r["stages"][1]["status"] == "running",
            "the implement stage to start",
        )

        controller.kill()
        controller.start()
        http = httpx.Client(base_url=controller.url, headers=ops, timeout=60)

        ended = wait_json(
            http,
            f"/api/v1/runs/{run_id}",
            lambda r: r["status"] in ("passed", "failed", "cancelled"),
            "the run to end after the restart",
        )
        assert ended["status"] == "passed", ended
        implement = ended["stages"][1]
        assert implement["attempts"] == 2
        assert "controller restarted during attempt 1" in implement["history"][0]["summary"]
        assert ended["machine_id"] == before["machine_id"]
        assert ended["context_recreations"] == 0
        assert any(e["kind"] == "run.resumed" for e in ended["events"])
        wait_json(
            http,
            "/api/v1/machines?state=leased",
            lambda page: page["count"] == 0,
            "no machine left leased",
        )
        leases = http.get("/api/v1/leases?state=active").json()
        assert leases["count"] == 0

        # The CLI sees the same: the run in `runs ls`, the pool in `pools ls`.
        env = {**os.environ, "SHOPFLOOR_URL": controller.url, "SHOPFLOOR_TOKEN": ops_token}
        cli = str(Path(sys.executable).parent / "shopfloor")
        listed = subprocess.run([cli, "runs", "ls"], env=env, capture_output=True, text=True)
        assert listed.returncode == 0, listed.stderr
        assert run_id in listed.stdout
        assert "passed" in listed.stdout
        pools = subprocess.run([cli, "pools", "ls"], env=env, capture_output=True, text=True)
        assert "crash" in pools.stdout
        cancel = subprocess.run(
            [cli, "runs", "cancel", run_id], env=env, capture_output=True, text=True
        )
        assert cancel.returncode == 1
        assert "already ended" in cancel.stderr
    finally:
        controller.stop()


def test_a_session_outlives_a_controller_restart_within_its_lease(
    tmp_path: Path, runner_image: str
) -> None:
    """SIGKILL drops every SSH connection: each session's shell keeps its directory and
    exported variables in the machine, and the next controller process takes them over on
    the session's next command, as long as the machine is still under the same lease."""
    first = ControllerProcess(tmp_path / "data", runner_image).start()
    second = ControllerProcess(tmp_path / "data", runner_image)
    try:
        ops = {"Authorization": f"Bearer {first.token(Role.ops)}"}
        http = httpx.Client(base_url=first.url, headers=ops, timeout=120)
        machine_id = http.post("/api/v1/machines?wait=true", json={}).json()["id"]
        lease = http.post("/api/v1/leases", json={"machine_id": machine_id, "holder": "crash"})
        assert lease.status_code == 201, lease.text
        leased = {**ops, "X-Lease-Token": str(lease.json()["token"])}
        sessions = f"/api/v1/machines/{machine_id}/sessions"
        sid = http.post(sessions, headers=leased).json()["id"]
        setup = "mkdir -p '/tmp/kept dir' && cd '/tmp/kept dir' && export KEPT=yes"
        assert http.post(f"{sessions}/{sid}/run", json={"cmd": setup}, headers=leased).is_success
        other = http.post(sessions, headers=leased).json()["id"]

        first.kill()
        second.start()
        http = httpx.Client(base_url=second.url, headers=ops, timeout=120)
        after = http.post(f"{sessions}/{sid}/run", json={"cmd": "pwd; echo $KEPT"}, headers=leased)
        assert after.status_code == 200, after.text
        assert after.json()["output"] == "/tmp/kept dir\nyes\n"
        assert http.delete(f"{sessions}/{sid}", headers=leased).status_code == 204
        gone = http.post(f"{sessions}/{sid}/run", json={"cmd": "true"}, headers=leased)
        assert gone.status_code == 404, gone.text
        not_an_id = "s-..;rm -rf ~"  # never reaches a path or a shell in the machine
        forged = http.post(f"{sessions}/{not_an_id}/run", json={"cmd": "true"}, headers=leased)
        assert forged.status_code == 404, forged.text

        # Under a new lease, the other session's kept state is not handed over: the
        # hand-over between the two leases removed it, so the session is unknown.
        lease_id = lease.json()["id"]
        assert http.delete(f"/api/v1/leases/{lease_id}").status_code == 200
        body = {"machine_id": machine_id, "holder": "next", "wait_s": 60}
        again = http.post("/api/v1/leases", json=body)  # waits for the hand-over
        assert again.status_code == 201, again.text
        relet = {**ops, "X-Lease-Token": str(again.json()["token"])}
        stale = http.post(f"{sessions}/{other}/run", json={"cmd": "true"}, headers=relet)
        assert stale.status_code == 404, stale.text
        old_token = http.post(f"{sessions}/{other}/run", json={"cmd": "true"}, headers=leased)
        assert old_token.status_code == 409, old_token.text
    finally:
        first.kill()
        second.stop()
