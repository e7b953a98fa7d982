"""Screenshots of pages with Playwright and Debian's Chromium (no browser download).

Each page gets its own record: the HTTP status, console errors, failed requests, and a
screenshot when anything rendered. A page that answers 5xx or never loads is a failed
record with its reason, never an exception: QA reports what it saw.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class PageShot:
    page: str
    url: str
    ok: bool
    status: int | None = None
    reason: str | None = None
    png: bytes | None = None
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    title: str = ""

    def meta(self) -> dict[str, object]:
        return {
            "page": self.page,
            "url": self.url,
            "ok": self.ok,
            "status": self.status,
            "reason": self.reason,
            "title": self.title,
            "console_errors": self.console_errors,
            "failed_requests": self.failed_requests,
        }


def chromium_path() -> str:
    """``SHOPFLOOR_CHROMIUM`` or the Debian package's binary."""
    found = os.environ.get("SHOPFLOOR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return found


def capture_pages(
    base_url: str,
    pages: list[str],
    *,
    timeout_s: float = 20.0,
    viewport: tuple[int, int] = (1280, 800),
) -> list[PageShot]:
    """One browser for all pages; a fresh page (tab) per path."""
    from playwright.sync_api import sync_playwright

    shots: list[PageShot] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            for path in pages:
                shots.append(_capture(context, base_url.rstrip("/") + path, path, timeout_s))
            context.close()
        finally:
            browser.close()
    return shots


def _capture(context: object, url: str, path: str, timeout_s: float) -> PageShot:
    from playwright.sync_api import BrowserContext, ConsoleMessage, Error, Request, Response

    assert isinstance(context, BrowserContext)
    shot = PageShot(page=path, url=url, ok=False)
    page = context.new_page()

    def console(msg: ConsoleMessage) -> None:
        if msg.type == "error" and not _favicon(str(msg.location.get("url", ""))):
            shot.console_errors.append(msg.text)

    def request_failed(request: Request) -> None:
        if not _favicon(request.url):
            shot.failed_requests.append(f"{request.method} {request.url}: {request.failure}")

    def bad_status(response: Response) -> None:
        if response.status >= 400 and not _favicon(response.url):
            shot.failed_requests.append(
                f"{response.request.method} {response.url}: {response.status}"
            )

    page.on("console", console)
    page.on("pageerror", lambda exc: shot.console_errors.append(f"uncaught: {exc}"))
    page.on("requestfailed", request_failed)

    page.on("response", bad_status)
    try:
        response = page.goto(url, wait_until="load", timeout=timeout_s * 1000)
        shot.status = response.status if response is not None else None
        shot.title = page.title()
        if shot.status is not None and shot.status >= 400:
            shot.reason = f"HTTP {shot.status}"
        else:
            shot.ok = True
    except Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shot.reason = (
            f"did not load within {timeout_s:g}s"
            if "Timeout" in first
            else f"did not load: {first}"
        )
    if shot.status is not None:  # a page that never answered has nothing to show
        try:
            shot.png = page.screenshot(full_page=True, timeout=10_000)
        except Error:
            shot.png = None
    page.close()
    return shot


def _favicon(url: str) -> bool:
    """Browsers ask for /favicon.ico on their own; its absence is not the page's fault."""
    return url.split("?", 1)[0].endswith("/favicon.ico")
