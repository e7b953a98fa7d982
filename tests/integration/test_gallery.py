"""Gallery over plain HTTP: sign-in, cookie sign-in, CSRF, redirects and safe headers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from controller.api.app import create_app
from controller.settings import Settings
from controller.store.db import make_engine, unit_of_work
from controller.store.models import ApiToken, Role, Verdict
from tests.integration.gallery_seed import seed
from tests.integration.test_gallery_browser import make_token


@dataclass
class Site:
    settings: Settings
    app_client: TestClient
    tokens: dict[str, str]
    runs: dict[str, str]

    def browser(self, role: str | None = None) -> TestClient:
        """A fresh cookie jar, signed in as ``role`` when given."""
        client = TestClient(self.app_client.app, follow_redirects=False)
        if role is not None:
            answer = client.post("/gallery/login", data={"token": self.tokens[role]})
            assert answer.status_code == 303, answer.text
        return client


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    settings = Settings(data_dir=Path(tmp_path_factory.mktemp("gallery-http")) / "data")
    with TestClient(create_app(settings, background=False)) as client:
        tokens: dict[str, str] = {}
        reviewer_id = ""
        for role in Role:
            tokens[role.value], token_id = make_token(settings, role, f"{role.value}-user")
            reviewer_id = token_id if role is Role.reviewer else reviewer_id
        tokens["spare"], _ = make_token(settings, Role.reviewer, "spare-reviewer")
        yield Site(settings, client, tokens, seed(settings, reviewer_id))


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def test_pages_need_sign_in_and_come_back_after(site: Site) -> None:
    anonymous = site.browser()
    target = f"/gallery/runs/{site.runs['run']}"
    answer = anonymous.get(target)
    assert answer.status_code == 303
    assert (
        answer.headers["location"] == f"/gallery/login?next=%2Fgallery%2Fruns%2F{site.runs['run']}"
    )
    signed = anonymous.post(
        "/gallery/login", data={"token": site.tokens["reviewer"], "next": target}
    )
    assert signed.headers["location"] == target
    cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert anonymous.get(target).status_code == 200
    assert anonymous.get(f"/gallery/artifacts/{site.runs['run']}/raw").status_code == 404


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/x", "/api/v1/machines", "/gallery\\@evil"]
)
def test_sign_in_never_redirects_off_the_gallery(site: Site, target: str) -> None:
    answer = site.browser().post(
        "/gallery/login", data={"token": site.tokens["reviewer"], "next": target}
    )
    assert answer.headers["location"] == "/gallery/runs"


def test_tampered_cookie_and_revoked_token_end_the_session(site: Site) -> None:
    client = site.browser("reviewer")
    value = client.cookies.get("shopfloor_gallery")
    assert value
    client.cookies.set("shopfloor_gallery", value[:-3] + "abc", path="/gallery")
    assert client.get("/gallery/runs").status_code == 303

    spare = site.browser("spare")
    assert spare.get("/gallery/runs").status_code == 200
    engine = make_engine(site.settings.sqlalchemy_url)
    with unit_of_work(engine) as tx:
        tx.delete(tx.exec(select(ApiToken).where(ApiToken.name == "spare-reviewer")).one())
    engine.dispose()
    assert spare.get("/gallery/runs").status_code == 303


def test_verdict_form_checks_csrf_and_role(site: Site) -> None:
    run_path = f"/gallery/runs/{site.runs['run']}"
    reviewer = site.browser("reviewer")
    forged = reviewer.post(f"{run_path}/verdict", data={"decision": "approve", "csrf": "guess"})
    assert forged.status_code == 401
    assert "form expired" in forged.text

    ops = site.browser("ops")
    page = ops.get(run_path).text
    assert "button" not in page.split('id="verdict"')[1].split("</section>")[0]
    ops_csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert ops_csrf is None  # no form for ops
    agent_login = site.browser().post("/gallery/login", data={"token": site.tokens["agent"]})
    assert agent_login.status_code == 403
    engine = make_engine(site.settings.sqlalchemy_url)
    with unit_of_work(engine) as tx:
        assert tx.exec(select(Verdict).where(Verdict.run_id == site.runs["run"])).first() is None
    engine.dispose()


def test_running_run_cannot_be_judged_from_the_gallery(site: Site) -> None:
    reviewer = site.browser("reviewer")
    going = f"/gallery/runs/{site.runs['going']}"
    csrf = csrf_of(reviewer.get(f"/gallery/runs/{site.runs['run']}").text)
    answer = reviewer.post(f"{going}/verdict", data={"decision": "approve", "csrf": csrf})
    assert answer.status_code == 409
    assert "still running" in answer.text


def test_pages_and_blobs_carry_safe_headers(site: Site) -> None:
    reviewer = site.browser("reviewer")
    page = reviewer.get(f"/gallery/runs/{site.runs['run']}")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    ids = re.findall(r"/gallery/artifacts/(a-[0-9a-f]+)/thumb", page.text)
    assert ids
    thumb = reviewer.get(f"/gallery/artifacts/{ids[0]}/thumb")
    assert thumb.headers["content-type"] == "image/png"
    assert thumb.headers["x-content-type-options"] == "nosniff"
    assert reviewer.get(f"/gallery/artifacts/{ids[0]}/secret").status_code == 404
    log_id = re.search(r'/gallery/artifacts/(a-[0-9a-f]+)">pytest.log', page.text)
    assert log_id is not None
    assert reviewer.get(f"/gallery/artifacts/{log_id.group(1)}/thumb").status_code == 404
    raw = reviewer.get(f"/gallery/artifacts/{log_id.group(1)}/raw")
    assert raw.headers["content-disposition"].startswith("attachment;")
    css = reviewer.get("/gallery/static/gallery.css")
    assert css.status_code == 200
    assert "text/css" in css.headers["content-type"]


def test_filters_in_the_url_ignore_unknown_values(site: Site) -> None:
    reviewer = site.browser("reviewer")
    everything = reviewer.get("/gallery/runs?status=bogus&verdict=<script>")
    assert everything.status_code == 200
    assert everything.text.count('class="run-row"') == 3
    assert "<script>" not in everything.text
    assert reviewer.get("/gallery/runs?page=0").status_code == 422
