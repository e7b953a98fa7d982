"""Exec edge cases: huge output, bytes that are not UTF-8, commands that never end, streaming."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def machine_id(client: TestClient) -> str:
    response = client.post("/api/v1/machines?wait=true", json={})
    assert response.json()["state"] == "ready", response.text
    return str(response.json()["id"])


def exec_(client: TestClient, machine_id: str, **body: object) -> dict[str, object]:
    response = client.post(f"/api/v1/machines/{machine_id}/exec", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_huge_output_keeps_head_and_tail(client: TestClient, machine_id: str) -> None:
    result = exec_(
        client, machine_id, cmd="echo START; head -c 50M /dev/zero | tr '\\0' x; echo; echo END"
    )
    assert result["exit_code"] == 0
    assert result["truncated"] is True
    stdout = str(result["stdout"])
    assert stdout.startswith("START\n")
    assert stdout.endswith("END\n")
    assert "bytes omitted" in stdout
    assert len(stdout) < 1024 * 1024 + 200


def test_non_utf8_output_is_replaced(client: TestClient, machine_id: str) -> None:
    result = exec_(client, machine_id, cmd="printf 'a\\376b'; printf '\\377' >&2")
    assert result["stdout"] == "a\ufffdb"
    assert result["stderr"] == "\ufffd"


def test_timeout_kills_the_command_and_says_so(client: TestClient, machine_id: str) -> None:
    result = exec_(client, machine_id, cmd="sleep 600 & sleep 600", timeout_s=1)
    assert result["timed_out"] is True
    assert "timed out after 1s" in str(result["stderr"])
    assert float(result["duration_ms"]) < 30_000  # type: ignore[arg-type]
    left = exec_(client, machine_id, cmd="pgrep -c sleep || true")
    assert str(left["stdout"]).strip() == "0"


def test_cwd_env_and_exit_code(client: TestClient, machine_id: str) -> None:
    result = exec_(
        client, machine_id, cmd="pwd; echo $GREETING; exit 7", cwd="/tmp", env={"GREETING": "hi"}
    )
    assert result["stdout"] == "/tmp\nhi\n"
    assert result["exit_code"] == 7


def test_stream_gives_ndjson_lines(client: TestClient, machine_id: str) -> None:
    with client.stream(
        "POST",
        f"/api/v1/machines/{machine_id}/exec?stream=true",
        json={"cmd": "echo one; sleep 0.2; echo two >&2; printf '\\376'"},
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    chunks = [line for line in lines if "stream" in line]
    assert "".join(c["data"] for c in chunks if c["stream"] == "stdout") == "one\n\ufffd"
    assert "".join(c["data"] for c in chunks if c["stream"] == "stderr") == "two\n"
    assert lines[-1]["exit_code"] == 0


def test_bad_exec_input_is_422(client: TestClient, machine_id: str) -> None:
    for body in (
        {"cmd": ""},
        {"cmd": "true", "cwd": "relative"},
        {"cmd": "true", "env": {"1BAD": "x"}},
        {"cmd": "true", "timeout_s": 0},
    ):
        response = client.post(f"/api/v1/machines/{machine_id}/exec", json=body)
        assert response.status_code == 422, body
        assert response.json()["detail"]
