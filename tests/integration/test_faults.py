"""Controller faults (issue 12): the database gone, text it cannot store, a full disk, a
machine removed under its lease, and what the controller shows of itself.

Each test failed on the code before: plain-text 500s while PostgreSQL was stopped; NUL
stored on SQLite (201) and a bare 500 on PostgreSQL; a bare 500 for a full data dir; a
lease of a `docker rm -f`'d machine still renewable; /healthz telling the install id and
a 0644 database.
"""

from __future__ import annotations

import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pg_cluster import PgCluster

from controller.api.app import create_app
from controller.providers.docker import DockerProvider
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import ControllerProcess, issue_token, wait_state

# ---------------------------------------------------------------- the database stops


def test_postgres_stopped_answers_json_503_then_recovers_without_restart(
    tmp_path: Path, runner_image: str, pg_cluster: PgCluster
) -> None:
    controller = ControllerProcess(
        tmp_path / "data",
        runner_image,
        SHOPFLOOR_DATABASE_URL=pg_cluster.url,
        SHOPFLOOR_POOL_INTERVAL_S="0.3",
        SHOPFLOOR_LEASE_REAP_INTERVAL_S="0.3",
    ).start()
    try:
        ops = {"Authorization": f"Bearer {controller.token(Role.ops)}"}
        http = httpx.Client(base_url=controller.url, headers=ops, timeout=30)
        pool = {"template": {}, "min_ready": 1, "max_machines": 2, "reset": "keep"}
        assert http.put("/api/v1/pools/pg", json=pool).status_code == 200
        granted = http.post(
            "/api/v1/leases", json={"pool": "pg", "holder": "t", "ttl_s": 600, "wait_s": 120}
        )
        assert granted.status_code == 201, granted.text
        lease = granted.json()

        def stream() -> list[httpx.Response]:
            return [
                http.post(f"/api/v1/leases/{lease['id']}/renew", json={}),  # hot
                http.get(f"/api/v1/leases/{lease['id']}"),
                http.get("/api/v1/machines"),
                http.post("/api/v1/leases", json={"pool": "pg", "holder": "u"}),  # hot
            ]

        assert [r.status_code for r in stream()[:3]] == [200, 200, 200]
        pg_cluster.stop()
        seen: list[httpx.Response] = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            seen += stream()
            time.sleep(0.2)
        codes = {r.status_code for r in seen}
        assert codes == {503}, [(r.status_code, r.text[:200]) for r in seen if r.status_code != 503]
        for answer in seen:
            assert answer.headers["content-type"].startswith("application/json"), answer.text
            assert answer.json()["error"] == "database_unavailable", answer.text
            assert answer.json()["detail"]
            assert int(answer.headers["retry-after"]) > 0

        pg_cluster.start()
        deadline = time.monotonic() + 30
        while True:
            renew, show, machines, _ = stream()
            if (renew.status_code, show.status_code, machines.status_code) == (200, 200, 200):
                break
            assert time.monotonic() < deadline, (renew.text, show.text, machines.text)
            time.sleep(0.5)
        assert http.delete(f"/api/v1/leases/{lease['id']}").status_code == 200
    finally:
        controller.stop()


