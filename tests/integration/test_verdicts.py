"""Verdicts over HTTP: roles both ways, timing, once only, and the baseline they move."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from controller.store.models import RunStatus, StageStatus
from tests.integration.evidence_env import EvidenceEnv, evidence_env
from tests.integration.test_artifacts import upload

__all__ = ["evidence_env"]


def page_png(marked: bool) -> bytes:
    image = Image.new("RGB", (80, 60), (255, 255, 255))
    if marked:
        ImageDraw.Draw(image).rectangle((10, 10, 19, 19), fill=(200, 0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def verdict(env: EvidenceEnv, run_id: str, role: str = "reviewer", **body: str):  # type: ignore[no-untyped-def]
    return env.client.post(f"/api/v1/runs/{run_id}/verdict", json=body, headers=env.headers(role))


def test_approve_closes_and_shows_in_run_json(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run(status=RunStatus.passed, stage_status=StageStatus.passed)
    assert env.client.get(f"/api/v1/runs/{run_id}").json()["verdict"] == "pending"
    answer = verdict(env, run_id, decision="approve", comment="looks right")
    assert answer.status_code == 201, answer.text
    assert answer.json()["verdict"] == "approved"
    assert answer.json()["closed"] is True
    shown = env.client.get(f"/api/v1/runs/{run_id}").json()
    assert (shown["verdict"], shown["closed"], shown["status"]) == ("approved", True, "passed")


def test_roles_are_enforced_both_ways(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run(status=RunStatus.passed, stage_status=StageStatus.passed)
    for role in ("ops", "agent"):
        refused = verdict(env, run_id, role=role, decision="approve")
        assert refused.status_code == 403, refused.text
        assert "reviewer" in refused.json()["detail"]
    reviewer = env.headers("reviewer")
    ops_call = env.client.post("/api/v1/machines", json={"repo": env.repo}, headers=reviewer)
    assert ops_call.status_code == 403
    assert "ops" in ops_call.json()["detail"]
    stop = env.client.post(f"/api/v1/machines/{env.machine_id}/stop", headers=reviewer)
    assert stop.status_code == 403
    assert env.client.get(f"/api/v1/runs/{run_id}").json()["verdict"] == "pending"


def test_verdict_on_a_running_run_or_twice_is_409(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run()
    early = verdict(env, run_id, decision="approve")
    assert early.status_code == 409
    assert "still running" in early.json()["detail"]
    env.set_status(run_id, RunStatus.failed, StageStatus.failed)
    no_comment = verdict(env, run_id, decision="reject")
    assert no_comment.status_code == 422
    assert "comment" in no_comment.json()["detail"]
    assert verdict(env, run_id, decision="reject", comment="tests fail").status_code == 201
    twice = verdict(env, run_id, decision="approve")
    assert twice.status_code == 409
    assert "already" in twice.json()["detail"]
    shown = env.client.get(f"/api/v1/runs/{run_id}/verdict").json()
    assert (shown["verdict"], shown["closed"], shown["comment"]) == (
        "rejected",
        False,
        "tests fail",
    )


def test_bad_decision_is_422(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    run_id = env.make_run(status=RunStatus.passed, stage_status=StageStatus.passed)
    assert verdict(env, run_id, decision="maybe").status_code == 422
    assert verdict(env, "r-none", decision="approve").status_code == 404


def test_only_approval_makes_the_baseline(evidence_env: EvidenceEnv) -> None:
    env = evidence_env
    repo = env.repo + "#baseline-test"  # a repo of its own: no baseline from other tests
    first = env.make_run(repo=repo)
    assert (
        upload(
            env,
            first,
            data=page_png(False),
            kind="screenshot",
            name="home.png",
            stage="qa",
            content_type="image/png",
            meta='{"page": "/"}',
        ).status_code
        == 201
    )
    env.set_status(first, RunStatus.passed, StageStatus.passed)

    rejected = env.make_run(repo=repo)
    shot = upload(
        env,
        rejected,
        data=page_png(True),
        kind="screenshot",
        name="home.png",
        stage="qa",
        content_type="image/png",
        meta='{"page": "/"}',
    ).json()
    assert shot["facts"]["comparison"] is None  # nothing approved yet
    env.set_status(rejected, RunStatus.passed, StageStatus.passed)
    assert verdict(env, rejected, decision="reject", comment="red box").status_code == 201
    assert verdict(env, first, decision="approve").status_code == 201

    third = env.make_run(repo=repo)
    compared = upload(
        env,
        third,
        data=page_png(True),
        kind="screenshot",
        name="home.png",
        stage="qa",
        content_type="image/png",
        meta='{"page": "/"}',
    ).json()
    comparison = compared["facts"]["comparison"]
    assert comparison["baseline_run_id"] == first
    assert comparison["identical"] is False
    assert comparison["changed_pixels"] == 100
    assert comparison["bbox"] == [10, 10, 20, 20]
