"""A lease is a credential (issue 12): two agent tokens on a real ``shopfloor serve``.

Agent B tries everything on agent A's leased machine and A's run: A's fence number, a guess
and A's own secret (403: the lease belongs to A's API token), and looks for A's secret in
every answer it can read. An unleased machine is for ops; a secret of a lease that ended is
409 and applies nothing; the database keeps only the secret's hash.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from make_repo import make_sample_repo
from sqlalchemy import text

from controller.settings import Settings
from controller.store.db import make_engine
from controller.store.models import Role
from tests.integration.conftest import ControllerProcess

API = "/api/v1"


class Fleet:
    def __init__(self, controller: ControllerProcess) -> None:
        self.controller = controller
        self.http = {
            role: httpx.Client(
                base_url=controller.url,
                timeout=120,
                headers={"Authorization": f"Bearer {controller.token(r)}"},
            )
            for role, r in (("ops", Role.ops), ("a", Role.agent), ("b", Role.agent))
        }

    def call(
        self, who: str, method: str, path: str, token: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = {} if token is None else {"X-Lease-Token": token}
        return self.http[who].request(method, f"{API}{path}", headers=headers, **kw)

    def exec(self, who: str, machine_id: str, cmd: str, token: str | None) -> httpx.Response:
        return self.call(who, "POST", f"/machines/{machine_id}/exec", token, json={"cmd": cmd})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, runner_image: str) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("cred")
    controller = ControllerProcess(root / "data", runner_image).start()
    fleet = Fleet(controller)
    try:
        yield fleet
    finally:
        for machine in fleet.call("ops", "GET", "/machines").json()["data"]:
            fleet.call("ops", "DELETE", f"/machines/{machine['id']}")
        controller.stop()


def new_machine(fleet: Fleet) -> str:
    made = fleet.call("ops", "POST", "/machines?wait=true", json={})
    assert made.json()["state"] == "ready", made.text
    return str(made.json()["id"])


def test_b_cannot_use_or_see_the_lease_of_a(fleet: Fleet) -> None:
    machine_id = new_machine(fleet)
    grant = fleet.call("a", "POST", "/leases", json={"machine_id": machine_id, "holder": "a"})
    assert grant.status_code == 201, grant.text
    lease = grant.json()
    secret, fence = lease["token"], lease["fence"]
    assert isinstance(secret, str)
    assert len(secret) >= 32
    assert isinstance(fence, int)
    assert {"id", "machine_id", "token", "fence", "expires_at"} <= set(lease)

    # A's fence number and a guess are not credentials; A's secret is not B's to use.
    for guess, status in ((str(fence), 409), ("guessed-token", 409), (secret, 403)):
        tried = fleet.exec("b", machine_id, "touch /workspace/b-was-here", guess)
        assert tried.status_code == status, (guess, tried.text)
        assert secret not in tried.text
        assert "current_token" not in tried.json()
    base = f"/machines/{machine_id}"
    for method, path, kw in (
        ("POST", f"{base}/sessions", {}),
        ("PUT", f"{base}/files?path=b.txt", {"content": b"from b"}),
        ("GET", f"{base}/files?path=b.txt", {}),
        ("POST", f"{base}/ports", {"json": {"port": 8000}}),
    ):
        refused = fleet.call("b", method, path, secret, **kw)
        assert refused.status_code == 403, (path, refused.text)

    # A works under its secret; B cannot reach A's session either.
    assert fleet.exec("a", machine_id, "echo mine > a.txt", secret).json()["exit_code"] == 0
    sid = fleet.call("a", "POST", f"{base}/sessions", secret).json()["id"]
    ran = fleet.call("a", "POST", f"{base}/sessions/{sid}/run", secret, json={"cmd": "echo a"})
    assert ran.json()["output"] == "a\n"
    for guess in (str(fence), secret):
        hijack = fleet.call(
            "b", "POST", f"{base}/sessions/{sid}/run", guess, json={"cmd": "touch /tmp/b"}
        )
        assert hijack.status_code in (403, 409), hijack.text

    # Nobody sees the secret: machines, leases, the stale 409 above (checked), events.
    for who in ("b", "ops", "a"):
        for path in (base, "/machines", "/leases", f"/leases/{lease['id']}", "/events"):
            seen = fleet.call(who, "GET", path)
            assert seen.status_code == 200, (path, seen.text)
            assert secret not in seen.text, (who, path)
            assert "lease_token" not in seen.text
    assert fleet.call("b", "GET", base).json()["state"] == "leased"

    # Nothing B sent was applied.
    check = fleet.exec("a", machine_id, "ls /workspace/b-was-here b.txt /tmp/b", secret)
    assert check.json()["stdout"] == ""

    # The database keeps only the hash.
    engine = make_engine(Settings(data_dir=fleet.controller.data_dir).sqlalchemy_url)
    try:
        with engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM leases"))]
    finally:
        engine.dispose()
    stored = next(r for r in rows if r["id"] == lease["id"])
    assert secret not in repr(rows)
    assert stored["token_hash"] == hashlib.sha256(secret.encode()).hexdigest()

    # Released: the secret is stale (409) and applies nothing, even once the machine is ready.
    assert fleet.call("a", "DELETE", f"/leases/{lease['id']}").status_code == 200
    late = fleet.exec("a", machine_id, "touch /workspace/late", secret)
    assert late.status_code == 409, late.text
    assert late.json()["error"] == "stale_lease"
    late_run = fleet.call(
        "a", "POST", f"{base}/sessions/{sid}/run", secret, json={"cmd": "touch /workspace/l2"}
    )
    assert late_run.status_code == 409, late_run.text
    after = fleet.exec("ops", machine_id, "ls /workspace/late /workspace/l2", None)
    assert after.json()["stdout"] == ""


def test_an_unleased_machine_is_for_ops_only(fleet: Fleet) -> None:
    machine_id = new_machine(fleet)
    base = f"/machines/{machine_id}"
    refused = fleet.exec("a", machine_id, "touch /workspace/agent-was-here", None)
    assert refused.status_code == 403, refused.text
    assert "lease it first" in refused.json()["detail"]
    for method, path, kw in (
        ("POST", f"{base}/sessions", {}),
        ("PUT", f"{base}/files?path=x.txt", {"content": b"x"}),
        ("POST", f"{base}/ports", {"json": {"port": 8000}}),
    ):
        assert fleet.call("b", method, path, **kw).status_code == 403, path
    ops = fleet.exec("ops", machine_id, "ls /workspace/agent-was-here; echo ops", None)
    assert ops.status_code == 200, ops.text
    assert ops.json()["stdout"] == "ops\n"


def wait_stage(fleet: Fleet, run_id: str, status: str) -> None:
    deadline = time.monotonic() + 180
    while fleet.call("a", "GET", f"/runs/{run_id}").json()["stages"][0]["status"] != status:
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_runs_and_remote_stages_belong_to_their_creator(fleet: Fleet, tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "sample-app")
    pool = {"template": {"repo": str(repo)}, "min_ready": 1, "max_machines": 3}
    assert fleet.call("ops", "PUT", "/pools/cred", json=pool).status_code in (200, 201)
    stages = [{"name": "implement", "agent": "remote", "timeout_s": 120}]
    body = {"task": "t", "repo": str(repo), "pool": "cred", "stages": stages}
    run_id = fleet.call("a", "POST", "/runs", json=body).json()["id"]
    wait_stage(fleet, run_id, "running")
    stage = f"/runs/{run_id}/stages/implement"

    assert fleet.call("b", "POST", f"{stage}/claim").status_code == 403
    assert fleet.call("b", "POST", f"/runs/{run_id}/cancel").status_code == 403
    claimed = fleet.call("a", "POST", f"{stage}/claim")
    assert claimed.status_code == 200, claimed.text
    claim = claimed.json()
    secret, machine_id = claim["lease_token"], claim["machine_id"]
    assert isinstance(secret, str)

    report = {"attempt": claim["attempt"], "status": "failed", "summary": "from b"}
    assert fleet.call("b", "POST", f"{stage}/report", secret, json=report).status_code == 403
    assert fleet.exec("b", machine_id, "true", secret).status_code == 403
    upload = fleet.call(
        "b",
        "POST",
        f"{stage}/artifacts",
        secret,
        data={"kind": "log", "name": "b.log"},
        files={"file": ("b.log", b"from b", "text/plain")},
    )
    assert upload.status_code == 403, upload.text
    for who in ("a", "b"):
        assert secret not in fleet.call(who, "GET", f"/runs/{run_id}").text

    assert fleet.exec("a", machine_id, "echo a", secret).json()["stdout"] == "a\n"
    done = {**report, "status": "passed", "summary": "from a"}
    assert fleet.call("a", "POST", f"{stage}/report", secret, json=done).status_code == 202

    second = fleet.call("a", "POST", "/runs", json=body).json()["id"]
    assert fleet.call("b", "POST", f"/runs/{second}/cancel").status_code == 403
    assert fleet.call("ops", "POST", f"/runs/{second}/cancel").status_code == 200
