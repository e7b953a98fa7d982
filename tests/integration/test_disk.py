"""Per-machine disk limits on a real engine: a full disk fails with ENOSPC inside the machine,
the host loses no more than the limit, the machine stays usable, its disks persist across
restarts, are reported when near full, and go with the machine (or with its orphans).

Before the limits, 3 GB in /workspace and 1 GB in /tmp went straight onto the host's disk.
Small sizes here so that the tests write little.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.providers.disks import DiskDir, DiskStore
from controller.providers.docker import DockerProvider
from controller.services import machines, reconcile
from controller.services.runtime import Controller
from controller.settings import Settings
from controller.store.models import Role
from tests.conftest import TEST_RUN_ID
from tests.integration.conftest import issue_token

MiB = 1024 * 1024
WORKSPACE = 64 * MiB
SCRATCH = 32 * MiB
SHM = 8 * MiB
ENOSPC = "No space left on device"


@pytest.fixture
def disk_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(workspace_disk_bytes=WORKSPACE, scratch_disk_bytes=SCRATCH, shm_bytes=SHM)


@pytest.fixture
def disk_client(disk_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(disk_settings, background=False)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {issue_token(disk_settings, Role.ops)}"
        yield test_client
        # machines left by a test go with their disks (the session cleanup has no disks)
        ctl = controller_of(test_client)
        for owner in disk_owners(disk_settings):  # containers first
            kind, _, name = owner.partition("-")
            remove = ctl.provider.remove_container if kind == "container" else None
            (remove or ctl.provider.remove_volume)(name)


@pytest.fixture
def machine_id(disk_client: TestClient) -> str:
    response = disk_client.post("/api/v1/machines?wait=true", json={})
    assert response.json()["state"] == "ready", response.text
    return str(response.json()["id"])


def controller_of(client: TestClient) -> Controller:
    ctl: Controller = client.app.state.controller  # type: ignore[attr-defined]
    return ctl


def sh(client: TestClient, machine_id: str, cmd: str) -> dict[str, Any]:
    response = client.post(f"/api/v1/machines/{machine_id}/exec", json={"cmd": cmd})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def allocated(path: Path) -> int:
    """Bytes the host really gave a (sparse) file."""
    return os.stat(path).st_blocks * 512


def disk_image(settings: Settings, owner: str) -> Path:
    return settings.data_dir / "disks" / owner / "disk.img"


def disk_owners(settings: Settings) -> list[str]:
    """The machines' disks, not the spares made ahead (``.spare-<size>``)."""
    return sorted(n for n in os.listdir(settings.data_dir / "disks") if not n.startswith("."))


def mounted(text: str) -> bool:
    return text in Path("/proc/self/mounts").read_text()


def test_a_full_workspace_fails_with_enospc_and_the_host_keeps_its_disk(
    disk_client: TestClient, disk_settings: Settings, machine_id: str
) -> None:
    fill = sh(disk_client, machine_id, "dd if=/dev/zero of=/workspace/big bs=1M count=200")
    assert fill["exit_code"] != 0, fill
    assert ENOSPC in fill["stderr"]
    image = disk_image(disk_settings, f"volume-{machines.volume_name(machine_id)}")
    assert allocated(image) <= WORKSPACE  # the host lost no more than the limit
    # usable again once the file is gone, and the host gets the blocks back (discard)
    freed = sh(disk_client, machine_id, "rm /workspace/big && echo ok > /workspace/after")
    assert freed["exit_code"] == 0, freed
    assert sh(disk_client, machine_id, "cat /workspace/after")["stdout"] == "ok\n"
    deadline = time.monotonic() + 15  # ext4 discards at its next journal commit (~5 s)
    while allocated(image) >= WORKSPACE // 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert allocated(image) < WORKSPACE // 2


@pytest.mark.parametrize("folder", ["/tmp", "/var/tmp", "$HOME", "/dev/shm", "/run/lock"])
def test_everything_else_the_machine_writes_is_limited_too(
    disk_client: TestClient, machine_id: str, folder: str
) -> None:
    fill = sh(disk_client, machine_id, f"dd if=/dev/zero of={folder}/big bs=1M count=100")
    assert fill["exit_code"] != 0, fill
    assert ENOSPC in fill["stderr"]
    again = sh(disk_client, machine_id, f"rm {folder}/big && echo ok > {folder}/small")
    assert again["exit_code"] == 0, again


