"""Files over SFTP: round trips, confinement to /workspace (hostile paths), the size cap."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token


def sh(client: TestClient, machine_id: str, cmd: str) -> dict[str, Any]:
    response = client.post(f"/api/v1/machines/{machine_id}/exec", json={"cmd": cmd})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def put(client: TestClient, machine_id: str, path: str, data: bytes) -> Any:
    return client.put(f"/api/v1/machines/{machine_id}/files", params={"path": path}, content=data)


def get(client: TestClient, machine_id: str, path: str) -> Any:
    return client.get(f"/api/v1/machines/{machine_id}/files", params={"path": path})


def test_put_then_get_round_trips_bytes(module_client: TestClient, module_machine: str) -> None:
    data = bytes(range(256)) * 1000
    written = put(module_client, module_machine, "deep/new/dir/blob.bin", data)
    assert written.status_code == 200, written.text
    assert written.json() == {"path": "/workspace/deep/new/dir/blob.bin", "size": len(data)}
    assert get(module_client, module_machine, "/workspace/deep/new/dir/blob.bin").content == data
    listing = sh(module_client, module_machine, "stat -c '%U %s' /workspace/deep/new/dir/blob.bin")
    assert listing["stdout"] == f"runner {len(data)}\n"


def test_empty_file_and_overwrite(module_client: TestClient, module_machine: str) -> None:
    assert put(module_client, module_machine, "empty.txt", b"something").status_code == 200
    assert put(module_client, module_machine, "empty.txt", b"").status_code == 200
    assert get(module_client, module_machine, "empty.txt").content == b""


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "a/../../etc/passwd",
        "/etc/passwd",
        "/workspace/../etc/passwd",
        "/workspacefoo/x",
        "..",
        "",
        "a\nb",
        "a\x00b",
    ],
)
def test_paths_outside_the_workspace_are_refused(
    module_client: TestClient, module_machine: str, path: str
) -> None:
    for response in (
        get(module_client, module_machine, path),
        put(module_client, module_machine, path, b"x"),
    ):
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"] == "invalid_input"
        assert response.json()["detail"]


def test_url_encoded_traversal_is_refused_or_stays_literal(
    module_client: TestClient, module_machine: str
) -> None:
    base = f"/api/v1/machines/{module_machine}/files?path="
    for raw in (
        "%2e%2e/etc/passwd",
        "%2E%2E%2Fetc%2Fpasswd",
        "..%2fetc%2fpasswd",
        "%2Fetc%2Fpasswd",
    ):
        response = module_client.get(base + raw)
        assert response.status_code == 422, (raw, response.text)
    double = module_client.get(base + "%252e%252e/etc/passwd")  # the literal name "%2e%2e"
    assert double.status_code == 404, double.text
    assert b"root:" not in double.content


def test_symlink_pointing_out_is_refused(module_client: TestClient, module_machine: str) -> None:
    sh(
        module_client,
        module_machine,
        "cd /workspace && ln -sfn /etc etc-link && ln -sfn /etc/passwd pw && ln -sfn /nowhere dangling"
        " && mkdir -p inside && ln -sfn inside ok-link",
    )
    for path in ("etc-link/passwd", "pw", "/workspace/etc-link/hostname"):
        response = get(module_client, module_machine, path)
        assert response.status_code == 422, (path, response.text)
        assert "outside /workspace" in response.json()["detail"]
    for path in ("etc-link/evil", "pw", "dangling"):
        response = put(module_client, module_machine, path, b"x")
        assert response.status_code == 422, (path, response.text)
    assert put(module_client, module_machine, "ok-link/fine.txt", b"in").status_code == 200
    assert get(module_client, module_machine, "inside/fine.txt").content == b"in"


def test_missing_file_and_directory(module_client: TestClient, module_machine: str) -> None:
    missing = get(module_client, module_machine, "no/such/file")
    assert missing.status_code == 404
    assert "no file" in missing.json()["detail"]
    sh(module_client, module_machine, "mkdir -p /workspace/adir")
    assert get(module_client, module_machine, "adir").status_code == 422
    sh(module_client, module_machine, "echo x > /workspace/plainfile")
    assert put(module_client, module_machine, "plainfile/child", b"x").status_code == 422


@pytest.fixture
def capped_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(file_cap_bytes=1000)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        yield client


def test_upload_and_download_over_the_cap_get_413(capped_client: TestClient) -> None:
    machine = capped_client.post("/api/v1/machines?wait=true", json={}).json()
    assert machine["state"] == "ready"
    over = put(capped_client, machine["id"], "big.bin", b"x" * 1001)
    assert over.status_code == 413, over.text
    assert "cap of 1000" in over.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the stream itself is counted
        for _ in range(20):
            yield b"y" * 100

    streamed = capped_client.put(
        f"/api/v1/machines/{machine['id']}/files", params={"path": "s.bin"}, content=chunks()
    )
    assert streamed.status_code == 413, streamed.text
    assert put(capped_client, machine["id"], "ok.bin", b"x" * 1000).status_code == 200
    sh(capped_client, machine["id"], "head -c 5000 /dev/zero > /workspace/large.bin")
    too_big = get(capped_client, machine["id"], "large.bin")
    assert too_big.status_code == 413
    assert "5000 bytes" in too_big.json()["detail"]
