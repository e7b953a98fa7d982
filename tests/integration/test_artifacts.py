"""Artifact upload and download over HTTP, under a real lease on a real machine."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from controller.store.models import RunStatus, StageStatus
from tests.integration.evidence_env import EvidenceEnv, evidence_env

__all__ = ["evidence_env"]


def png_bytes(colour: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format="PNG")
    return out.getvalue()


def upload(
    env: EvidenceEnv,
    run_id: str,
    *,
    data: bytes = b"hello\n",
    kind: str = "log",
    name: str | None = "out.log",
    stage: str = "test",
    token: str | None = "lease",
    role: str = "agent",
    content_type: str = "text/plain",
    **fields: str,
) -> httpx.Response:
    headers = env.headers(role)
    if token == "lease":
        headers["X-Lease-Token"] = env.lease_token
    elif token is not None:
        headers["X-Lease-Token"] = token
    form: dict[str, Any] = {"kind": kind, **fields}
    if name is not None:
        form["name"] = name
    return env.client.post(
        f"/api/v1/runs/{run_id}/stages/{stage}/artifacts",
        data=form,
        files={"file": ("upload.bin", data, content_type)},
        headers=headers,
    )


def test_upload_then_download_with_safe_headers(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    made = upload(env, run_id, data=b"collected 3 items\nFAILED x\n", meta='{"source": "pytest"}')
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["sha256"] == hashlib.sha256(b"collected 3 items\nFAILED x\n").hexdigest()
    assert (body["run_id"], body["stage"], body["machine_id"]) == (run_id, "test", env.machine_id)
    assert len(body["commit"]) == 40  # the machine's checkout commit
    assert body["meta"] == {"source": "pytest"}

    got = env.client.get(body["url"], headers=env.headers("reviewer"))
    assert got.status_code == 200
    assert got.content == b"collected 3 items\nFAILED x\n"
    assert got.headers["content-type"].startswith("text/plain")
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-disposition"].startswith("attachment;")
    assert "sandbox" in got.headers["content-security-policy"]

    listed = env.client.get(f"/api/v1/runs/{run_id}/artifacts").json()
    assert [a["id"] for a in listed["data"]] == [body["id"]]


def test_screenshot_is_inline_png_and_html_is_never_inline(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    shot = upload(
        env,
        run_id,
        data=png_bytes(),
        kind="screenshot",
        name="home.png",
        stage="qa",
        content_type="image/png",
        meta='{"page": "/"}',
    )
    assert shot.status_code == 201, shot.text
    assert shot.json()["facts"]["width"] == 40
    got = env.client.get(shot.json()["url"])
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-disposition"].startswith("inline;")

    page = upload(
        env,
        run_id,
        data=b"<script>alert(1)</script>",
        kind="file",
        name="evil.html",
        content_type="text/html",
    )
    assert page.status_code == 201, page.text
    got = env.client.get(page.json()["url"])
    assert got.headers["content-disposition"].startswith("attachment;")
    assert got.headers["x-content-type-options"] == "nosniff"


def test_same_content_is_stored_once(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    first = upload(env, run_id, data=b"same bytes", name="a.log").json()
    second = upload(env, run_id, data=b"same bytes", name="b.log").json()
    assert first["sha256"] == second["sha256"]
    assert first["id"] != second["id"]
    blob = env.settings.data_dir / "artifacts" / "blobs" / first["sha256"][:2]
    assert [p.name for p in blob.iterdir()] == [first["sha256"][2:]]


@pytest.mark.parametrize(
    "name",
    [
        "../escape.log",
        "%2e%2e/escape.log",
        "..%5cescape.log",
        "/etc/passwd",
        "nul\x00.log",
        "C:\\x.log",
    ],
)
def test_hostile_names_are_422(evidence_env: EvidenceEnv, name: str) -> None:
    env = evidence_env
    run_id = env.make_run()
    answer = upload(env, run_id, name=name)
    assert answer.status_code == 422, answer.text
    assert "name" in answer.json()["detail"]
    assert env.client.get(f"/api/v1/runs/{run_id}/artifacts").json()["count"] == 0


def test_upload_over_the_cap_is_413(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    answer = upload(env, run_id, data=b"x" * (env.settings.artifact_cap_bytes + 1))
    assert answer.status_code == 413, answer.text
    assert "cap" in answer.json()["detail"]
    way_over = upload(env, run_id, data=b"x" * (env.settings.artifact_cap_bytes * 3))
    assert way_over.status_code == 413


def test_fake_png_and_bad_junit_are_422(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    fake = upload(
        env,
        run_id,
        data=b"\x89PNG\r\n\x1a\nnot really",
        kind="screenshot",
        name="x.png",
        stage="qa",
        content_type="image/png",
    )
    assert fake.status_code == 422
    assert "PNG" in fake.json()["detail"]
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
        b"<testsuites><testsuite name='&b;'/></testsuites>"
    )
    refused = upload(env, run_id, data=bomb, kind="junit", name="junit.xml")
    assert refused.status_code == 422
    assert "DTD" in refused.json()["detail"]
    broken = upload(env, run_id, data=b"<testsuite><testcase", kind="junit", name="junit.xml")
    assert broken.status_code == 422
    assert "well-formed" in broken.json()["detail"]
    odd_kind = upload(env, run_id, kind="video")
    assert odd_kind.status_code == 422
    assert "use one of" in odd_kind.json()["detail"]


def test_lease_token_is_checked(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    missing = upload(env, run_id, token=None)
    assert missing.status_code == 409
    assert "X-Lease-Token" in missing.json()["detail"]
    stale = upload(env, run_id, token=str(env.lease_fence))
    assert stale.status_code == 409
    assert stale.json()["error"] == "stale_lease"
    assert upload(env, run_id, role="reviewer").status_code == 403
    assert upload(env, run_id, stage="deploy").status_code == 404
    assert upload(env, "r-nothere").status_code == 404


def test_finished_run_is_sealed(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    env.set_status(run_id, RunStatus.passed, StageStatus.passed)
    answer = upload(env, run_id)
    assert answer.status_code == 409
    assert "sealed" in answer.json()["detail"]


def test_download_needs_a_token_and_an_existing_artifact(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    assert env.client.get("/api/v1/artifacts/a-nope").status_code == 404
    anonymous = httpx.Client(transport=env.client._transport, base_url="http://testserver")
    assert anonymous.get("/api/v1/artifacts/a-nope").status_code == 401


def test_pinning_is_ops_only(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    assert env.client.post(f"/api/v1/runs/{run_id}/pin").json() == {
        "run_id": run_id,
        "pinned": True,
    }
    forbidden = env.client.post(f"/api/v1/runs/{run_id}/pin", headers=env.headers("reviewer"))
    assert forbidden.status_code == 403
