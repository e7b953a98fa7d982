"""Real engine, real database, real HTTP: fixtures that build them and always clean up.

Every container and volume a test makes carries ``shopfloor.test=<this run's id>``; the
session fixture removes all of them at the end, even after failures, and only them, so
parallel runs on one engine don't disturb each other. A missing engine fails the tests:
``make test`` starts one.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from make_repo import make_sample_repo
from pg_cluster import PgCluster, free_port

from controller.api.app import create_app
from controller.providers.disks import unmount_under
from controller.providers.docker import DockerProvider
from controller.services import auth, images
from controller.settings import Settings
from controller.store.models import Role
from tests.conftest import TEST_LABEL, TEST_RUN_ID


@pytest.fixture(scope="session")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerProvider]:
    engine = DockerProvider(os.environ.get("SHOPFLOOR_DOCKER_HOST"))
    engine.ping()  # no engine is a failure, not a skip
    yield engine
    engine.remove_labelled({TEST_LABEL: TEST_RUN_ID})
    engine.close()
    unmount_under(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def runner_image(provider: DockerProvider) -> str:
    return images.ensure_runner_image(provider)


@pytest.fixture
def make_settings(tmp_path: Path, runner_image: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "extra_labels": f"{TEST_LABEL}={TEST_RUN_ID}",
            "runner_image": runner_image,
            "reconcile_interval_s": 0.5,
            "orphan_grace_s": 0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


def issue_token(settings: Settings, role: Role) -> str:
    return auth.issue_token(database_url=settings.sqlalchemy_url, role=role)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app (real engine, SQLite in tmp) with an ops token, background loops off."""
    with TestClient(create_app(settings, background=False)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        yield test_client


@pytest.fixture
def sample_repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path / "sample-app")


def wait_state(
    client: TestClient | httpx.Client, machine_id: str, states: set[str], timeout_s: float = 60
) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        machine: dict[str, Any] = client.get(f"/api/v1/machines/{machine_id}").json()
        if machine["state"] in states or time.monotonic() > deadline:
            return machine
        time.sleep(0.2)


def wait_json(
    http: httpx.Client, path: str, check: Callable[[Any], bool], what: str, timeout_s: float = 120
) -> Any:
    """GET ``path`` until its JSON answer passes ``check`` (a real controller's progress)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = http.get(path).json()
        if check(body):
            return body
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {body}"
        time.sleep(0.3)


@pytest.fixture
def live_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """Like ``client`` but with the background loops on (pools, lease reaper, run driver).

    Same data dir as ``settings``, so ``issue_token(settings, ...)`` makes tokens for it.
    """
    settings = make_settings(
        pool_interval_s=0.3, lease_reap_interval_s=0.3, run_poll_interval_s=0.2
    )
    with TestClient(create_app(settings, background=True)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        yield test_client


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory: pytest.TempPathFactory, runner_image: str) -> Settings:
    """Settings shared by one test module, so it can keep one machine for all its tests."""
    return Settings(
        data_dir=tmp_path_factory.mktemp("module") / "data",
        extra_labels=f"{TEST_LABEL}={TEST_RUN_ID}",
        runner_image=runner_image,
        reconcile_interval_s=0.5,
        orphan_grace_s=0,
    )


@pytest.fixture(scope="module")
def module_client(module_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(module_settings, background=False)) as test_client:
        token = issue_token(module_settings, Role.ops)
        test_client.headers["Authorization"] = f"Bearer {token}"
        yield test_client


@pytest.fixture(scope="module")
def module_machine(module_client: TestClient) -> str:
    """One ready machine (no repo) for the tests of a module; removed with the module."""
    response = module_client.post("/api/v1/machines?wait=true", json={})
    assert response.json()["state"] == "ready", response.text
    return str(response.json()["id"])


def kill_sshd(provider: DockerProvider, machine_id: str) -> None:
    """Kill every sshd process in the machine: the far end of the controller's SSH
    connection, and the listener. They run as root and, once a login is in, as runner;
    root in a machine holds no CAP_KILL, so each user kills its own."""
    for user in ("root", "runner"):
        run = provider.exec(f"shopfloor-{machine_id}", ["pkill", "-KILL", "-x", "sshd"], user=user)
        list(run)


class ControllerProcess:
    """A real ``shopfloor serve`` subprocess on a free loopback port (crash and load tests)."""

    def __init__(self, data_dir: Path, runner_image: str, **env: str) -> None:
        self.data_dir = data_dir
        self.env = {
            **os.environ,
            "SHOPFLOOR_DATA_DIR": str(data_dir),
            "SHOPFLOOR_RUNNER_IMAGE": runner_image,
            "SHOPFLOOR_EXTRA_LABELS": f"{TEST_LABEL}={TEST_RUN_ID}",
            "SHOPFLOOR_ORPHAN_GRACE_S": "0",
            **env,
        }
        self.process: Any = None
        self.url = ""

    def start(self, timeout_s: float = 60) -> ControllerProcess:
        import sys
        import time

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = (self.data_dir.parent / f"serve-{port}.log").open("wb")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "shopfloor"),
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"controller exited; see {log.name}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"controller did not answer within {timeout_s}s; see {log.name}")

    def token(self, role: Role) -> str:
        settings = Settings(
            data_dir=self.data_dir, database_url=self.env.get("SHOPFLOOR_DATABASE_URL")
        )
        return issue_token(settings, role)

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, as in a crash."""
        import signal

        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except Exception:  # noqa: BLE001 - escalate to SIGKILL
                self.kill()


# ---------------------------------------------------------------- PostgreSQL

# The cluster starter lives in scripts/pg_cluster.py: bench/lease.py starts its own with it.


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL cluster in a temp dir on a free port, removed afterwards."""
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.remove()


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A cluster of the test's own, which it may stop and start."""
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()
