"""Pools and leases through the HTTP API against the real engine, with the loops running, on
SQLite and on PostgreSQL (whose lease calls take the event loop's own connections)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pg_cluster import fresh_database

from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token, wait_state

NOBODY = {"Authorization": "Bearer not-a-token"}


@pytest.fixture(params=["sqlite", "postgres"])
def make_settings(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> Callable[..., Settings]:
    """Every test here on both databases: a fresh PostgreSQL database of its own."""
    if request.param == "sqlite":
        return make_settings
    url = fresh_database(request.getfixturevalue("postgres_url"), "leases")

    def on_postgres(**overrides: Any) -> Settings:
        return make_settings(database_url=url, **overrides)

    return on_postgres


API = "/api/v1"


def wait_for(check: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def put_pool(client: TestClient, name: str, **body: Any) -> dict[str, Any]:
    response = client.put(f"{API}/pools/{name}", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def pool_counts(client: TestClient, name: str) -> dict[str, int]:
    return client.get(f"{API}/pools/{name}").json()["counts"]  # type: ignore[no-any-return]


def wait_ready(client: TestClient, name: str, n: int) -> dict[str, int]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (c := pool_counts(client, name))["ready"] >= n and c,
        what=f"{n} ready machines in pool {name}",
    )


def agent(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings, Role.agent)}"}


def lease(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = client.post(f"{API}/leases", json={"holder": "test", **body}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def exec_with(
    client: TestClient,
    machine_id: str,
    cmd: str,
    token: str | None,
    caller: dict[str, str] | None = None,
) -> Any:
    headers = {**(caller or {}), **({} if token is None else {"X-Lease-Token": token})}
    return client.post(f"{API}/machines/{machine_id}/exec", json={"cmd": cmd}, headers=headers)


def test_pool_lease_fencing_and_clean_return(
    live_client: TestClient, settings: Settings, sample_repo: Path
) -> None:
    client = live_client
    pool = put_pool(
        client,
        "web",
        template={"repo": str(sample_repo)},
        min_ready=2,
        max_machines=3,
        reset="clean",
    )
    assert pool["counts"]["ready"] == 0
    wait_ready(client, "web", 2)
    listed = client.get(f"{API}/pools", headers=agent(settings)).json()
    assert [p["name"] for p in listed["data"]] == ["web"]

    me = agent(settings)
    granted = lease(client, me, pool="web", ttl_s=60)
    machine_id, token = granted["machine_id"], granted["token"]
    assert client.get(f"{API}/machines/{machine_id}").json()["state"] == "leased"

    assert exec_with(client, machine_id, "true", None, me).status_code == 409
    assert exec_with(client, machine_id, "true", str(granted["fence"]), me).status_code == 409
    wrote = exec_with(client, machine_id, "echo dirty > scratch.txt && cat app.py | wc -l", token)
    assert wrote.status_code == 200
    assert wrote.json()["exit_code"] == 0

    # The pool refills behind the lease, and never goes past max_machines.
    wait_ready(client, "web", 2)
    time.sleep(1)
    counts = pool_counts(client, "web")
    assert counts["ready"] + counts["leased"] + counts["provisioning"] <= 3

    renewed = client.post(f"{API}/leases/{granted['id']}/renew", json={"ttl_s": 120}, headers=me)
    assert renewed.status_code == 200
    assert renewed.json()["expires_at"] > granted["expires_at"]

    released = client.delete(f"{API}/leases/{granted['id']}", headers=me)
    assert released.status_code == 200
    assert released.json()["state"] == "released"
    twice = client.delete(f"{API}/leases/{granted['id']}", headers=me)
    assert twice.status_code == 409
    assert "already released" in twice.json()["detail"]

    late = exec_with(client, machine_id, "touch /workspace/late", token)
    assert late.status_code == 409
    assert late.json()["error"] == "stale_lease"

    machine = wait_state(client, machine_id, {"ready", "failed"})
    assert machine["state"] == "ready", machine
    after = exec_with(
        client, machine_id, "ls scratch.txt /workspace/late; git status --short", None
    )
    assert after.json()["stdout"] == ""
    assert "No such file" in after.json()["stderr"]

    again = lease(client, me, machine_id=machine_id, ttl_s=30)
    assert again["fence"] > granted["fence"]
    assert again["token"] != token


def test_unrenewed_lease_expires_and_old_token_is_refused(
    live_client: TestClient, settings: Settings
) -> None:
    client = live_client
    put_pool(client, "short", template={}, min_ready=1, max_machines=1, reset="keep")
    wait_ready(client, "short", 1)
    granted = lease(client, agent(settings), pool="short", ttl_s=1)
    machine_id = granted["machine_id"]
    began = time.monotonic()

    machine = wait_state(client, machine_id, {"ready"}, timeout_s=30)
    assert machine["state"] == "ready"
    # TTL (1 s) plus the reaper period (0.3 s) plus generous slack for a loaded host.
    assert time.monotonic() - began < 15
    state = client.get(f"{API}/leases/{granted['id']}").json()["state"]
    assert state == "expired"
    late = exec_with(client, machine_id, "true", granted["token"])
    assert late.status_code == 409
    assert late.json()["error"] == "stale_lease"
    renew = client.post(f"{API}/leases/{granted['id']}/renew")
    assert renew.status_code == 409


def test_waiting_request_gets_the_machine_when_it_is_released(
    live_client: TestClient, settings: Settings
) -> None:
    client = live_client
    put_pool(client, "one", template={}, min_ready=1, max_machines=1, reset="keep")
    wait_ready(client, "one", 1)
    first = lease(client, agent(settings), pool="one", ttl_s=60)

    no_wait = client.post(f"{API}/leases", json={"pool": "one", "holder": "b"})
    assert no_wait.status_code == 408
    assert "wait_s" in no_wait.json()["detail"]

    answers: list[Any] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            client.post(f"{API}/leases", json={"pool": "one", "holder": "b", "wait_s": 30})
        )
    )
    waiter.start()
    time.sleep(0.5)
    assert client.delete(f"{API}/leases/{first['id']}").status_code == 200
    waiter.join(timeout=30)
    assert answers, "the waiting request never returned"
    second = answers[0]
    assert second.status_code == 201, second.text
    assert second.json()["machine_id"] == first["machine_id"]
    assert second.json()["fence"] > first["fence"]
    assert second.json()["wait_ms"] > 0


def test_bad_lease_and_pool_input_gets_clear_4xx(
    live_client: TestClient, settings: Settings
) -> None:
    client = live_client
    me, other = agent(settings), agent(settings)

    unknown = client.post(f"{API}/leases", json={"pool": "nope", "holder": "x"}, headers=me)
    assert unknown.status_code == 404
    assert "unknown pool 'nope'" in unknown.json()["detail"]
    for ttl in (0, 10**7):
        bad = client.post(f"{API}/leases", json={"pool": "x", "holder": "x", "ttl_s": ttl})
        assert bad.status_code == 422
        assert "ttl_s" in bad.json()["detail"]
    both = client.post(f"{API}/leases", json={"pool": "a", "machine_id": "m-1", "holder": "x"})
    assert both.status_code == 422
    assert "exactly one of pool, machine_id or selector" in both.json()["detail"]
    neither = client.post(f"{API}/leases", json={"holder": "x"})
    assert neither.status_code == 422
    for body, says in ((b"\xff{", "JSON"), (b"{}", "holder: Field required")):
        garbled = client.post(f"{API}/leases", content=body, headers=me)
        assert garbled.status_code == 422
        assert says in garbled.json()["detail"]
    anonymous = client.post(f"{API}/leases", json={"pool": "x", "holder": "x"}, headers=NOBODY)
    assert anonymous.status_code == 401
    assert client.delete(f"{API}/leases/l-1", headers=NOBODY).status_code == 401
    renew_ttl = client.post(f"{API}/leases/l-1/renew", json={"ttl_s": -1}, headers=me)
    assert renew_ttl.status_code == 422
    no_machine = client.post(f"{API}/leases", json={"machine_id": "m-404", "holder": "x"})
    assert no_machine.status_code == 404

    assert client.put(f"{API}/pools/Bad Name!", json={"template": {}}).status_code == 422
    too_few = client.put(f"{API}/pools/p", json={"template": {}, "min_ready": 5, "max_machines": 2})
    assert too_few.status_code == 422
    assert "min_ready" in too_few.json()["detail"]
    no_image = client.put(f"{API}/pools/p", json={"template": {"image": "no/such:image"}})
    assert no_image.status_code == 422
    assert "unknown image" in no_image.json()["detail"]
    bad_policy = client.put(f"{API}/pools/p", json={"template": {}, "reset": "wipe"})
    assert bad_policy.status_code == 422
    as_agent = client.put(f"{API}/pools/p", json={"template": {}}, headers=me)
    assert as_agent.status_code == 403

    put_pool(client, "p", template={}, min_ready=1, max_machines=1, reset="keep")
    wait_ready(client, "p", 1)
    mine = lease(client, me, pool="p", ttl_s=60)
    stolen_renew = client.post(f"{API}/leases/{mine['id']}/renew", headers=other)
    assert stolen_renew.status_code == 403
    assert "another token" in stolen_renew.json()["detail"]
    stolen_release = client.delete(f"{API}/leases/{mine['id']}", headers=other)
    assert stolen_release.status_code == 403
    assert client.post(f"{API}/leases/l-nope/renew", headers=me).status_code == 404
    assert client.delete(f"{API}/leases/{mine['id']}", headers=me).status_code == 200
