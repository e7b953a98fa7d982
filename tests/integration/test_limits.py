"""No agent can starve the fleet, nor read the host (issue 12): limits and the repo policy,
on a real ``shopfloor serve`` and a real engine.

The controller here runs with small limits (4 sessions per machine, 4 forwards per lease,
1 file in flight per machine, 30 requests a second per token) so that floods are quick;
the defaults are the same code with bigger numbers. Each test uses API tokens of its own,
so one test's requests never count against another's rate.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from make_repo import make_sample_repo

from controller.store.models import Role
from tests.integration.conftest import ControllerProcess

API = "/api/v1"
LIMITS = {
    "SHOPFLOOR_SESSIONS_PER_MACHINE": "4",
    "SHOPFLOOR_FORWARDS_PER_LEASE": "4",
    "SHOPFLOOR_FILES_IN_FLIGHT": "1",
    "SHOPFLOOR_TOKEN_RATE_PER_S": "30",
    "SHOPFLOOR_TOKEN_RATE_BURST": "30",
}


class Caller:
    """One API token on the controller, with the lease token it holds (if any)."""

    def __init__(self, controller: ControllerProcess, role: Role) -> None:
        self.http = httpx.Client(
            base_url=controller.url + API,
            timeout=60,
            headers={"Authorization": f"Bearer {controller.token(role)}"},
        )
        self.secret: str | None = None

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", {})
        if self.secret:
            headers["X-Lease-Token"] = self.secret
        return self.http.request(method, path, headers=headers, **kw)

    def lease(self, machine_id: str) -> None:
        grant = self.call("POST", "/leases", json={"machine_id": machine_id, "holder": "t"})
        assert grant.status_code == 201, grant.text
        self.secret = grant.json()["token"]

    def session(self, machine_id: str) -> httpx.Response:
        return self.call("POST", f"/machines/{machine_id}/sessions")

    def run(self, machine_id: str, session_id: str, cmd: str) -> httpx.Response:
        return self.call(
            "POST", f"/machines/{machine_id}/sessions/{session_id}/run", json={"cmd": cmd}
        )


class Env:
    def __init__(self, controller: ControllerProcess) -> None:
        self.controller = controller
        self.ops = Caller(controller, Role.ops)

    def agent(self) -> Caller:
        return Caller(self.controller, Role.agent)

    def machine(self, **template: Any) -> str:
        made = self.ops.call("POST", "/machines?wait=true", json=template)
        assert made.json()["state"] == "ready", made.text
        return str(made.json()["id"])

    def refusals(self) -> dict[str, float]:
        text = httpx.get(self.controller.url + "/metrics").text
        found = {}
        for line in text.splitlines():
            if line.startswith("shopfloor_limit_refusals_total{"):
                name = line.split('limit="', 1)[1].split('"', 1)[0]
                found[name] = float(line.rsplit(" ", 1)[1])
        return found


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, runner_image: str) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("limits")
    controller = ControllerProcess(root / "data", runner_image, **LIMITS).start()
    env = Env(controller)
    try:
        yield env
    finally:
        for machine in env.ops.call("GET", "/machines").json()["data"]:
            env.ops.call("DELETE", f"/machines/{machine['id']}")
        controller.stop()


def assert_limit(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    for word in words:
        assert word in body["detail"], (word, body)


# ---------------------------------------------------------------- sessions, forwards, files


def test_a_session_flood_gets_429_and_everyone_else_keeps_working(env: Env) -> None:
    mine, theirs = env.machine(), env.machine()
    a, b = env.agent(), env.agent()
    a.lease(mine)
    b.lease(theirs)
    opened = [a.session(mine) for _ in range(4)]
    assert [r.status_code for r in opened] == [201] * 4, [r.text for r in opened]
    before = env.refusals().get("sessions_per_machine", 0)

    flood = [a.session(mine) for _ in range(6)]
    for refused in flood:
        assert_limit(refused, 429, "4 sessions", "SHOPFLOOR_SESSIONS_PER_MACHINE", "close")
        assert refused.json()["limit"] == "sessions_per_machine"
    assert env.refusals()["sessions_per_machine"] == before + 6

    # The machine's sessions still work, and so does another agent on another machine.
    first = opened[0].json()["id"]
    assert a.run(mine, first, "echo still here").json()["output"] == "still here\n"
    sid = b.session(theirs).json()["id"]
    assert b.run(theirs, sid, "echo other").json()["output"] == "other\n"
    done = b.call("POST", f"/machines/{theirs}/exec", json={"cmd": "echo exec"})
    assert done.json()["stdout"] == "exec\n"

    # Closing one frees its place.
    assert a.call("DELETE", f"/machines/{mine}/sessions/{first}").status_code == 204
    assert a.session(mine).status_code == 201


def test_a_forward_flood_gets_429_per_lease(env: Env) -> None:
    mine, theirs = env.machine(), env.machine()
    a, b = env.agent(), env.agent()
    a.lease(mine)
    b.lease(theirs)
    ports = f"/machines/{mine}/ports"
    for port in range(8001, 8005):
        assert a.call("POST", ports, json={"port": port}).status_code == 201
    again = a.call("POST", ports, json={"port": 8001})  # the same forward: not a new one
    assert again.status_code == 201, again.text
    for port in range(8005, 8010):
        refused = a.call("POST", ports, json={"port": port})
        assert_limit(refused, 429, "4 forwards", "SHOPFLOOR_FORWARDS_PER_LEASE", "DELETE")
    assert env.refusals()["forwards_per_lease"] >= 5

    other = b.call("POST", f"/machines/{theirs}/ports", json={"port": 8001})
    assert other.status_code == 201, other.text
    assert a.call("DELETE", f"{ports}/8002").status_code == 204
    assert a.call("POST", ports, json={"port": 8005}).status_code == 201


def test_files_in_flight_per_machine(env: Env) -> None:
    mine = env.machine()
    a = env.agent()
    a.lease(mine)
    files = f"/machines/{mine}/files"
    assert a.call("PUT", f"{files}?path=small.txt", content=b"hi").status_code == 200

    started = threading.Event()
    answers: list[httpx.Response] = []

    def slow_body() -> Iterator[bytes]:
        yield b"x" * 1024
        started.set()
        time.sleep(3)
        yield b"y" * 1024

    slow = threading.Thread(
        target=lambda: answers.append(a.call("PUT", f"{files}?path=slow.txt", content=slow_body()))
    )
    slow.start()
    assert started.wait(30)
    time.sleep(0.5)  # the slow upload is in the machine's one place now
    refused = a.call("GET", f"{files}?path=small.txt")
    assert_limit(refused, 429, "1 file", "SHOPFLOOR_FILES_IN_FLIGHT")
    slow.join(30)
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["size"] == 2048
    assert a.call("GET", f"{files}?path=small.txt").content == b"hi"


# ---------------------------------------------------------------- bodies and rates


def test_a_2_mb_json_body_is_413_at_once_on_every_route(env: Env) -> None:
    blob = {"name": "s", "agent": "command", "with": {"run": "true", "blob": "x" * (2 << 20)}}
    big = json.dumps({"task": "t", "repo": "https://example.com/r.git", "stages": [blob]}).encode()
    agent = env.agent()
    for declared in (True, False):
        content: Any = (
            big if declared else iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
        )
        started = time.monotonic()
        try:
            answer = agent.call(
                "POST", "/runs", content=content, headers={"Content-Type": "application/json"}
            )
        except httpx.HTTPError as exc:  # the server may close while the client still sends
            pytest.fail(f"no answer ({'declared' if declared else 'chunked'}): {exc!r}")
        assert time.monotonic() - started < 5
        assert_limit(answer, 413, "1048576 bytes", "SHOPFLOOR_BODY_LIMIT_BYTES")
    # The gallery and the ops routes too, JSON declared or not.
    refused = env.ops.call("PUT", "/pools/big", content=big)
    assert_limit(refused, 413, "1048576 bytes")
    assert env.refusals()["body_size"] >= 3
    # A file upload keeps its own, larger cap.
    mine = env.machine()
    put = env.ops.call("PUT", f"/machines/{mine}/files?path=big.bin", content=big)
    assert put.status_code == 200, put.text


def test_a_token_over_its_rate_gets_429_with_retry_after_while_another_is_served(
    env: Env,
) -> None:
    greedy, polite = env.agent(), env.agent()
    statuses: list[int] = []
    limited: httpx.Response | None = None
    for _ in range(60):
        answer = greedy.call("GET", "/machines")
        statuses.append(answer.status_code)
        if answer.status_code == 429:
            limited = answer
    assert limited is not None, statuses
    assert statuses.count(200) >= 25
    assert 1 <= int(limited.headers["Retry-After"]) <= 2
    assert_limit(limited, 429, "30 requests", "SHOPFLOOR_TOKEN_RATE_PER_S")
    assert polite.call("GET", "/machines").status_code == 200
    time.sleep(1.1)
    assert greedy.call("GET", "/machines").status_code == 200


# ---------------------------------------------------------------- the repo policy


def volume_path(machine_id: str, name: str) -> str:
    root = subprocess.run(
        ["docker", "info", "--format", "{{.DockerRootDir}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return f"{root}/volumes/shopfloor-ws-{machine_id}/_data/{name}"


def test_an_agent_cannot_name_a_host_path_and_ops_not_the_engines_or_our_data(
    env: Env, tmp_path: Path
) -> None:
    repo = make_sample_repo(tmp_path / "sample-app")
    victim = env.machine(repo=str(repo))
    stolen = volume_path(victim, "sample-app")
    assert Path(stolen, ".git").exists()  # the holder's checkout, on the host
    agent = env.agent()
    stages = [{"name": "s", "agent": "command", "with": {"run": "cat *"}}]
    for path in (stolen, str(repo)):
        run = agent.call("POST", "/runs", json={"task": "t", "repo": path, "stages": stages})
        assert_limit(run, 403, "local path", "SHOPFLOOR_REPO_ROOTS")
    assert agent.call("GET", "/runs").json()["count"] == 0

    # Ops may name a local path, but never one in the engine's data or the controller's.
    mirror = next((env.controller.data_dir / "mirrors").glob("*.git"))
    link = tmp_path / "innocent"
    link.symlink_to(mirror)
    for path, where in ((stolen, "engine"), (str(mirror), "data dir"), (str(link), "data dir")):
        for method, route, body in (
            ("POST", "/machines", {"repo": path}),
            ("PUT", "/pools/stolen", {"template": {"repo": path}}),
            ("POST", "/runs", {"task": "t", "repo": path, "stages": stages}),
        ):
            refused = env.ops.call(method, route, json=body)
            assert_limit(refused, 403, where)
    assert env.ops.call("POST", "/machines", json={"repo": str(repo)}).status_code == 201

    # A run naming a pool uses the pool's repo, which ops named.
    put = env.ops.call("PUT", "/pools/sample", json={"template": {"repo": str(repo)}})
    assert put.status_code == 200, put.text
    body = {"task": "t", "repo": str(repo), "pool": "sample", "stages": stages}
    assert agent.call("POST", "/runs", json=body).status_code == 201
    other = {**body, "repo": stolen}
    assert agent.call("POST", "/runs", json=other).status_code in (403, 422)


def test_a_path_under_repo_roots_works_for_an_agent(tmp_path: Path, runner_image: str) -> None:
    roots = tmp_path / "repos"
    repo = make_sample_repo(roots / "sample-app")
    outside = make_sample_repo(tmp_path / "elsewhere")
    controller = ControllerProcess(
        tmp_path / "data",
        runner_image,
        SHOPFLOOR_REPO_ROOTS=str(roots),
        SHOPFLOOR_RUN_POLL_INTERVAL_S="3600",  # runs stay queued: only the check matters
    ).start()
    try:
        agent = Caller(controller, Role.agent)
        stages = [{"name": "s", "agent": "command", "with": {"run": "true"}}]
        made = agent.call("POST", "/runs", json={"task": "t", "repo": str(repo), "stages": stages})
        assert made.status_code == 201, made.text
        refused = agent.call(
            "POST", "/runs", json={"task": "t", "repo": str(outside), "stages": stages}
        )
        assert_limit(refused, 403, "SHOPFLOOR_REPO_ROOTS")
    finally:
        controller.stop()
