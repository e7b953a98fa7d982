"""One-shot exec rides the SSH connection too: what differs from the engine's exec is tested."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def exec_(client: TestClient, machine_id: str, **body: object) -> dict[str, Any]:
    response = client.post(f"/api/v1/machines/{machine_id}/exec", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_background_child_holding_stdout_does_not_hold_the_call(
    module_client: TestClient, module_machine: str
) -> None:
    result = exec_(
        module_client, module_machine, cmd="echo started; sleep 120 & echo done", timeout_s=60
    )
    assert result["exit_code"] == 0
    assert result["stdout"] == "started\ndone\n"
    assert result["duration_ms"] < 30_000
    exec_(module_client, module_machine, cmd="pkill -x sleep || true")


def test_image_path_env_and_user(module_client: TestClient, module_machine: str) -> None:
    result = exec_(
        module_client,
        module_machine,
        cmd='echo "$PATH|$WHO|$(whoami)|$SSL_CERT_FILE"',
        env={"WHO": "a b"},
    )
    path, who, user, cafile = result["stdout"].strip().split("|")
    assert "/usr/sbin" in path.split(":")
    assert (who, user) == ("a b", "runner")
    assert cafile == "/etc/ssl/certs/ca-certificates.crt"


def test_missing_cwd_is_a_clear_failure(module_client: TestClient, module_machine: str) -> None:
    result = exec_(module_client, module_machine, cmd="true", cwd="/no/such/dir")
    assert result["exit_code"] != 0
    assert "No such file or directory" in result["stderr"]
