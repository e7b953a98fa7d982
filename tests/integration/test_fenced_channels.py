"""Channels into a machine (forwards, sessions) live no longer than the lease or the machine
they were opened under: a lease that ends (release, expiry), a reset, a stop, a destroy close
them, and the next holder of the machine gets channels of its own."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from controller.providers.docker import DockerProvider
from controller.services import reconcile
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token, wait_state
from tests.integration.test_ports import SERVE

API = "/api/v1"
PORT = 8123


def new_machine(client: TestClient) -> str:
    response = client.post(f"{API}/machines?wait=true", json={})
    assert response.json()["state"] == "ready", response.text
    machine_id = str(response.json()["id"])
    started = client.post(
        f"{API}/machines/{machine_id}/exec", json={"cmd": SERVE.format(port=PORT)}
    )
    assert started.json()["exit_code"] == 0, started.text
    return machine_id


def token_header(token: str | None) -> dict[str, str]:
    return {} if token is None else {"X-Lease-Token": str(token)}


def forward(client: TestClient, machine_id: str, token: str | None) -> httpx.Response:
    return client.post(
        f"{API}/machines/{machine_id}/ports", json={"port": PORT}, headers=token_header(token)
    )


def open_channels(client: TestClient, machine_id: str, token: str | None) -> dict[str, Any]:
    """A forward (checked to serve), a raw connection through it and a session."""
    answer = forward(client, machine_id, token)
    assert answer.status_code == 201, answer.text
    url = str(answer.json()["url"])
    assert httpx.get(f"{url}/index.html", timeout=10).text == "hello from the machine\n"
    raw = socket.create_connection(("127.0.0.1", int(answer.json()["local_port"])), timeout=10)
    opened = client.post(f"{API}/machines/{machine_id}/sessions", headers=token_header(token))
    assert opened.status_code == 201, opened.text
    session_id = opened.json()["id"]
    ran = run(client, machine_id, session_id, token)
    assert ran.status_code == 200, ran.text
    assert ran.json()["output"] == "hi\n"
    return {"url": url, "raw": raw, "session": session_id}


def run(client: TestClient, machine_id: str, session_id: str, token: str | None) -> httpx.Response:
    return client.post(
        f"{API}/machines/{machine_id}/sessions/{session_id}/run",
        json={"cmd": "echo hi"},
        headers=token_header(token),
    )


def assert_closed(channels: dict[str, Any]) -> None:
    """The forward's URL refuses, and a connection made through it before is ended."""
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{channels['url']}/index.html", timeout=5)
    raw: socket.socket = channels["raw"]
    raw.settimeout(5)
    try:
        assert raw.recv(1) == b"", "a connection through a closed forward still relays"
    except ConnectionResetError:
        pass
    finally:
        raw.close()


def agent(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(settings, Role.agent)}"}


def lease(client: TestClient, me: dict[str, str], machine_id: str, ttl_s: float = 60) -> Any:
    body = {"holder": "test", "machine_id": machine_id, "ttl_s": ttl_s}
    granted = client.post(f"{API}/leases", json=body, headers=me)
    assert granted.status_code == 201, granted.text
    return granted.json()


def test_a_released_lease_takes_its_forwards_and_sessions_along(
    client: TestClient, settings: Settings
) -> None:
    machine_id = new_machine(client)
    me = agent(settings)
    first = lease(client, me, machine_id)
    channels = open_channels(client, machine_id, first["token"])

    released = client.delete(f"{API}/leases/{first['id']}", headers=me)
    assert released.status_code == 200, released.text

    assert_closed(channels)
    assert wait_state(client, machine_id, {"ready"})["state"] == "ready"
    lost = run(client, machine_id, channels["session"], None)
    assert lost.status_code == 410, lost.text
    assert lost.json()["error"] == "session_lost"
    stale = forward(client, machine_id, first["token"])
    assert stale.status_code == 409, stale.text
    assert stale.json()["error"] == "stale_lease"

    second = lease(client, me, machine_id)
    # The hand-over ended every process of the machine's user, the server too: the next
    # holder starts its own.
    started = client.post(
        f"{API}/machines/{machine_id}/exec",
        json={"cmd": SERVE.format(port=PORT)},
        headers=token_header(second["token"]),
    )
    assert started.json()["exit_code"] == 0, started.text
    fresh = forward(client, machine_id, second["token"])
    assert fresh.status_code == 201, fresh.text
    assert fresh.json()["url"] != channels["url"]  # a listener of its own
    page = httpx.get(f"{fresh.json()['url']}/index.html", timeout=10)
    assert page.text == "hello from the machine\n"
    again = run(client, machine_id, channels["session"], second["token"])
    assert again.status_code == 410, again.text


