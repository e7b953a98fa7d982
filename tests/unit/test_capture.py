"""Capture helpers that need no browser (the browser runs in tests/integration/test_qa.py)."""

from __future__ import annotations

from evidence.capture import CHROMIUM_ARGS, PageShot, _favicon, chromium_path


def test_favicon_noise_is_recognised() -> None:
    assert _favicon("http://127.0.0.1:1234/favicon.ico")
    assert _favicon("http://h/favicon.ico?v=2")
    assert not _favicon("http://h/img/favicon.icon")
    assert not _favicon("http://h/")


def test_meta_carries_what_reviewers_need() -> None:
    shot = PageShot(
        page="/",
        url="http://x/",
        ok=False,
        status=500,
        reason="HTTP 500",
        console_errors=["boom"],
        failed_requests=["GET http://x/: 500"],
    )
    meta = shot.meta()
    assert meta["status"] == 500
    assert meta["reason"] == "HTTP 500"
    assert meta["console_errors"] == ["boom"]
    assert "png" not in meta


def test_closed_network_flags_and_browser_override(monkeypatch: object) -> None:
    assert "--disable-background-networking" in CHROMIUM_ARGS
    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setenv("SHOPFLOOR_CHROMIUM", "/opt/chrome")
    assert chromium_path() == "/opt/chrome"
