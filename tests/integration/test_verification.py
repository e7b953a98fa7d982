"""Verification criteria, owners' queues, webhooks' API and where the flow gets stuck,
over HTTP on seeded runs (issue 13; no machine needed)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.services import owners
from controller.settings import Settings
from controller.store.db import make_engine, unit_of_work
from controller.store.models import Role, Run
from tests.integration.gallery_seed import seed
from tests.integration.test_gallery_browser import make_token

API = "/api/v1"
POLICY = {
    "verify": {
        "required_stages": None,
        "approvals": 1,
        "max_changed_pixels": 0.01,
        "console_errors": "fail",
        "flaky": "fail",
    },
    "owners": {"test": "qa-team", "review": "rev-team"},
}


@dataclass
class Site:
    client: TestClient
    tokens: dict[str, str]
    runs: dict[str, str]

    def as_role(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def browser(self, role: str) -> TestClient:
        browser = TestClient(self.client.app, follow_redirects=False)
        assert browser.post("/gallery/login", data={"token": self.tokens[role]}).status_code == 303
        return browser


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    settings = Settings(data_dir=Path(tmp_path_factory.mktemp("verify")) / "data")
    with TestClient(create_app(settings, background=False)) as client:
        tokens: dict[str, str] = {}
        reviewer_id = ""
        for role in Role:
            tokens[role.value], token_id = make_token(settings, role, f"{role.value}-user")
            reviewer_id = token_id if role is Role.reviewer else reviewer_id
        runs = seed(settings, reviewer_id)
        engine = make_engine(settings.sqlalchemy_url)
        with unit_of_work(engine) as tx:
            run = tx.get(Run, runs["run"])
            assert run is not None
            run.policy = POLICY
            tx.add(run)
        engine.dispose()
        ctl = client.app.state.controller  # type: ignore[attr-defined]
        owners.notify(
            ctl=ctl,
            owner="rev-team",
            kind="verdict_waiting",
            subject=runs["run"],
            data={"status": "passed", "task": "Change the title"},
            run_id=runs["run"],
        )
        yield Site(client, tokens, runs)


def checklist_of(site: Site, run_id: str) -> dict[str, dict[str, Any]]:
    answer = site.client.get(f"{API}/runs/{run_id}", headers=site.as_role("ops"))
    assert answer.status_code == 200, answer.text
    return {c["criterion"]: c for c in answer.json()["checklist"]}


def test_run_answers_its_checklist_from_its_policy(site: Site) -> None:
    items = checklist_of(site, site.runs["run"])
    assert list(items) == [
        "required stages passed",
        "approvals",
        "changed pixels",
        "console errors",
        "flaky tests",
    ]
    assert items["required stages passed"]["met"] is True
    assert items["approvals"] == {
        "criterion": "approvals",
        "met": False,
        "detail": "0 of 1 approval(s)",
    }
    assert items["changed pixels"]["met"] is False  # 2 % changed against a 1 % limit
    assert "over 1.00%: /" in items["changed pixels"]["detail"]
    assert items["console errors"]["met"] is True
    assert items["flaky tests"]["met"] is None
    listed = site.client.get(f"{API}/runs", headers=site.as_role("ops")).json()["data"]
    by_id = {r["id"]: r for r in listed}
    assert by_id[site.runs["run"]]["checklist"][2]["met"] is False
    assert by_id[site.runs["base"]]["closed"] is True  # defaults: approved, stages passed


def test_gallery_shows_the_checklist_first_and_the_open_criteria_on_the_form(site: Site) -> None:
    page = site.browser("reviewer").get(f"/gallery/runs/{site.runs['run']}")
    assert page.status_code == 200
    html = page.text
    assert html.index('id="checklist"') < html.index('id="verdict"') < html.index('id="timeline"')
    form = html[html.index('class="verdict-form"') :]
    form = form[: form.index("</form>")]
    assert "Still open" in form
    assert re.search(r"<strong>changed pixels</strong>: largest change 2\.00%", form)
    assert "<strong>approvals</strong>" in form
    assert "console errors</strong>:" not in form  # met
    assert 'href="/gallery/owners/qa-team"' in html
    assert 'href="/gallery/owners/rev-team"' in html


def test_approval_alone_does_not_close_a_run_with_open_criteria(site: Site) -> None:
    answer = site.client.post(
        f"{API}/runs/{site.runs['run']}/verdict",
        json={"decision": "approve", "comment": "looks right"},
        headers=site.as_role("reviewer"),
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["closed"] is False
    assert [c["criterion"] for c in answer.json()["open"]] == ["changed pixels"]
    items = checklist_of(site, site.runs["run"])
    assert items["approvals"]["met"] is True
    assert items["changed pixels"]["met"] is False
    queue = site.client.get(f"{API}/owners/rev-team/queue", headers=site.as_role("agent")).json()
    assert queue["count"] == 1
    (item,) = queue["data"]
    assert (item["kind"], item["run"], item["state"]) == (
        "verdict_waiting",
        site.runs["run"],
        "done",
    )
    assert item["since"]


def test_owner_queue_api_and_gallery_page(site: Site) -> None:
    ctl = site.client.app.state.controller  # type: ignore[attr-defined]
    owners.notify(
        ctl=ctl,
        owner="qa-team",
        kind="stage_failed",
        subject="s-seeded",
        data={"summary": "2 tests failed"},
        run_id=site.runs["run"],
        stage="test",
    )
    ops = site.as_role("ops")
    found = site.client.get(f"{API}/owners/qa-team/queue?state=open", headers=ops).json()
    assert found["count"] == 1
    (item,) = found["data"]
    assert {k: item[k] for k in ("kind", "subject", "run", "stage", "state")} == {
        "kind": "stage_failed",
        "subject": "s-seeded",
        "run": site.runs["run"],
        "stage": "test",
        "state": "open",
    }
    page = site.browser("reviewer").get("/gallery/owners/qa-team")
    assert page.status_code == 200
    assert "2 tests failed" in page.text
    assert f'href="/gallery/runs/{site.runs["run"]}"' in page.text
    done = site.client.post(f"{API}/owners/qa-team/queue/{item['id']}/done", headers=ops)
    assert done.json()["state"] == "done"
    assert site.client.get(f"{API}/owners/bad%20owner/queue", headers=ops).status_code == 422
    assert site.browser("reviewer").get("/gallery/owners/bad%20owner").status_code == 404


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/hook"])
def test_webhook_with_a_non_http_url_is_422(site: Site, url: str) -> None:
    answer = site.client.put(
        f"{API}/webhooks/bad",
        json={"url": url, "events": ["*"], "secret": "0123456789abcdef"},
        headers=site.as_role("ops"),
    )
    assert answer.status_code == 422, answer.text
    assert "http" in answer.json()["detail"]


def test_webhooks_api_never_shows_the_secret_and_is_ops_only(site: Site) -> None:
    ops = site.as_role("ops")
    secret = "do-not-echo-this-secret"
    body = {"url": "https://hooks.example/x", "events": ["stage_failed"], "secret": secret}
    assert (
        site.client.put(
            f"{API}/webhooks/team", json=body, headers=site.as_role("agent")
        ).status_code
        == 403
    )
    put = site.client.put(f"{API}/webhooks/team", json=body, headers=ops)
    assert put.status_code == 200, put.text
    listed = site.client.get(f"{API}/webhooks", headers=ops)
    assert listed.json()["data"][0]["has_secret"] is True
    for answer in (put, listed, site.client.get(f"{API}/events?limit=1000", headers=ops)):
        assert secret not in answer.text
    assert site.client.get(f"{API}/webhooks/team/deliveries", headers=ops).json()["count"] == 0
    assert site.client.delete(f"{API}/webhooks/team", headers=ops).status_code == 204
    assert site.client.get(f"{API}/webhooks/team/deliveries", headers=ops).status_code == 404


def test_flow_metrics_and_overview_show_where_runs_wait(site: Site) -> None:
    flow = site.client.get(f"{API}/flow", headers=site.as_role("ops")).json()
    waits = flow["waits"]
    assert waits["queued_to_first_stage_ms"]["count"] >= 2
    assert set(flow["owners"]) >= {"rev-team"}
    assert flow["learning"] == {"signatures": [], "flaky_tests": [], "quarantined_machines": []}
    metrics = site.client.get("/metrics").text
    assert 'shopfloor_flow_wait_ms{quantile="p50",wait="queued_to_first_stage"}' in metrics
    assert 'shopfloor_owner_open_items{owner="rev-team"}' in metrics
    assert "shopfloor_quarantined_machines 0.0" in metrics
    page = site.browser("reviewer").get("/gallery/overview")
    assert page.status_code == 200
    assert "<script" not in page.text
    assert "<title>Overview · Shopfloor gallery</title>" in page.text
    for chart in ("chart-run-waits", "chart-stage-waits", "chart-owner-waits"):
        assert page.text.count(f'id="{chart}"') == 1
    assert page.text.count("<svg") >= 2
    assert 'data-label="queued → first stage"' in page.text
