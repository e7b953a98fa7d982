"""A local HTTP endpoint for webhook tests: answers by path, records what reached it.

``/ok`` 200, ``/fail`` 500, ``/slow`` sleeps 30 s before answering, ``/redirect`` 302 to
``/ok`` (which a client must not follow).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_S = 30.0


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class HookServer:
    url: str
    hits: list[Hit] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]


@contextmanager
def hook_server() -> Iterator[HookServer]:
    server_state = HookServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            server_state.hits.append(
                Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
            )
            if self.path == "/slow":
                time.sleep(SLOW_S)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"{server_state.url}/ok")
            elif self.path == "/fail":
                self.send_response(500)
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    server_state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