# ---------------------------------------------------------------- text the database cannot store


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_client(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> Iterator[TestClient]:
    overrides: dict[str, Any] = {}
    if request.param == "postgresql":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    settings = make_settings(**overrides)
    with TestClient(create_app(settings, background=False)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        yield test_client


def _refused(answer: httpx.Response, field: str) -> None:
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_input"
    assert field in answer.json()["detail"], answer.text
    assert "NUL" in answer.json()["detail"]


def test_nul_is_refused_with_422_naming_the_field_on_both_databases(
    any_db_client: TestClient, sample_repo: Path
) -> None:
    client = any_db_client
    stages = [{"name": "s", "agent": "command", "with": {"cmd": "true"}}]
    run = {"task": "fix\u0000it", "repo": str(sample_repo), "stages": stages}
    _refused(client.post("/api/v1/runs", json=run), "task")
    run = {"task": "ok", "repo": str(sample_repo), "stages": stages}
    run["stages"] = [{"name": "s", "agent": "command", "with": {"cmd": "echo \u0000"}}]
    _refused(client.post("/api/v1/runs", json=run), "stages.0.with.cmd")
    # the hot lane (a lease) and a body declared as form data (curl -d)
    _refused(client.post("/api/v1/leases", json={"pool": "p", "holder": "a\u0000b"}), "holder")
    pool = {"template": {"labels": {"team": "a\u0000"}}, "min_ready": 0}
    _refused(client.put("/api/v1/pools/nul", json=pool), "template.labels.team")
    raw = '{"decision": "reject", "comment": "no\\u0000"}'
    verdict = client.post(
        "/api/v1/runs/r-x/verdict",
        content=raw,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    _refused(verdict, "comment")
    assert client.get("/api/v1/machines/m%00x").status_code == 422
    assert client.get("/api/v1/runs?status=%00").status_code == 422


def test_other_control_characters_per_field_on_both_databases(
    any_db_client: TestClient, sample_repo: Path
) -> None:
    """Free text (a task) keeps them as given; labels (engine labels) refuse them."""
    client = any_db_client
    odd = "\x1b[31mred\x07\x7f\ttab\u2028\x01"
    stages = [{"name": "s", "agent": "command", "with": {"cmd": "true"}}]
    created = client.post(
        "/api/v1/runs", json={"task": odd, "repo": str(sample_repo), "stages": stages}
    )
    assert created.status_code == 201, created.text
    assert client.get(f"/api/v1/runs/{created.json()['id']}").json()["task"] == odd
    pool = {"template": {"labels": {"team": odd}}, "min_ready": 0, "max_machines": 1}
    refused = client.put("/api/v1/pools/ctl-chars", json=pool)
    assert refused.status_code == 422, refused.text
    assert "labels" in refused.json()["detail"]


# ---------------------------------------------------------------- a full data dir


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs as the data dir, mounted for the test (as root) and unmounted after."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount / "data"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    """Write until the disk is full, down to its last block."""
    with (folder / "filler").open("wb", buffering=0) as out:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError:
                pass


def test_a_full_data_dir_answers_507_with_a_message(
    small_data_dir: Path, make_settings: Callable[..., Settings], sample_repo: Path
) -> None:
    settings = make_settings(data_dir=small_data_dir)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        pool = {"template": {"labels": {"a": "b"}}, "min_ready": 0, "max_machines": 1}
        assert client.put("/api/v1/pools/before", json=pool).status_code == 200
        _fill(small_data_dir)
        big = {"template": {"labels": {f"k{i}": "v" * 200 for i in range(32)}}, "min_ready": 0}
        answers = [client.put(f"/api/v1/pools/full-{i}", json=big) for i in range(20)]
        full = [a for a in answers if a.status_code != 200]
        assert full, "the disk never filled"
        for answer in full:
            assert answer.status_code == 507, answer.text
            assert answer.json()["error"] == "insufficient_storage"
            assert "full" in answer.json()["detail"]
        # space comes back: the controller writes again, no restart
        (small_data_dir / "filler").unlink()
        assert client.put("/api/v1/pools/after", json=pool).status_code == 200


# ---------------------------------------------------------------- a machine removed under its lease


def test_a_machine_removed_under_its_lease_ends_the_lease(
    live_client: TestClient, provider: DockerProvider
) -> None:
    machine = live_client.post("/api/v1/machines?wait=true", json={}).json()
    assert machine["state"] == "ready", machine
    granted = live_client.post(
        "/api/v1/leases", json={"machine_id": machine["id"], "holder": "t", "ttl_s": 600}
    )
    assert granted.status_code == 201, granted.text
    lease = granted.json()
    subprocess.run(
        ["docker", "rm", "-f", f"shopfloor-{machine['id']}"], check=True, capture_output=True
    )
    assert wait_state(live_client, machine["id"], {"lost"}, timeout_s=30)["state"] == "lost"
    renew = live_client.post(f"/api/v1/leases/{lease['id']}/renew", json={})
    assert renew.status_code == 409, renew.text
    assert "lost" in renew.json()["detail"], renew.text
    shown = live_client.get(f"/api/v1/leases/{lease['id']}").json()
    assert shown["state"] != "active"


# ---------------------------------------------------------------- what the controller shows


def test_healthz_says_only_ok_and_the_data_dir_is_private(
    settings: Settings, client: TestClient
) -> None:
    health = client.get("/healthz", headers={"Authorization": ""})
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    client.put("/api/v1/pools/perm", json={"template": {}, "min_ready": 0})  # a write: -wal
    files = [
        settings.data_dir / n for n in ("shopfloor.db", "shopfloor.db-wal", "shopfloor.db-shm")
    ]
    assert all(f.exists() for f in files), list(settings.data_dir.iterdir())
    for name in files:
        assert stat.S_IMODE(name.stat().st_mode) == 0o600, name
