"""Every write route answers under load, on SQLite and on PostgreSQL.

A real ``shopfloor serve`` gets waves of 48 clients at once, each sending 4 requests to
one route: pool put, run create, run cancel, verdict, machine create, lease and release,
then the read routes. Every request must get an HTTP answer (a 4xx is an answer, a hang is
not) and ``/healthz`` must answer afterwards.

Once, a route held a transaction (and with it SQLite's writer queue) in one worker thread
while the service it called waited for that queue in another: a few parallel requests
deadlocked, and once the thread pool was full nothing answered at all.

Cheap on purpose: pools keep no machines (min_ready 0), the run driver never picks up the
queued runs, leases ask an empty pool without waiting, and the machines created point at a
repo whose fetch is refused at once, so their provisioning fails before any container.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pg_cluster import fresh_database

from controller.store.models import Role
from tests.integration.conftest import ControllerProcess

CLIENTS = 48
PER_CLIENT = 4
TIMEOUT_S = 30.0
REFUSED_REPO = "git://127.0.0.1:9/nothing.git"
"""Port 9 (discard) is closed: the controller's fetch of this mirror fails at once."""

Send = Callable[[httpx.Client, int, int], httpx.Response]
"""One request: the client, its number, and the request's number within the client."""


@dataclass
class Wave:
    name: str
    answers: Counter[int] = field(default_factory=Counter)
    hung: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.answers.values()) + self.hung + len(self.errors)


def _wave(url: str, token: str, name: str, send: Send) -> Wave:
    """CLIENTS threads at once, each sending PER_CLIENT requests one after another. A client
    stops at its first request without an answer (the rest would only wait too)."""
    wave = Wave(name)
    guard = threading.Lock()
    start = threading.Barrier(CLIENTS)
    headers = {"Authorization": f"Bearer {token}"}

    def client(i: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT_S) as http:
            start.wait()
            for j in range(PER_CLIENT):
                try:
                    status = send(http, i, j).status_code
                except httpx.TimeoutException:
                    with guard:
                        wave.hung += 1
                    return
                except httpx.HTTPError as exc:
                    with guard:
                        wave.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                with guard:
                    wave.answers[status] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=PER_CLIENT * TIMEOUT_S + 30)
    return wave


def _check(wave: Wave, allowed: set[int]) -> None:
    total = CLIENTS * PER_CLIENT
    assert (wave.hung, wave.errors) == (0, []), (
        f"{wave.name}: {wave.hung} requests got no answer within {TIMEOUT_S:.0f}s, "
        f"{total - wave.sent} of {total} were not sent behind them "
        f"(answered: {dict(wave.answers)}; errors: {wave.errors[:3]})"
    )
    assert wave.sent == total, f"{wave.name}: {wave.sent} of {total} requests were sent"
    assert set(wave.answers) <= allowed, f"{wave.name}: answers {dict(wave.answers)}"


@pytest.fixture(params=["sqlite", "postgres"])
def controller(
    request: pytest.FixtureRequest, tmp_path: Path, runner_image: str
) -> Iterator[ControllerProcess]:
    env = {"SHOPFLOOR_RUN_POLL_INTERVAL_S": "3600"}  # runs stay queued
    if request.param == "postgres":
        env["SHOPFLOOR_DATABASE_URL"] = fresh_database(
            request.getfixturevalue("postgres_url"), "conc"
        )
    process = ControllerProcess(tmp_path / "data", runner_image, **env).start()
    try:
        yield process
    finally:
        process.stop()


def test_every_route_answers_48_clients_at_once(controller: ControllerProcess) -> None:
    started = time.monotonic()
    url = controller.url
    ops = controller.token(Role.ops)
    agent = controller.token(Role.agent)
    reviewer = controller.token(Role.reviewer)
    empty_pool = {"template": {}, "min_ready": 0, "max_machines": 2, "reset": "keep"}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ops}"}) as http:
        assert http.put("/api/v1/pools/conc", json=empty_pool).status_code == 200
    run_ids: list[list[str]] = [[""] * PER_CLIENT for _ in range(CLIENTS)]

    def put_pool(http: httpx.Client, i: int, _: int) -> httpx.Response:
        return http.put(f"/api/v1/pools/p{i}", json=empty_pool)

    def create_run(http: httpx.Client, i: int, j: int) -> httpx.Response:
        body = {
            "task": f"task {i}.{j}",
            "repo": REFUSED_REPO,
            "pool": "conc",
            "stages": [{"name": "test", "agent": "command", "with": {"cmd": "true"}}],
        }
        answer = http.post("/api/v1/runs", json=body)
        if answer.status_code == 201:
            run_ids[i][j] = answer.json()["id"]
        return answer

    def cancel_run(http: httpx.Client, i: int, j: int) -> httpx.Response:
        return http.post(f"/api/v1/runs/{run_ids[i][j]}/cancel")

    def give_verdict(http: httpx.Client, i: int, j: int) -> httpx.Response:
        # Two clients judge each run: one verdict is recorded, the other is told so (409).
        run_id = run_ids[i - i % 2][j]
        body = {"decision": "reject", "comment": "cancelled before it started"}
        return http.post(f"/api/v1/runs/{run_id}/verdict", json=body)

    def create_machine(http: httpx.Client, _: int, __: int) -> httpx.Response:
        return http.post("/api/v1/machines?wait=false", json={"repo": REFUSED_REPO})

    def lease_and_release(http: httpx.Client, i: int, j: int) -> httpx.Response:
        if j % 2:
            return http.delete(f"/api/v1/leases/lease-that-does-not-exist-{i}")
        body = {"pool": "conc", "holder": f"agent-{i}", "ttl_s": 60, "wait_s": 0}
        return http.post("/api/v1/leases", json=body)

    def read(http: httpx.Client, i: int, j: int) -> httpx.Response:
        run_id = run_ids[i][j]
        path = [
            f"/api/v1/runs/{run_id}",
            f"/api/v1/pools/p{i}",
            f"/api/v1/runs/{run_id}/verdict",
            "/api/v1/runs?limit=20",
            "/api/v1/pools",
            "/api/v1/machines",
            "/api/v1/leases",
            "/api/v1/events?limit=50",
            "/api/v1/flow",
            f"/api/v1/runs/{run_id}/artifacts",
        ][(i + j) % 10]
        return http.get(path)

    waves: list[tuple[str, str, Send, set[int]]] = [
        ("pool put", ops, put_pool, {200}),
        ("run create", agent, create_run, {201}),
        ("run cancel", agent, cancel_run, {200}),
        ("verdict", reviewer, give_verdict, {201, 409}),
        ("machine create", ops, create_machine, {201}),
        ("lease and release", agent, lease_and_release, {404, 408}),
        ("reads", ops, read, {200}),
    ]
    for name, token, send, allowed in waves:
        _check(_wave(url, token, name, send), allowed)

    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 110
