"""The SSH transport's two ways into a machine: straight into its network namespace, and
through the engine when the direct way is closed or someone else holds the port."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from controller.providers.docker import DockerProvider
from controller.services.runtime import Controller
from controller.transport.ssh import SSH_PORT
from tests.integration.conftest import kill_sshd


def controller(client: TestClient) -> Controller:
    ctl: Controller = client.app.state.controller  # type: ignore[attr-defined]
    return ctl


def new_machine(client: TestClient) -> str:
    made = client.post("/api/v1/machines?wait=true", json={})
    assert made.json()["state"] == "ready", made.text
    return str(made.json()["id"])


def as_user(provider: DockerProvider, machine_id: str, user: str, script: str) -> str:
    run = provider.exec(f"shopfloor-{machine_id}", ["sh", "-c", script], user=user)
    out = b"".join(data for _, data in run)
    assert run.exit_code() == 0, out
    return out.decode()


def session_pwd(client: TestClient, machine_id: str) -> str:
    sid = client.post(f"/api/v1/machines/{machine_id}/sessions").json()["id"]
    ran = client.post(f"/api/v1/machines/{machine_id}/sessions/{sid}/run", json={"cmd": "pwd"})
    assert ran.status_code == 200, ran.text
    return str(ran.json()["output"])


def test_the_pool_connects_straight_into_the_machine(
    module_client: TestClient, module_machine: str
) -> None:
    conn = controller(module_client).access.ssh.get(f"shopfloor-{module_machine}")
    assert conn.direct
    assert conn.transport.sock.getpeername() == ("127.0.0.1", SSH_PORT)
    assert session_pwd(module_client, module_machine) == "/workspace\n"


def test_without_a_listening_sshd_the_engine_way_is_taken(
    module_client: TestClient, provider: DockerProvider
) -> None:
    machine_id = new_machine(module_client)
    kill_sshd(provider, machine_id)
    assert not controller(module_client).access.ssh.get(f"shopfloor-{machine_id}").direct
    assert session_pwd(module_client, machine_id) == "/workspace\n"


def test_a_stranger_holding_the_ssh_port_is_refused(
    module_client: TestClient, provider: DockerProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """A process of the machine's own user takes port 22 with an sshd of its own: it cannot
    show the machine's host key, so the controller goes through the engine instead."""
    machine_id = new_machine(module_client)
    kill_sshd(provider, machine_id)
    as_user(
        provider,
        machine_id,
        "runner",
        "ssh-keygen -q -t ed25519 -N '' -f /tmp/stranger_key && "
        "/usr/sbin/sshd -f /dev/null -h /tmp/stranger_key -o ListenAddress=127.0.0.1 "
        f"-p {SSH_PORT} -o PidFile=none -o AuthorizedKeysFile=/etc/shopfloor/authorized_keys",
    )
    with caplog.at_level(logging.WARNING, logger="controller.transport.ssh"):
        conn = controller(module_client).access.ssh.get(f"shopfloor-{machine_id}")
    assert not conn.direct
    assert "wrong host key" in caplog.text
    assert session_pwd(module_client, machine_id) == "/workspace\n"
