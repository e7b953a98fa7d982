"""Bad requests answer with a clear 4xx or a failed machine, and leave nothing behind."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.providers.docker import DockerProvider
from controller.settings import Settings
from controller.store.models import Role
from tests.conftest import TEST_LABEL, TEST_RUN_ID
from tests.integration.conftest import issue_token
from tests.integration.test_leases import put_pool, wait_ready


def engine_objects(provider: DockerProvider, install_id: str) -> tuple[int, int]:
    labels = {TEST_LABEL: TEST_RUN_ID, "shopfloor.controller": install_id}
    return len(provider.list_containers(labels)), len(provider.list_volumes(labels))


def install_id(client: TestClient) -> str:
    ctl = client.app.state.controller  # type: ignore[attr-defined]
    return str(ctl.install_id)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"image": "no-such/image:1"}, "unknown image"),
        ({"repo": "ext::sh -c touch% /tmp/pwned"}, "remote-helper"),
        ({"repo": "--upload-pack=touch /tmp/pwned"}, "must not start with '-'"),
        ({"repo": "/tmp/repo\nrm -rf /"}, "control characters"),
        ({"repo": "relative/path"}, "absolute path"),
        ({"repo": "/nonexistent/repo"}, "not a directory"),
        ({"repo": "ftp://example.com/repo.git"}, "not supported"),
        ({"memory_mb": 16}, "greater than or equal to 64"),
        ({"cpus": 0}, "greater than 0"),
        ({"network": "host"}, "network"),
        ({"labels": {"Bad Key": "x"}}, "label key"),
        ({"setup": [""]}, "setup command"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_machine_requests_are_422(
    client: TestClient, provider: DockerProvider, body: dict[str, object], fragment: str
) -> None:
    before = engine_objects(provider, install_id(client))
    response = client.post("/api/v1/machines?wait=true", json=body)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]
    assert engine_objects(provider, install_id(client)) == before
    assert client.get("/api/v1/machines").json()["count"] == 0


@pytest.mark.parametrize("ref", ["--orphan", "a..b", "main@{1}", "x\ny", "refs/heads/x.lock"])
def test_hostile_refs_are_422(client: TestClient, sample_repo: Path, ref: str) -> None:
    response = client.post(
        "/api/v1/machines?wait=true", json={"repo": str(sample_repo), "ref": ref}
    )
    assert response.status_code == 422, response.text


def test_repo_outside_allowed_roots(
    make_settings: Callable[..., Settings], sample_repo: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings = make_settings(repo_roots=str(allowed))
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        response = client.post("/api/v1/machines", json={"repo": str(sample_repo)})
        assert response.status_code == 403
        assert "SHOPFLOOR_REPO_ROOTS" in response.json()["detail"]


def test_unknown_ref_fails_with_gits_reason_and_leaves_nothing(
    client: TestClient, provider: DockerProvider, sample_repo: Path
) -> None:
    response = client.post(
        "/api/v1/machines?wait=true", json={"repo": str(sample_repo), "ref": "no-such-branch"}
    )
    machine = response.json()
    assert machine["state"] == "failed"
    assert "unknown ref 'no-such-branch'" in machine["reason"]
    assert engine_objects(provider, install_id(client)) == (0, 0)


def test_failing_setup_fails_the_machine_with_its_output(
    client: TestClient, provider: DockerProvider, sample_repo: Path
) -> None:
    body = {"repo": str(sample_repo), "setup": ["echo about to fail >&2; exit 4"]}
    machine = client.post("/api/v1/machines?wait=true", json=body).json()
    assert machine["state"] == "failed"
    assert "exit 4" in machine["reason"]
    assert "about to fail" in machine["reason"]
    assert engine_objects(provider, install_id(client)) == (0, 0)


def test_unreachable_remote_repo_fails_cleanly(
    client: TestClient, provider: DockerProvider
) -> None:
    body = {"repo": "https://127.0.0.1:9/nothing-listens-here.git"}
    machine = client.post("/api/v1/machines?wait=true", json=body).json()
    assert machine["state"] == "failed"
    assert "git could not fetch" in machine["reason"]
    assert engine_objects(provider, install_id(client)) == (0, 0)


def test_unknown_machine_is_404(client: TestClient) -> None:
    for method, path in (("GET", ""), ("POST", "/stop"), ("POST", "/reset"), ("DELETE", "")):
        response = client.request(method, f"/api/v1/machines/m-nope{path}")
        assert response.status_code == 404
        assert "no machine m-nope" in response.json()["detail"]


def test_auth_is_required_and_roles_are_checked(client: TestClient, settings: Settings) -> None:
    anonymous = client.get("/api/v1/machines", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    bad = client.get("/api/v1/machines", headers={"Authorization": "Bearer sf_ops_forged"})
    assert bad.status_code == 401
    reviewer = {"Authorization": f"Bearer {issue_token(settings, Role.reviewer)}"}
    assert client.get("/api/v1/machines", headers=reviewer).status_code == 403
    agent = {"Authorization": f"Bearer {issue_token(settings, Role.agent)}"}
    assert client.get("/api/v1/machines", headers=agent).status_code == 200
    denied = client.post("/api/v1/machines", json={}, headers=agent)
    assert denied.status_code == 403
    assert "needs role ops" in denied.json()["detail"]
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def commit_policy(repo: Path, text: str) -> None:
    """Append ``text`` to the repo's ``.shopfloor.toml`` and commit it on ``main``."""
    config = repo / ".shopfloor.toml"
    config.write_text(config.read_text() + "\n" + text)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t.local"]
        + ["commit", "--quiet", "-am", "policy"],
        check=True,
    )


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ("[verify]\napprovalz = 2\n", "[verify]: unknown key(s) approvalz"),
        ('[verify]\napprovals = "two"\n', "[verify] approvals must be a whole number"),
        ('[verify]\nconsole_errors = "ignore"\n', "[verify] console_errors must be one of"),
        ("[owners]\ntest = 5\n", "[owners] test must be an owner's name"),
        ('[owners]\n"Not A Stage" = "qa"\n', "[owners]: 'Not A Stage' is not a stage name"),
        ('verify = "strict"\n', "[verify] must be a table"),
    ],
)
def test_bad_verify_or_owners_section_fails_the_first_stage_naming_the_key(
    live_client: TestClient, sample_repo: Path, section: str, fragment: str
) -> None:
    """Issue 13: a wrong ``[verify]`` or ``[owners]`` is not silently ignored: the run's
    first stage fails with a message naming the key, and no later stage runs."""
    commit_policy(sample_repo, section)
    put_pool(
        live_client,
        "bad-policy",
        template={"repo": str(sample_repo)},
        min_ready=1,
        max_machines=1,
        reset="keep",
    )
    wait_ready(live_client, "bad-policy", 1)
    created = live_client.post(
        "/api/v1/runs",
        json={
            "task": "t",
            "repo": str(sample_repo),
            "pool": "bad-policy",
            "stages": [
                {"name": "plan", "agent": "command", "with": {"cmd": "touch /tmp/ran"}},
                {"name": "test", "agent": "command", "with": {"cmd": "true"}},
            ],
        },
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    deadline = time.monotonic() + 180
    while (run := live_client.get(f"/api/v1/runs/{run_id}").json())["status"] not in (
        "passed",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, run
        time.sleep(0.3)
    assert run["status"] == "failed", run
    assert fragment in run["reason"]
    first, second = run["stages"]
    assert first["status"] == "failed"
    assert fragment in first["summary"]
    assert first["history"] == []  # its agent never ran
    assert second["status"] == "skipped"
    wait_ready(live_client, "bad-policy", 1)  # handed over before the controller stops