def test_an_expired_lease_takes_its_forwards_and_sessions_along(
    live_client: TestClient, make_settings: Any
) -> None:
    client = live_client
    machine_id = new_machine(client)
    me = agent(make_settings())
    granted = lease(client, me, machine_id, ttl_s=3)
    channels = open_channels(client, machine_id, granted["token"])

    deadline = time.monotonic() + 30
    while client.get(f"{API}/leases/{granted['id']}").json()["state"] != "expired":
        assert time.monotonic() < deadline, "the lease did not expire"
        time.sleep(0.2)

    assert_closed(channels)
    assert wait_state(client, machine_id, {"ready"})["state"] == "ready"
    lost = run(client, machine_id, channels["session"], None)
    assert lost.status_code == 410, lost.text
    stale = forward(client, machine_id, granted["token"])
    assert stale.status_code == 409, stale.text
    assert stale.json()["error"] == "stale_lease"


def test_a_lease_granted_after_channels_were_opened_unleased_ends_them(
    client: TestClient, settings: Settings
) -> None:
    """Channels opened while the machine was free (ops) must not serve its next holder."""
    machine_id = new_machine(client)
    channels = open_channels(client, machine_id, None)
    granted = lease(client, agent(settings), machine_id)
    assert_closed(channels)
    lost = run(client, machine_id, channels["session"], granted["token"])
    assert lost.status_code == 410, lost.text
    fresh = forward(client, machine_id, granted["token"])
    assert fresh.status_code == 201, fresh.text
    assert fresh.json()["url"] != channels["url"]


@pytest.mark.parametrize("action", ["reset", "stop", "destroy"])
def test_resetting_stopping_or_destroying_a_machine_closes_its_channels(
    client: TestClient, action: str
) -> None:
    machine_id = new_machine(client)
    channels = open_channels(client, machine_id, None)

    if action == "destroy":
        done = client.delete(f"{API}/machines/{machine_id}")
    else:
        done = client.post(f"{API}/machines/{machine_id}/{action}")
    assert done.status_code == 200, done.text

    assert_closed(channels)
    access = client.app.state.controller.access  # type: ignore[attr-defined]
    assert access.sessions.for_machine(machine_id) == [] or all(
        not s.alive for s in access.sessions.for_machine(machine_id)
    )
    if action == "destroy":
        gone = run(client, machine_id, channels["session"], None)
        assert gone.status_code == 409, gone.text  # a destroyed machine takes no commands
        return
    if action == "stop":
        started = client.post(f"{API}/machines/{machine_id}/start")
        assert started.status_code == 200, started.text
        wait_state(client, machine_id, {"ready"})
    lost = run(client, machine_id, channels["session"], None)
    assert lost.status_code == 410, lost.text


def test_a_machine_found_lost_closes_its_channels(
    client: TestClient, provider: DockerProvider
) -> None:
    machine_id = new_machine(client)
    channels = open_channels(client, machine_id, None)
    provider.remove_container(f"shopfloor-{machine_id}")
    ctl = client.app.state.controller  # type: ignore[attr-defined]
    report = reconcile.reconcile(
        db=ctl.db, provider=ctl.provider, access=ctl.access, install_id=ctl.install_id, grace_s=0
    )
    assert machine_id in report.lost
    assert_closed(channels)
    gone = run(client, machine_id, channels["session"], None)
    assert gone.status_code == 409, gone.text  # a lost machine takes no commands
