"""The contract outside scripts rely on: serve, token create, healthz, machines through the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller.settings import Settings
from tests.conftest import ROOT

SHOPFLOOR = str(ROOT / ".venv" / "bin" / "shopfloor")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[str, dict[str, str]]]:
    env = {
        **os.environ,
        "SHOPFLOOR_DATA_DIR": str(settings.data_dir),
        "SHOPFLOOR_EXTRA_LABELS": settings.extra_labels,
        "SHOPFLOOR_RUNNER_IMAGE": str(settings.runner_image),
    }
    port = free_port()
    server = subprocess.Popen(
        [SHOPFLOOR, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "controller did not start"
                time.sleep(0.2)
        out = subprocess.run(
            [SHOPFLOOR, "token", "create", "--role", "ops"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        yield url, {**env, "SHOPFLOOR_URL": url, "SHOPFLOOR_TOKEN": out.split()[-1]}
    finally:
        server.terminate()
        server.wait(timeout=30)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SHOPFLOOR, *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_machines_through_the_cli(served: tuple[str, dict[str, str]], sample_repo: Path) -> None:
    url, env = served
    token = env["SHOPFLOOR_TOKEN"]
    assert httpx.get(f"{url}/api/v1/machines").status_code == 401
    listed = httpx.get(f"{url}/api/v1/machines", headers={"Authorization": f"Bearer {token}"})
    assert listed.json() == {"data": [], "count": 0}

    created = cli(env, "machines", "create", "--repo", str(sample_repo), "--label", "who=cli")
    assert created.returncode == 0, created.stderr
    machine_id = next(w for w in created.stdout.split() if w.startswith("m-"))
    assert machine_id in cli(env, "machines", "ls").stdout

    echoed = cli(env, "machines", "exec", machine_id, "--", "cat", "README.md", "&&", "exit", "3")
    assert echoed.returncode == 3
    assert "sample-app" in echoed.stdout

    assert "stopped" in cli(env, "machines", "stop", machine_id).stdout
    refused = cli(env, "machines", "exec", machine_id, "true")
    assert refused.returncode == 1
    assert "409" in refused.stderr
    assert "stopped" in refused.stderr
    assert "ready" in cli(env, "machines", "start", machine_id).stdout
    assert "destroyed" in cli(env, "machines", "rm", machine_id).stdout
    assert '"destroyed"' in cli(env, "machines", "show", machine_id).stdout
    assert "404" in cli(env, "machines", "show", "m-missing").stderr


def test_pause_snapshot_and_fork_through_the_cli(served: tuple[str, dict[str, str]]) -> None:
    url, env = served
    headers = {"Authorization": f"Bearer {env['SHOPFLOOR_TOKEN']}"}
    made = httpx.post(f"{url}/api/v1/machines?wait=true", json={}, headers=headers, timeout=120)
    machine_id = made.json()["id"]
    paused = cli(env, "machines", "pause", machine_id)
    assert paused.returncode == 0, paused.stderr
    assert f"{machine_id}: paused" in paused.stdout
    refused = cli(env, "machines", "exec", machine_id, "true")
    assert refused.returncode == 1
    assert "paused" in refused.stderr
    resumed = cli(env, "machines", "resume", machine_id)
    assert f"{machine_id}: ready" in resumed.stdout, resumed.stderr
    taken = cli(env, "machines", "snapshot", machine_id, "--name", "first", "--pinned")
    assert taken.returncode == 0, taken.stderr
    listed = cli(env, "snapshots", "ls")
    assert "first" in listed.stdout, listed.stderr
    snapshot_id = next(w for w in listed.stdout.split() if w.startswith("snap-"))
    forked = cli(env, "machines", "fork", machine_id, "--count", "2")
    assert forked.returncode == 0, forked.stderr
    copies = [w for w in forked.stdout.split() if w.startswith("m-") and w != machine_id]
    assert len(copies) == 2, forked.stdout
    from_snapshot = cli(env, "machines", "create", "--snapshot", snapshot_id)
    assert from_snapshot.returncode == 0, from_snapshot.stderr
    third = next(w for w in from_snapshot.stdout.split() if w.startswith("m-"))
    in_use = cli(env, "snapshots", "rm", snapshot_id)
    assert in_use.returncode == 1
    assert "409" in in_use.stderr
    for copy in (*copies, third):
        assert cli(env, "machines", "rm", copy).returncode == 0
    gone = cli(env, "snapshots", "rm", snapshot_id)
    assert gone.returncode == 0, gone.stderr
    bad = cli(env, "machines", "fork", machine_id, "--count", "0")
    assert bad.returncode == 1
    assert "count must be 1 to" in bad.stderr
