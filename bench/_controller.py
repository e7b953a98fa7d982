"""A real controller for benchmarks: `shopfloor serve` on a free port with a temporary data dir."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import httpx

from controller.errors import EngineError
from controller.providers.disks import unmount_under
from controller.providers.docker import DockerProvider

ROOT = Path(__file__).resolve().parent.parent
SHOPFLOOR = str(ROOT / ".venv" / "bin" / "shopfloor")
BENCH_LABEL = "shopfloor.bench"
BENCH_RUN = secrets.token_hex(4)
"""This run's label value: cleanup never touches another bench running beside it."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token(env: dict[str, str], role: str) -> str:
    out = subprocess.run(
        [SHOPFLOOR, "token", "create", "--role", role],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[-1]


class KeepAlive:
    """A lean HTTP/1.1 keep-alive client: one socket, each request written with one send,
    each answer read by its Content-Length.

    Benchmarks time the controller, and on these 2-core hosts the client shares the cores
    with it: httpx adds about 1 ms of its own Python per request, and the standard
    library's http.client ~0.3 ms (a file object and the email package's header parser per
    answer), which at 10 agents back to back was a quarter of all the CPU a lease+release
    cycle took. So the figures are taken with this client, and httpx is timed beside it.
    """

    def __init__(self, client: httpx.Client) -> None:
        host, port = client.base_url.host, client.base_url.port
        self.address = (host, port or 80)
        self.headers = {
            "Authorization": client.headers["authorization"],
            "Content-Type": "application/json",
        }
        self._host = f"Host: {host}:{port}\r\n" if port else f"Host: {host}\r\n"
        # Agents hold their connection; connecting is not part of a timed request. (Fifty
        # agents connecting at once while others hammer the loop wait seconds to be served:
        # seen with uvicorn here, left as a note.)
        self._connect()

    def call(self, method: str, path: str, body: object | None = None) -> Any:
        payload = b"" if body is None else json.dumps(body).encode()
        fields = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
        request = (
            f"{method} {path} HTTP/1.1\r\n{self._host}{fields}"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        try:
            self.sock.sendall(request)
            status, data = self._answer()
        except _Closed:  # the server closed an idle connection before answering: again
            self._connect()
            self.sock.sendall(request)
            status, data = self._answer()
        if status >= 400:
            raise RuntimeError(f"{method} {path} -> {status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def close(self) -> None:
        self.sock.close()

    def _connect(self) -> None:
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._unread = b""

    def _answer(self) -> tuple[int, bytes]:
        """The status and body of the next answer; the connection is closed after it when
        the server says so."""
        while (head_end := self._unread.find(b"\r\n\r\n")) < 0:
            self._receive(started=bool(self._unread))
        head, rest = self._unread[:head_end], self._unread[head_end + 4 :]
        status_line, *header_lines = head.split(b"\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" not in headers:
            raise RuntimeError(f"an answer without Content-Length: {head[:300]!r}")
        length = int(headers[b"content-length"])
        self._unread = rest
        while len(self._unread) < length:
            self._receive(started=True)
        data, self._unread = self._unread[:length], self._unread[length:]
        if headers.get(b"connection", b"").lower() == b"close":
            self.sock.close()
            self._connect()
        return int(status_line.split(b" ", 2)[1]), data

    def _receive(self, *, started: bool) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if started:
                raise RuntimeError("the server closed the connection in the middle of an answer")
            raise _Closed
        self._unread += chunk


class _Closed(Exception):
    """The server closed the connection before it began to answer."""


def bare_run(engine: docker.DockerClient, image: str) -> float:
    """Seconds for a raw ``docker run`` of ``image`` (labelled, no network, an init), the
    container removed after: what provisioning is compared with."""
    started = time.perf_counter()
    container = engine.containers.run(
        image, detach=True, labels={BENCH_LABEL: BENCH_RUN}, network_mode="none", init=True
    )
    elapsed = time.perf_counter() - started
    container.remove(force=True)
    return elapsed


@contextmanager
def running_controller(
    data_dir: Path,
    role: str = "ops",
    extra_env: dict[str, str] | None = None,
    serve: list[str] | None = None,
    database_url: str | None = None,
) -> Iterator[tuple[httpx.Client, str]]:
    """Yields an API client with a token of ``role`` and the runner image tag; ``extra_env``
    adds settings, ``serve`` replaces the ``shopfloor`` program that serves,
    ``database_url`` names a PostgreSQL database instead of SQLite in the data dir (see
    :func:`another_controller` for a second controller on it)."""
    image = subprocess.run(
        [SHOPFLOOR, "image", "build"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **_HERE},
    ).stdout.split()[-1]
    env = _env(data_dir, image, database_url, extra_env)
    server, url = _serve(env, serve)
    try:
        headers = {"Authorization": f"Bearer {token(env, role)}"}
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            yield client, image
    finally:
        _stop(server)
        _remove_leftovers()
        unmount_under(data_dir)


@contextmanager
def another_controller(
    client: httpx.Client, data_dir: Path, image: str, database_url: str
) -> Iterator[httpx.Client]:
    """A second ``shopfloor serve`` on the same PostgreSQL database (a data dir of its own,
    as every controller has): yields a client like ``client``, with its token, for it."""
    server, url = _serve(_env(data_dir, image, database_url))
    try:
        with httpx.Client(base_url=url, headers=client.headers, timeout=600) as other:
            yield other
    finally:
        _stop(server)
        unmount_under(data_dir)


_HERE = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
"""The controller is this checkout's code (a worktree's bench must not serve the code the
virtualenv was installed from)."""


def _env(
    data_dir: Path, image: str, database_url: str | None, extra_env: dict[str, str] | None = None
) -> dict[str, str]:
    env = {
        **os.environ,
        **_HERE,
        "SHOPFLOOR_DATA_DIR": str(data_dir),
        "SHOPFLOOR_EXTRA_LABELS": f"{BENCH_LABEL}={BENCH_RUN}",
        "SHOPFLOOR_RUNNER_IMAGE": image,
        # One token stands for every agent here (50 at once, back to back): its bucket
        # still runs on every request (its cost is in the figures) but never refuses.
        "SHOPFLOOR_TOKEN_RATE_PER_S": "1000000",
        "SHOPFLOOR_TOKEN_RATE_BURST": "1000000",
        **(extra_env or {}),
    }
    if database_url:
        env["SHOPFLOOR_DATABASE_URL"] = database_url
    return env


def _serve(
    env: dict[str, str], serve: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(
        [*(serve or [SHOPFLOOR]), "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
            return server, url
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                _stop(server)
                raise SystemExit("controller did not start") from None
            time.sleep(0.2)


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(timeout=30)


def _remove_leftovers() -> None:
    """Remove what this run made; the stopping controller may be removing some of it too."""
    engine = DockerProvider(None)
    try:
        engine.remove_labelled({BENCH_LABEL: BENCH_RUN})
    except EngineError as exc:  # the figures are taken: say what is left, do not fail them
        print(f"bench cleanup: {exc.message}", file=sys.stderr)
    finally:
        engine.close()
