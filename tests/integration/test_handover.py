"""Hand-over between lease holders: nothing of the previous holder reaches the next one.

Every lease end, whatever the pool's reset policy, kills the machine's user's processes and
wipes its home, /tmp, /dev/shm and whatever else it owns outside /workspace; ``keep`` keeps
only the workspace. A machine whose processes cannot be killed is never handed out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.providers.docker import DockerProvider
from controller.services import machines
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token, wait_state
from tests.integration.test_leases import agent, exec_with, lease, put_pool, wait_ready

API = "/api/v1"

LEAVE_BEHIND = r"""
set -e
mkdir -p /tmp/loot
setsid nohup sh -c 'while sleep 0.2; do cp -r /workspace/* /tmp/loot 2>/dev/null; done' \
  >/dev/null 2>&1 < /dev/null &
site=$(python3 -c 'import site; print(site.getusersitepackages())')
mkdir -p "$site"
echo 'open("/tmp/pwned-python", "w").close()' > "$site/usercustomize.py"
git config --global alias.st '!touch /tmp/pwned-git'
echo 'touch /tmp/pwned-bashrc' >> ~/.bashrc
mkdir -p ~/.config/evil && echo x > ~/.config/evil/x
echo old > /tmp/old-holder && echo old > /dev/shm/old-holder && echo old > /var/tmp/old-holder
mkdir -p /tmp/locked/inner && echo x > /tmp/locked/inner/f && chmod 000 /tmp/locked/inner
echo mine > /workspace/kept-by-holder.txt
"""


def _run(
    client: TestClient, machine_id: str, cmd: str, token: str, caller: dict[str, str]
) -> dict[str, Any]:
    response = exec_with(client, machine_id, cmd, token, caller)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("policy", ["keep", "clean"])
def test_nothing_of_the_previous_holder_reaches_the_next(
    live_client: TestClient, settings: Settings, sample_repo: Path, policy: str
) -> None:
    client = live_client
    put_pool(
        client,
        "one",
        template={"repo": str(sample_repo)},
        min_ready=1,
        max_machines=1,
        reset=policy,
    )
    wait_ready(client, "one", 1)
    me = agent(settings)
    first = lease(client, me, pool="one", ttl_s=60)
    machine_id = first["machine_id"]
    left = _run(client, machine_id, LEAVE_BEHIND, first["token"], me)
    assert left["exit_code"] == 0, left
    assert client.delete(f"{API}/leases/{first['id']}", headers=me).status_code == 200

    assert wait_state(client, machine_id, {"ready", "failed"})["state"] == "ready"
    second = lease(client, me, pool="one", ttl_s=60)
    assert second["machine_id"] == machine_id
    token = second["token"]

    procs = _run(client, machine_id, "pgrep -c -u runner -f '[w]hile sleep 0.2' || true", token, me)
    assert procs["stdout"].strip() == "0", procs
    _run(client, machine_id, "echo secret > /workspace/new-holder.txt", token, me)
    time.sleep(0.8)  # the loot loop copied every 0.2 s
    looked = _run(
        client,
        machine_id,
        "python3 -c 'print(1)'; cd /workspace/sample-app && { git st; bash -ic true; } "
        ">/dev/null 2>&1; ls -A /tmp /var/tmp /dev/shm ~; ls ~/.config 2>&1; git config --global -l",
        token,
        me,
    )
    out = looked["stdout"]
    for leftover in ("loot", "pwned", "old-holder", "locked"):
        assert leftover not in out, out
    assert "evil" not in out, out
    assert "alias.st" not in out, out
    skel = _run(client, machine_id, "diff -r /etc/skel ~ && echo same", token, me)
    assert skel["stdout"].strip() == "same", skel

    workspace = _run(client, machine_id, "cat /workspace/kept-by-holder.txt", token, me)
    if policy == "keep":
        assert workspace["stdout"] == "mine\n", workspace
    else:
        assert workspace["exit_code"] != 0, workspace


@pytest.fixture
def small_pids_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(
        pool_interval_s=0.3, lease_reap_interval_s=0.3, run_poll_interval_s=0.2, pids_limit=96
    )
    with TestClient(create_app(settings, background=True)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        yield test_client


def test_a_fork_bomb_is_never_handed_out(
    small_pids_client: TestClient, make_settings: Callable[..., Settings]
) -> None:
    client = small_pids_client
    settings = make_settings()
    put_pool(client, "bomb", template={}, min_ready=1, max_machines=1, reset="keep")
    wait_ready(client, "bomb", 1)
    me = agent(settings)
    first = lease(client, me, pool="bomb", ttl_s=60)
    machine_id = first["machine_id"]
    bomb = "setsid nohup bash -c 'b() { b | b & }; b' >/dev/null 2>&1 </dev/null & sleep 2; true"
    exec_with(client, machine_id, bomb, first["token"], me)
    assert client.delete(f"{API}/leases/{first['id']}", headers=me).status_code == 200

    deadline = time.monotonic() + 120
    while True:
        machine = client.get(f"{API}/machines/{machine_id}").json()
        if machine["state"] in ("failed", "destroyed"):
            return  # not handed out
        if machine["state"] == "ready":
            break
        assert time.monotonic() < deadline, machine
        time.sleep(0.2)
    again = lease(client, me, machine_id=machine_id, ttl_s=60)
    count = _run(
        client, machine_id, "ps -u runner -o args= | grep -c '[b] | b' || true", again["token"], me
    )
    # None of the bomb's processes (the grep pattern does not match its own text).
    assert count["stdout"].strip() == "0", count


def test_a_machine_whose_processes_survive_is_recreated(
    live_client: TestClient,
    settings: Settings,
    provider: DockerProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Processes still there after the bounded kill loop (here: a bound of no rounds at
    all): the machine is rebuilt (new container, same id), never handed out with them."""
    client = live_client
    put_pool(client, "stuck", template={}, min_ready=1, max_machines=1, reset="keep")
    wait_ready(client, "stuck", 1)
    me = agent(settings)
    first = lease(client, me, pool="stuck", ttl_s=60)
    machine_id = first["machine_id"]
    container = f"shopfloor-{machine_id}"
    before = provider.inspect_container(container)
    assert before is not None
    leave = "setsid nohup sh -c 'while sleep 0.2; do :; done' >/dev/null 2>&1 </dev/null &"
    _run(client, machine_id, leave, first["token"], me)
    monkeypatch.setattr(machines, "HANDOVER_KILL_ROUNDS", 0)
    assert client.delete(f"{API}/leases/{first['id']}", headers=me).status_code == 200

    machine = wait_for_state(client, machine_id, "ready")
    assert machine["state"] == "ready", machine
    after = provider.inspect_container(container)
    assert after is not None
    assert after.id != before.id, "the container was not recreated"
    events = client.get(f"{API}/events", params={"subject": machine_id, "limit": 1000}).json()
    reasons = [str(e) for e in events["data"]]
    assert any("recreating: the hand-over could not end every process" in r for r in reasons)
    again = lease(client, me, pool="stuck", ttl_s=60)
    left = _run(
        client, machine_id, "pgrep -c -u runner -f '[w]hile sleep' || true", again["token"], me
    )
    assert left["stdout"].strip() == "0", left