def test_disks_persist_across_restarts_and_mounts_come_back(
    disk_client: TestClient, disk_settings: Settings, machine_id: str
) -> None:
    base = f"/api/v1/machines/{machine_id}"
    assert (
        sh(disk_client, machine_id, "echo kept > /workspace/f && echo home > ~/f")["exit_code"] == 0
    )
    assert disk_client.post(f"{base}/stop").json()["state"] == "stopped"
    # as after a host reboot: the disks lost their mounts; the engine cannot start the
    # machine on the host's own disk, and the controller mounts them again on start
    disks = disk_settings.data_dir / "disks"
    for owner in disk_owners(disk_settings):
        os.system(f"umount {disks / owner / 'mnt'}")  # noqa: S605 - a test path
        assert not mounted(str(disks / owner / "mnt"))
    assert disk_client.post(f"{base}/start").json()["state"] == "ready"
    assert sh(disk_client, machine_id, "cat /workspace/f ~/f")["stdout"] == "kept\nhome\n"


def test_usage_is_reported_and_near_full_writes_an_event(
    disk_client: TestClient, machine_id: str
) -> None:
    ctl = controller_of(disk_client)

    def measure() -> reconcile.ReconcileReport:
        return reconcile.reconcile(
            db=ctl.db,
            provider=ctl.provider,
            access=ctl.access,
            install_id=ctl.install_id,
            grace_s=3600,
            disk_watch=ctl.disk_watch,
            near_full=0.9,
        )

    assert measure().near_full == []
    shown = disk_client.get(f"/api/v1/machines/{machine_id}").json()
    assert WORKSPACE * 0.8 < shown["disk_limit_bytes"] <= WORKSPACE  # less what ext4 keeps
    assert 0 < shown["disk_used_bytes"] < WORKSPACE * 0.5
    sh(disk_client, machine_id, "head -c 60M /dev/zero > /workspace/big || true")
    assert measure().near_full == [machine_id]
    assert measure().near_full == []  # once
    full = disk_client.get(f"/api/v1/machines/{machine_id}").json()
    assert full["disk_used_bytes"] >= 0.9 * full["disk_limit_bytes"]
    events = disk_client.get(
        "/api/v1/events", params={"kind": "machine.disk_near_full", "subject": machine_id}
    ).json()
    assert len(events["data"]) == 1
    metrics = disk_client.get("/metrics").text
    assert f'shopfloor_machine_disk_limit_bytes{{machine="{machine_id}"}}' in metrics


def test_destroy_removes_the_disks(
    disk_client: TestClient, disk_settings: Settings, machine_id: str
) -> None:
    disks = disk_settings.data_dir / "disks"
    owners = disk_owners(disk_settings)
    assert owners == [
        f"container-{machines.container_name(machine_id)}",
        f"volume-{machines.volume_name(machine_id)}",
    ]
    assert disk_client.delete(f"/api/v1/machines/{machine_id}").status_code == 200
    assert disk_owners(disk_settings) == []
    for owner in owners:
        assert not mounted(str(disks / owner))


def test_orphan_volume_takes_its_disk_with_it(
    disk_client: TestClient, disk_settings: Settings, provider: DockerProvider
) -> None:
    ctl = controller_of(disk_client)
    name = f"shopfloor-ws-m-diskorphan{TEST_RUN_ID}"
    labels = {
        **disk_settings.extra_label_map,
        machines.LABEL_CONTROLLER: ctl.install_id,
        machines.LABEL_MACHINE: f"m-diskorphan{TEST_RUN_ID}",
    }
    ctl.provider.create_volume(name, labels, size_bytes=WORKSPACE)
    assert disk_image(disk_settings, f"volume-{name}").exists()
    report = reconcile.reconcile(
        db=ctl.db, provider=ctl.provider, access=ctl.access, install_id=ctl.install_id, grace_s=0
    )
    assert name in report.removed_volumes
    assert not disk_image(disk_settings, f"volume-{name}").exists()
    assert not mounted(f"volume-{name}")


