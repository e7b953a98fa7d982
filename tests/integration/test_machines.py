"""Machines through the HTTP API against the real engine."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from controller.providers.docker import DockerProvider
from tests.integration.conftest import wait_state


def create(client: TestClient, **body: object) -> dict[str, object]:
    response = client.post("/api/v1/machines?wait=true", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def run(client: TestClient, machine_id: str, cmd: str, **extra: object) -> dict[str, object]:
    response = client.post(f"/api/v1/machines/{machine_id}/exec", json={"cmd": cmd, **extra})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_provision_from_local_repo_and_exec(client: TestClient, sample_repo: Path) -> None:
    machine = create(client, repo=str(sample_repo), setup=["echo set-up > .setup-done"])
    assert machine["state"] == "ready", machine
    assert machine["workdir"] == "/workspace/sample-app"
    assert len(str(machine["commit"])) == 40

    result = run(client, str(machine["id"]), "git log --oneline | wc -l; cat .setup-done; whoami")
    assert result["exit_code"] == 0
    assert result["stdout"].split() == ["1", "set-up", "runner"]  # type: ignore[union-attr]
    assert result["truncated"] is False


def test_stop_start_keeps_workspace_and_reset_cleans_it(
    client: TestClient, sample_repo: Path
) -> None:
    machine_id = str(create(client, repo=str(sample_repo))["id"])
    run(client, machine_id, "echo kept > notes.txt && echo junk > app.py")

    assert client.post(f"/api/v1/machines/{machine_id}/stop").json()["state"] == "stopped"
    stopped = client.post(f"/api/v1/machines/{machine_id}/exec", json={"cmd": "true"})
    assert stopped.status_code == 409
    assert stopped.json()["state"] == "stopped"
    assert client.post(f"/api/v1/machines/{machine_id}/start").json()["state"] == "ready"
    assert run(client, machine_id, "cat notes.txt")["stdout"] == "kept\n"

    assert client.post(f"/api/v1/machines/{machine_id}/reset").status_code == 200
    after = run(client, machine_id, "ls notes.txt; git status --porcelain; head -c 6 app.py")
    assert "No such file" in str(after["stderr"])
    assert after["stdout"] == '"""A t'


def test_destroy_removes_container_and_volume(
    client: TestClient, provider: DockerProvider, sample_repo: Path
) -> None:
    machine = create(client, repo=str(sample_repo))
    machine_id = str(machine["id"])
    assert provider.inspect_container(f"shopfloor-{machine_id}") is not None

    assert client.delete(f"/api/v1/machines/{machine_id}").json()["state"] == "destroyed"
    assert provider.inspect_container(f"shopfloor-{machine_id}") is None
    assert provider.list_volumes({"shopfloor.machine": machine_id}) == []
    assert client.get(f"/api/v1/machines/{machine_id}").json()["state"] == "destroyed"
    assert client.get("/api/v1/machines").json()["count"] == 0
    gone = client.post(f"/api/v1/machines/{machine_id}/exec", json={"cmd": "true"})
    assert gone.status_code == 409
    assert gone.json()["state"] == "destroyed"
    assert client.post(f"/api/v1/machines/{machine_id}/start").status_code == 409
    assert client.delete(f"/api/v1/machines/{machine_id}").json()["state"] == "destroyed"


def test_machine_is_sandboxed(client: TestClient, provider: DockerProvider) -> None:
    machine_id = str(create(client, memory_mb=256, cpus=0.5)["id"])
    attrs = provider.client.containers.get(f"shopfloor-{machine_id}").attrs
    host = attrs["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["PidsLimit"] > 0
    assert host["Memory"] == 256 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["Init"] is True
    assert host["NetworkMode"] == "none"
    assert not any("docker.sock" in (m.get("Source") or "") for m in attrs["Mounts"])
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    no_net = run(
        client,
        machine_id,
        "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 80), 2)'",
    )
    assert no_net["exit_code"] != 0


def test_list_filters_and_envelope(client: TestClient) -> None:
    machine_id = str(create(client, labels={"team": "core"})["id"])
    listed = client.get("/api/v1/machines", params={"label": "team=core"}).json()
    assert listed["count"] == 1
    assert [m["id"] for m in listed["data"]] == [machine_id]
    assert client.get("/api/v1/machines", params={"label": "team=other"}).json()["count"] == 0
    assert client.get("/api/v1/machines", params={"state": "stopped"}).json()["count"] == 0


def test_background_provision_reaches_ready(client: TestClient, sample_repo: Path) -> None:
    response = client.post("/api/v1/machines", json={"repo": str(sample_repo)})
    assert response.status_code == 201
    assert response.json()["state"] == "provisioning"
    assert wait_state(client, response.json()["id"], {"ready", "failed"})["state"] == "ready"
