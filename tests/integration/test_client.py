"""The Python client against a real controller served by uvicorn on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from agents.client import Client
from controller.api.app import create_app
from controller.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    SessionLost,
    StaleLease,
)
from controller.settings import Settings
from controller.store.models import Role
from tests.conftest import TEST_LABEL, TEST_RUN_ID
from tests.integration.conftest import issue_token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, runner_image: str
) -> Iterator[tuple[str, Settings]]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("client") / "data",
        extra_labels=f"{TEST_LABEL}={TEST_RUN_ID}",
        runner_image=runner_image,
        lease_reap_interval_s=0.3,
        pool_interval_s=0.3,
    )
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive(), "controller exited during start-up"
        assert time.monotonic() < deadline, "controller did not start within 60 s"
        time.sleep(0.05)
    yield url, settings
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def machine_id(server: tuple[str, Settings]) -> str:
    url, settings = server
    ops = httpx.Client(
        base_url=url,
        headers={"Authorization": f"Bearer {issue_token(settings, Role.ops)}"},
        timeout=300,
    )
    answer = ops.post("/api/v1/machines?wait=true", json={}).json()
    assert answer["state"] == "ready", answer
    return str(answer["id"])


@pytest.fixture
def agent(server: tuple[str, Settings]) -> Iterator[Client]:
    url, settings = server
    with Client(url, issue_token(settings, Role.agent)) as client:
        yield client


def test_lease_session_files_forward_and_release(
    agent: Client, machine_id: str, tmp_path: Path
) -> None:
    with agent.lease(machine_id=machine_id, holder="client-test", ttl_s=2) as machine:
        with machine.session() as shell:
            shell.run("cd /tmp && export WHO=client")
            assert shell.run('echo "$PWD $WHO"').output == "/tmp client\n"
        time.sleep(3)  # longer than the TTL: the background renewal keeps the lease
        assert machine.exec("echo hi").stdout == "hi\n"
        assert machine.put("c/notes.txt", b"from the client") == "/workspace/c/notes.txt"
        assert machine.get("c/notes.txt") == b"from the client"
        url = machine.forward(8777)
        assert httpx.get(url, timeout=10).status_code == 502
        assert machine.token is not None
        with pytest.raises(StaleLease):  # not the lease's token (a fence number) is refused
            agent.machine(machine_id, lease_token=str(lease_fence(agent, machine_id))).exec("true")
        with pytest.raises(Conflict):  # leased: no token, no command
            agent.machine(machine_id).exec("true")
    deadline = time.monotonic() + 60  # released: ready once its hand-over is done
    while (state := agent.call("GET", f"/machines/{machine_id}").json()["state"]) == "leased":
        assert time.monotonic() < deadline, "the hand-over did not finish"
        time.sleep(0.05)
    assert state == "ready"
    with pytest.raises(Forbidden, match="lease it first"):  # unleased: ops only
        agent.machine(machine_id).exec("echo free")


def lease_fence(client: Client, machine_id: str) -> int:
    return int(client.call("GET", f"/machines/{machine_id}").json()["fence"])


def test_errors_come_back_typed(agent: Client, machine_id: str) -> None:
    with agent.lease(machine_id=machine_id, holder="errors", ttl_s=60) as machine:
        with pytest.raises(InvalidInput) as bad:
            machine.get("../etc/passwd")
        assert "'..'" in bad.value.message
        with pytest.raises(NotFound):
            machine.get("no-such-file")
        with pytest.raises(NotFound):
            agent.machine("m-nope").exec("true")
        with pytest.raises(InvalidInput):
            machine.exec("true", timeout_s=0)
        shell = machine.session()
        with pytest.raises(SessionLost) as lost:
            shell.run("exit 3")
        assert "session lost" in lost.value.message
        assert isinstance(lost.value, SessionLost)
        assert lost.value.status_code == 410


def test_an_agent_pauses_snapshots_and_forks_its_leased_machine(
    agent: Client, machine_id: str
) -> None:
    wait_ready(agent, machine_id)
    with agent.lease(machine_id=machine_id, holder="client-fork", ttl_s=60) as machine:
        machine.exec("echo mine > /workspace/state")
        machine.pause()
        with pytest.raises(Conflict, match="paused"):
            machine.exec("true")
        machine.resume()
        snapshot_id = machine.snapshot("from-the-client")
        assert snapshot_id.startswith("snap-")
        forks = machine.fork_leases(1)
        assert len(forks) == 1
        with pytest.raises(Conflict):  # the lease's token does not open the fork
            agent.machine(forks[0].machine_id, lease_token=machine.token).exec("true")
        assert forks[0].machine.exec("cat /workspace/state").stdout == "mine\n"
    info = agent.call("GET", f"/machines/{forks[0].machine_id}").json()
    assert info["forked_from"] == machine_id
    assert info["state"] == "leased"  # its own lease, the agent's
    forks[0].release()  # and with it the fork
    assert wait_gone(agent, forks[0].machine_id)


def wait_ready(client: Client, machine_id: str) -> None:
    deadline = time.monotonic() + 60
    while client.call("GET", f"/machines/{machine_id}").json()["state"] != "ready":
        assert time.monotonic() < deadline, "the machine did not come back"
        time.sleep(0.05)


def wait_gone(client: Client, machine_id: str) -> bool:
    deadline = time.monotonic() + 60
    while client.call("GET", f"/machines/{machine_id}").json()["state"] != "destroyed":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