def wait_for_state(client: TestClient, machine_id: str, state: str) -> dict[str, Any]:
    """Through provisioning (a recreate) until ``state`` or failed."""
    deadline = time.monotonic() + 120
    while True:
        machine: dict[str, Any] = client.get(f"{API}/machines/{machine_id}").json()
        if machine["state"] in (state, "failed") or time.monotonic() > deadline:
            return machine
        time.sleep(0.2)


def test_the_hand_over_helper_is_out_of_the_holders_reach(
    live_client: TestClient, settings: Settings, provider: DockerProvider
) -> None:
    """After the first hand-over the machine's root helper runs the next ones (no engine
    exec); the machine's user can neither reach its socket nor signal it, and what it
    leaves behind is still wiped."""
    client = live_client
    put_pool(client, "helper", template={}, min_ready=1, max_machines=1, reset="keep")
    wait_ready(client, "helper", 1)
    me = agent(settings)
    first = lease(client, me, pool="helper", ttl_s=60)
    machine_id = first["machine_id"]
    assert client.delete(f"{API}/leases/{first['id']}", headers=me).status_code == 200
    assert wait_state(client, machine_id, {"ready", "failed"})["state"] == "ready"

    container = f"shopfloor-{machine_id}"
    handle = provider.exec(container, ["test", "-S", machines.HANDOVER_SOCKET], user="root")
    list(handle)
    assert handle.exit_code() == 0, "the helper is not listening"
    second = lease(client, me, pool="helper", ttl_s=60)
    probe = (
        f"python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect(\"{machines.HANDOVER_SOCKET}\")'"
        " 2>&1 | tail -1; kill -0 $(pgrep -u root -f '[P]ATH = ') 2>&1;"
        " setsid nohup sleep 600 >/dev/null 2>&1 </dev/null & echo x > /tmp/x; echo x > /dev/shm/x"
    )
    out = _run(client, machine_id, probe, second["token"], me)["stdout"]
    assert "PermissionError" in out, out
    assert "Operation not permitted" in out, out
    assert client.delete(f"{API}/leases/{second['id']}", headers=me).status_code == 200
    assert wait_state(client, machine_id, {"ready", "failed"})["state"] == "ready"
    third = lease(client, me, pool="helper", ttl_s=60)
    left = _run(
        client, machine_id, "pgrep -c -u runner sleep; ls -A /tmp /dev/shm", third["token"], me
    )
    assert left["stdout"].split() == ["0", "/dev/shm:", "/tmp:"], left
