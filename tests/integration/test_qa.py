"""Real Chromium (Debian's, through Playwright) on pages that work, fail and hang."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from evidence.capture import capture_pages


class Pages(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/hang":
            time.sleep(20)
            return
        body = (
            b"<title>T</title><h1>hello</h1><script>console.error('bad thing')</script>"
            b"<img src='/missing.png'>"
            if self.path == "/noisy"
            else b"<title>T</title><h1>hello</h1>"
        )
        self.send_response(
            500 if self.path == "/boom" else 404 if self.path == "/missing.png" else 200
        )
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        return


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_pages_good_noisy_failing_and_hanging(site: str) -> None:
    shots = {s.page: s for s in capture_pages(site, ["/", "/noisy", "/boom", "/hang"], timeout_s=3)}
    good, noisy, boom, hang = shots["/"], shots["/noisy"], shots["/boom"], shots["/hang"]
    assert good.ok
    assert good.status == 200
    assert good.title == "T"
    assert good.png is not None
    assert good.png.startswith(b"\x89PNG")
    assert good.console_errors == []
    assert good.failed_requests == []
    assert noisy.ok
    assert "bad thing" in noisy.console_errors
    assert any("/missing.png: 404" in r for r in noisy.failed_requests)
    assert not boom.ok
    assert boom.reason == "HTTP 500"
    assert boom.png is not None  # the error page itself is evidence
    assert not hang.ok
    assert hang.reason == "did not load within 3s"
    assert hang.png is None


def test_nothing_listening_is_a_reason_not_a_crash() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    [shot] = capture_pages(f"http://127.0.0.1:{port}", ["/"], timeout_s=5)
    assert not shot.ok
    assert shot.reason is not None
    assert "ERR_CONNECTION_REFUSED" in shot.reason
