"""Real engine, real database, real HTTP: fixtures that build them and always clean up.

Every container and volume a test makes carries ``shopfloor.test=<this run's id>``; the
session fixture removes all of them at the end, even after failures, and only them, so
parallel runs on one engine don't disturb each other. A missing engine fails the tests:
``make test`` starts one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from controller import images
from controller.app import create_app
from controller.db import make_engine, session_scope
from controller.models import Role
from controller.providers.docker import DockerProvider
from controller.settings import Settings
from make_repo import make_sample_repo
from tests.conftest import TEST_LABEL, TEST_RUN_ID


@pytest.fixture(scope="session")
def provider() -> Iterator[DockerProvider]:
    engine = DockerProvider(os.environ.get("SHOPFLOOR_DOCKER_HOST"))
    engine.ping()  # no engine is a failure, not a skip
    yield engine
    labels = {TEST_LABEL: TEST_RUN_ID}
    for container in engine.list_containers(labels):
        engine.remove_container(container.id)
    for volume in engine.list_volumes(labels):
        engine.remove_volume(volume.name)
    engine.close()


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
    from controller import auth

    engine = make_engine(settings.sqlalchemy_url)
    with session_scope(engine) as session:
        token = auth.create_token(session=session, role=role)
    engine.dispose()
    return token


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app (real engine, SQLite in tmp) with an ops token, background loops off."""
    with TestClient(create_app(settings, background=False)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        yield test_client


@pytest.fixture
def sample_repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path / "sample-app")


def wait_state(client: TestClient | httpx.Client, machine_id: str, states: set[str], timeout_s: float = 60) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        machine: dict[str, Any] = client.get(f"/api/v1/machines/{machine_id}").json()
        if machine["state"] in states or time.monotonic() > deadline:
            return machine
        time.sleep(0.2)