def test_a_spare_disk_is_made_ahead_and_taken(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "disks", spare_sizes=(16 * MiB,))
    spare = tmp_path / "disks" / f".spare-{16 * MiB}"
    store.start()
    try:
        wait_for(lambda: mounted(str(spare / "mnt")))
        data = store.create("volume-x", 16 * MiB, [DiskDir("", 1000, 0o755)])
        assert data == tmp_path / "disks" / "volume-x" / "mnt" / "data"
        assert mounted(str(tmp_path / "disks" / "volume-x" / "mnt"))  # the spare, renamed
        assert data.stat().st_uid == 1000
        assert store.owners() == ["volume-x"]  # spares are nobody's
        # Not made beside the engine's work for the machine that took it: when asked.
        assert not spare.exists()
        assert not store._filling
        store.refill_spares()
        wait_for(lambda: mounted(str(spare / "mnt")))  # the next one
        assert store.usage("volume-x") is not None
    finally:
        store.remove("volume-x")
        wait_for(lambda: store._filling == set())
        store.close()
    assert not mounted(str(tmp_path / "disks"))


def test_a_machine_takes_the_spares_and_they_are_made_again_once_it_started(
    disk_client: TestClient, disk_settings: Settings
) -> None:
    disks = disk_settings.data_dir / "disks"
    spares = [disks / f".spare-{size}" / "mnt" for size in (WORKSPACE, SCRATCH)]
    wait_for(lambda: all(mounted(str(spare)) for spare in spares))
    made = {spare: spare.parent.stat().st_ino for spare in spares}
    machine = disk_client.post("/api/v1/machines?wait=true", json={}).json()
    assert machine["state"] == "ready", machine
    wait_for(lambda: all(mounted(str(spare)) for spare in spares))
    assert all(spare.parent.stat().st_ino != made[spare] for spare in spares)  # new ones
    owners = disk_owners(disk_settings)
    assert owners == sorted(
        [f"container-shopfloor-{machine['id']}", f"volume-shopfloor-ws-{machine['id']}"]
    )


def wait_for(check: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_upload_into_a_full_workspace_is_507_and_leaves_nothing(
    disk_client: TestClient, machine_id: str
) -> None:
    sh(disk_client, machine_id, "head -c 50M /dev/zero > /workspace/big || true")
    files = f"/api/v1/machines/{machine_id}/files"
    answer = disk_client.put(files, params={"path": "up.bin"}, content=b"x" * (20 * MiB))
    assert answer.status_code == 507, answer.text
    assert answer.json()["error"] == "storage_full"
    assert "full" in answer.json()["detail"]
    assert sh(disk_client, machine_id, "ls /workspace")["stdout"] == "big\n"
    sh(disk_client, machine_id, "rm /workspace/big")
    assert disk_client.put(files, params={"path": "up.bin"}, content=b"x" * MiB).status_code < 300


def test_the_engine_restarts_a_crashed_machine_on_its_disks(
    disk_client: TestClient, provider: DockerProvider, machine_id: str
) -> None:
    """Restart policy unless-stopped: the engine brings the machine back by itself (as after
    an engine restart), on the same disks, still limited."""
    assert sh(disk_client, machine_id, "echo kept > /workspace/f")["exit_code"] == 0
    container = provider.client.containers.get(machines.container_name(machine_id))
    pid = int(container.attrs["State"]["Pid"])
    os.kill(pid, 9)  # the machine's init dies: a crash, not a stop
    deadline = time.monotonic() + 30
    while True:
        container.reload()
        state = container.attrs["State"]
        if state["Running"] and int(state["Pid"]) not in (0, pid):
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    found = provider.exec(container.name or "", ["sh", "-c", "cat /workspace/f; df -B1 /workspace"])
    out = b"".join(chunk for _, chunk in found).decode()
    assert out.startswith("kept\n")
    size = int(out.splitlines()[-1].split()[1])
    assert size <= WORKSPACE
