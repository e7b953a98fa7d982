"""End to end: the sample repo through plan, implement, test, review and QA with the
built-in agents on one real machine, then every kind of evidence in the gallery and a
reviewer's approval closing the run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from make_repo import SAMPLE_CHANGE_STAGES

from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token
from tests.integration.test_runs import create_run, wait_run

API = "/api/v1"


def run_through(client: TestClient, repo: Path, task: str) -> dict[str, Any]:
    created = create_run(client, task=task, repo=str(repo), stages=SAMPLE_CHANGE_STAGES)
    ended = wait_run(client, created["id"], timeout_s=300)
    assert ended["status"] == "passed", [(s["name"], s["summary"]) for s in ended["stages"]]
    return ended


def test_five_stages_leave_every_kind_of_evidence_in_the_gallery(
    live_client: TestClient, settings: Settings, sample_repo: Path
) -> None:
    client = live_client
    run = run_through(client, sample_repo, "Say who builds the page")
    assert {s["machine_id"] for s in run["stages"]} == {run["machine_id"]}
    assert (run["verdict"], run["closed"]) == ("pending", False)

    artifacts = client.get(f"{API}/runs/{run['id']}/artifacts").json()["data"]
    kinds = {a["kind"] for a in artifacts}
    # every kind the built-in agents make (none of them emits a plain `file`)
    assert {"plan", "diff", "log", "junit", "screenshot"} <= kinds
    assert all(a["machine_id"] == run["machine_id"] and a["commit"] for a in artifacts)
    by_stage = {(a["stage"], a["kind"]) for a in artifacts}
    assert {
        ("plan", "plan"),
        ("implement", "diff"),
        ("test", "junit"),
        ("qa", "screenshot"),
    } <= by_stage
    junit = next(a for a in artifacts if a["kind"] == "junit")
    assert junit["facts"]["junit"]["passed"] >= 2
    assert junit["facts"]["junit"]["failed"] == 0
    shots = [a for a in artifacts if a["kind"] == "screenshot"]
    assert {s["facts"]["page"] for s in shots} == {"/", "/about"}
    assert all(s["facts"]["comparison"] is None for s in shots)  # nothing approved yet

    gallery = TestClient(client.app)  # a browser-like client: cookies, no bearer token
    # (no `with`: its lifespan would start and close a second controller on the same app)
    login = gallery.post(
        "/gallery/login",
        data={
            "token": issue_token(settings, Role.reviewer),
            "next": f"/gallery/runs/{run['id']}",
        },
        follow_redirects=True,
    )
    assert login.status_code == 200
    page = login.text
    for section in ("timeline", "plan", "diff", "tests", "logs", "screenshots"):
        assert f'id="{section}"' in page, section
    assert "Built by the" in page  # the implement stage's diff
    assert page.count('class="stage"') == 5
    assert run["machine_id"] in page
    for artifact in artifacts:
        view = gallery.get(f"/gallery/artifacts/{artifact['id']}")
        assert view.status_code == 200, (artifact["name"], view.text[:300])
    thumb = gallery.get(f"/gallery/artifacts/{shots[0]['id']}/thumb")
    assert thumb.headers["content-type"] == "image/png"

    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    approved = gallery.post(
        f"/gallery/runs/{run['id']}/verdict",
        data={"decision": "approve", "comment": "page reads right", "csrf": csrf.group(1)},
    )
    assert approved.status_code == 200
    assert "closed" in approved.text
    shown = client.get(f"{API}/runs/{run['id']}").json()
    assert (shown["verdict"], shown["closed"]) == ("approved", True)

    second = run_through(client, sample_repo, "Same change again")
    again = client.get(f"{API}/runs/{second['id']}/artifacts").json()["data"]
    compared = [a["facts"]["comparison"] for a in again if a["kind"] == "screenshot"]
    assert compared
    assert all(c and c["baseline_run_id"] == run["id"] for c in compared)
