"""The gallery in a real Chromium with JavaScript switched off: what a reviewer does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlmodel import select

from controller.api.app import create_app
from controller.services import auth
from controller.settings import Settings
from controller.store.db import make_engine, unit_of_work
from controller.store.models import ApiToken, Role
from tests.integration.gallery_seed import FAILURE, seed
from tests.integration.gallery_server import CHROMIUM, CHROMIUM_ARGS, serve

pytestmark = pytest.mark.browser


@dataclass
class Gallery:
    url: str
    reviewer: str
    ops: str
    agent: str
    runs: dict[str, str]
    shots: Path


def make_token(settings: Settings, role: Role, name: str) -> tuple[str, str]:
    engine = make_engine(settings.sqlalchemy_url)
    with unit_of_work(engine) as tx:
        token = auth.create_token(tx=tx, role=role, name=name)
    with unit_of_work(engine) as tx:
        record = tx.exec(select(ApiToken).where(ApiToken.name == name)).one()
    engine.dispose()
    return token, record.id


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gallery]:
    root = tmp_path_factory.mktemp("gallery")
    settings = Settings(data_dir=root / "data")
    with serve(create_app(settings, background=False)) as url:
        reviewer, reviewer_id = make_token(settings, Role.reviewer, "qa-ann")
        ops, _ = make_token(settings, Role.ops, "ops-bob")
        agent, _ = make_token(settings, Role.agent, "agent-x")
        runs = seed(settings, reviewer_id)
        yield Gallery(url, reviewer, ops, agent, runs, root / "shots")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(java_script_enabled=False)  # the gallery must not need it
    tab = context.new_page()
    yield tab
    context.close()


def sign_in(page: Page, gallery: Gallery, token: str, target: str = "/gallery/runs") -> None:
    page.goto(gallery.url + target)
    expect(page).to_have_url(f"{gallery.url}/gallery/login?next={target.replace('/', '%2F')}")
    page.fill("#token", token)
    page.click("button[type=submit]")


def test_reviewer_filters_opens_run_sees_failure_and_approves(page: Page, gallery: Gallery) -> None:
    sign_in(page, gallery, gallery.reviewer)
    expect(page).to_have_url(gallery.url + "/gallery/runs")
    rows = page.locator("tr.run-row")
    expect(rows).to_have_count(3)
    # newest first: the running run was made last
    expect(rows.first).to_have_attribute("data-run", gallery.runs["going"])

    page.select_option("select[name=status]", "running")
    page.click(".filters button[type=submit]")
    expect(page).to_have_url(gallery.url + "/gallery/runs?status=running&repo=&verdict=")
    expect(rows).to_have_count(1)
    page.goto(gallery.url + "/gallery/runs?verdict=approved")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-run", gallery.runs["base"])
    page.goto(gallery.url + "/gallery/runs?verdict=pending&status=passed")
    expect(rows).to_have_count(1)

    page.click(f"a.permalink:text('{gallery.runs['run']}')")
    expect(page).to_have_url(f"{gallery.url}/gallery/runs/{gallery.runs['run']}")
    expect(page.locator("#timeline tr.stage")).to_have_count(5)
    expect(page.locator("#tests .failures .case-name")).to_have_text("test_app::test_title")
    expect(page.locator("#tests .failure-text")).to_contain_text(FAILURE)
    expect(page.locator("#logs li.fail").first).to_contain_text("FAILED")
    expect(page.locator("#diff .add")).to_contain_text("New title")
    expect(page.locator("#plan pre")).to_contain_text("Change the title")
    expect(page.locator("#screenshots .badge.changed")).to_contain_text("% changed")
    page.screenshot(path=str(gallery.shots / "run.png"), full_page=True)

    page.click("#screenshots a:text('compare')")
    expect(page.locator(".compare figcaption")).to_have_text(["Actual", "Baseline", "Diff"])
    for image in page.locator(".compare img").all():
        assert image.evaluate("img => img.naturalWidth") == 400  # loaded, not broken
    expect(page.locator(".comparison")).to_contain_text("2400 pixels")
    page.click(".compare figure:has(figcaption:text('Diff')) a")
    assert page.url.endswith("/diff")
    page.go_back()
    page.click("a:text('{}')".format(gallery.runs["run"]))

    page.click("button.reject")  # no comment: refused with a message, nothing recorded
    expect(page.locator("#verdict .error")).to_contain_text("needs a comment")
    page.fill("#comment", "New title confirmed on the home page")
    page.click("button.approve")
    expect(page).to_have_url(f"{gallery.url}/gallery/runs/{gallery.runs['run']}#verdict")
    expect(page.locator("#verdict .verdict-state")).to_contain_text("approved")
    expect(page.locator("#verdict .verdict-state .closed")).to_have_text("closed")
    expect(page.locator("#verdict .comment")).to_have_text("New title confirmed on the home page")
    expect(page.locator("button.approve")).to_have_count(0)

    page.goto(gallery.url + "/gallery/runs?verdict=approved")
    expect(rows).to_have_count(2)


def test_log_view_highlights_failures_and_escapes_markup(page: Page, gallery: Gallery) -> None:
    sign_in(page, gallery, gallery.reviewer, f"/gallery/runs/{gallery.runs['run']}")
    page.click("#logs a:text('pytest.log')")
    failing = page.locator("ol.log li.fail")
    expect(failing).to_have_count(2)
    expect(failing.first).to_contain_text("test_title FAILED")
    expect(page.locator("ol.log .fg-green")).to_have_text("PASSED")
    expect(page.locator("ol.log")).to_contain_text("\ufffd\ufffd stray bytes <b>not bold</b>")
    expect(page.locator("ol.log b")).to_have_count(0)


def test_ops_can_browse_but_not_judge_and_agents_cannot_sign_in(
    page: Page, gallery: Gallery
) -> None:
    sign_in(page, gallery, gallery.agent)
    expect(page.locator(".error")).to_contain_text("role reviewer or ops")
    page.fill("#token", gallery.ops)
    page.click("button[type=submit]")
    expect(page.locator("tr.run-row")).to_have_count(3)
    page.goto(f"{gallery.url}/gallery/runs/{gallery.runs['base']}")
    expect(page.locator("#verdict")).to_contain_text("approved")
    page.goto(f"{gallery.url}/gallery/runs/{gallery.runs['going']}")
    expect(page.locator("#verdict")).to_contain_text("still running")
    expect(page.locator("button.approve")).to_have_count(0)


def test_overview_shows_the_flow_figure_and_trend(page: Page, gallery: Gallery) -> None:
    sign_in(page, gallery, gallery.reviewer, "/gallery/overview")
    expect(page.locator("#flow .figure")).to_be_visible()
    expect(page.locator("#flow")).to_contain_text("finished runs")
    expect(page.locator("#trend tbody tr")).to_have_count(7)


def test_wrong_token_and_unknown_run(page: Page, gallery: Gallery) -> None:
    sign_in(page, gallery, "sf_reviewer_not-a-real-token")
    expect(page.locator(".error")).to_contain_text("unknown or revoked token")
    page.fill("#token", gallery.reviewer)
    page.click("button[type=submit]")
    response = page.goto(f"{gallery.url}/gallery/runs/r-doesnotexist")
    assert response is not None
    assert response.status == 404
    expect(page.locator(".error")).to_contain_text("does not exist")
