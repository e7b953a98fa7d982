"""Database and engine brought together: restarts, vanished containers, orphans."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.providers.base import ContainerSpec
from controller.providers.docker import DockerProvider
from controller.services import machines, reconcile
from controller.services.runtime import Controller
from controller.settings import Settings
from controller.store.models import Role
from tests.conftest import TEST_RUN_ID
from tests.integration.conftest import issue_token, wait_state

SUFFIX = TEST_RUN_ID  # engine-wide names: unique per test run


def controller_of(client: TestClient) -> Controller:
    ctl: Controller = client.app.state.controller  # type: ignore[attr-defined]
    return ctl


def test_restarted_controller_finds_its_machines(settings: Settings, sample_repo: Path) -> None:
    with TestClient(create_app(settings)) as first:
        first.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        machine = first.post("/api/v1/machines?wait=true", json={"repo": str(sample_repo)}).json()
        first.post(f"/api/v1/machines/{machine['id']}/exec", json={"cmd": "echo mine > kept.txt"})

    with TestClient(create_app(settings)) as second:
        second.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        again = second.get(f"/api/v1/machines/{machine['id']}").json()
        assert again["state"] == "ready"
        result = second.post(f"/api/v1/machines/{machine['id']}/exec", json={"cmd": "cat kept.txt"})
        assert result.json()["stdout"] == "mine\n"


def test_container_removed_behind_our_back_becomes_lost(
    client: TestClient, provider: DockerProvider
) -> None:
    machine = client.post("/api/v1/machines?wait=true", json={}).json()
    provider.remove_container(f"shopfloor-{machine['id']}")
    ctl = controller_of(client)
    report = reconcile.reconcile(
        db=ctl.db, provider=ctl.provider, access=ctl.access, install_id=ctl.install_id, grace_s=0
    )
    assert machine["id"] in report.lost
    lost = client.get(f"/api/v1/machines/{machine['id']}").json()
    assert lost["state"] == "lost"
    assert "vanished" in lost["reason"]
    # and its now-orphaned volume is collected
    assert not provider.list_volumes({"shopfloor.machine": machine["id"]})


def test_background_loop_marks_lost(
    make_settings: Callable[..., Settings], provider: DockerProvider
) -> None:
    settings = make_settings(reconcile_interval_s=0.3)
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        machine = client.post("/api/v1/machines?wait=true", json={}).json()
        provider.remove_container(f"shopfloor-{machine['id']}")
        assert wait_state(client, machine["id"], {"lost"}, timeout_s=30)["state"] == "lost"


def test_orphan_container_and_volume_are_removed(
    client: TestClient, provider: DockerProvider, settings: Settings, runner_image: str
) -> None:
    ctl = controller_of(client)
    labels = {
        **settings.extra_label_map,
        machines.LABEL_CONTROLLER: ctl.install_id,
        machines.LABEL_MACHINE: f"m-orphan{SUFFIX}",
    }
    provider.create_volume(f"shopfloor-ws-m-orphan{SUFFIX}", labels)
    provider.run_container(
        ContainerSpec(
            name=f"shopfloor-m-orphan{SUFFIX}",
            image=runner_image,
            labels=labels,
            workspace_volume=f"shopfloor-ws-m-orphan{SUFFIX}",
        )
    )
    young = reconcile.reconcile(
        db=ctl.db, provider=ctl.provider, access=ctl.access, install_id=ctl.install_id, grace_s=3600
    )
    assert young.removed_containers == []  # inside the grace period: left alone
    report = reconcile.reconcile(
        db=ctl.db, provider=ctl.provider, access=ctl.access, install_id=ctl.install_id, grace_s=0
    )
    assert report.removed_volumes == [f"shopfloor-ws-m-orphan{SUFFIX}"]
    assert provider.inspect_container(f"shopfloor-m-orphan{SUFFIX}") is None


def test_other_controllers_containers_are_not_touched(
    client: TestClient, provider: DockerProvider, settings: Settings, runner_image: str
) -> None:
    labels = {
        **settings.extra_label_map,
        machines.LABEL_CONTROLLER: "someone-else",
        machines.LABEL_MACHINE: f"m-foreign{SUFFIX}",
    }
    provider.create_volume(f"shopfloor-ws-m-foreign{SUFFIX}", labels)
    provider.run_container(
        ContainerSpec(
            name=f"shopfloor-m-foreign{SUFFIX}",
            image=runner_image,
            labels=labels,
            workspace_volume=f"shopfloor-ws-m-foreign{SUFFIX}",
        )
    )
    ctl = controller_of(client)
    reconcile.reconcile(
        db=ctl.db, provider=ctl.provider, access=ctl.access, install_id=ctl.install_id, grace_s=0
    )
    assert provider.inspect_container(f"shopfloor-m-foreign{SUFFIX}") is not None


def test_stopped_engine_side_container_of_ready_machine_is_restarted(
    client: TestClient, provider: DockerProvider
) -> None:
    machine = client.post("/api/v1/machines?wait=true", json={}).json()
    provider.stop_container(f"shopfloor-{machine['id']}", timeout_s=1)
    ctl = controller_of(client)
    report = reconcile.reconcile(
        db=ctl.db, provider=ctl.provider, access=ctl.access, install_id=ctl.install_id, grace_s=0
    )
    assert report.restarted == [machine["id"]]
    deadline = time.monotonic() + 30
    while not provider.inspect_container(f"shopfloor-{machine['id']}").running:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_orphan_volume_is_collected_by_its_real_engine_time(
    client: TestClient, provider: DockerProvider, settings: Settings
) -> None:
    """The engine's volume CreatedAt has no fraction of a second; it used to parse as
    "now", so a volume always looked just made and was never collected."""
    ctl = controller_of(client)
    name = f"shopfloor-ws-m-oldorphan{SUFFIX}"
    labels = {
        **settings.extra_label_map,
        machines.LABEL_CONTROLLER: ctl.install_id,
        machines.LABEL_MACHINE: f"m-oldorphan{SUFFIX}",
    }
    provider.create_volume(name, labels)
    (found,) = [v for v in provider.list_volumes(labels) if v.name == name]
    assert found.created_at is not None
    assert abs((found.created_at - datetime.now(UTC)).total_seconds()) < 5
    time.sleep(1.2)  # older than a grace of 1 s by the engine's own clock (whole seconds)
    later = datetime.now(UTC) + timedelta(seconds=1)
    report = reconcile.reconcile(
        db=ctl.db,
        provider=ctl.provider,
        access=ctl.access,
        install_id=ctl.install_id,
        grace_s=1,
        now=later,
    )
    assert name in report.removed_volumes
    assert not [v for v in provider.list_volumes(labels) if v.name == name]
    # with grace 0 as well, a fresh orphan goes on the next pass
    provider.create_volume(name, labels)
    report = reconcile.reconcile(
        db=ctl.db, provider=ctl.provider, access=ctl.access, install_id=ctl.install_id, grace_s=0
    )
    assert name in report.removed_volumes
