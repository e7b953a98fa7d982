"""A real controller for benchmarks: `shopfloor serve` on a free port with a temporary data dir."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import httpx

from controller.providers.disks import unmount_under

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
    """A lean HTTP/1.1 keep-alive client (the standard library's http.client).

    Benchmarks time the controller; httpx adds about 1 ms of its own Python per request on
    these hosts, so the figures are taken with this client and httpx is timed beside it.
    """

    def __init__(self, client: httpx.Client) -> None:
        self.conn = http.client.HTTPConnection(client.base_url.host, client.base_url.port)
        # Agents hold their connection; connecting is not part of a timed request. (Fifty
        # agents connecting at once while others hammer the loop wait seconds to be served:
        # seen with uvicorn here, left as a note.)
        self.conn.connect()
        self.headers = {
            "Authorization": client.headers["authorization"],
            "Content-Type": "application/json",
        }

    def call(self, method: str, path: str, body: object | None = None) -> Any:
        payload = None if body is None else json.dumps(body)
        try:
            self.conn.request(method, path, body=payload, headers=self.headers)
            answer = self.conn.getresponse()
        except http.client.RemoteDisconnected:  # the server closed an idle connection
            self.conn.close()
            self.conn.request(method, path, body=payload, headers=self.headers)
            answer = self.conn.getresponse()
        data = answer.read()
        if answer.status >= 400:
            raise RuntimeError(f"{method} {path} -> {answer.status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def close(self) -> None:
        self.conn.close()


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
    import docker
    import docker.errors

    engine = docker.from_env()
    mine = {"label": f"{BENCH_LABEL}={BENCH_RUN}"}
    for container in engine.containers.list(all=True, filters=mine):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
    for volume in engine.volumes.list(filters=mine):
        with contextlib.suppress(docker.errors.NotFound):
            volume.remove(force=True)
    for image in engine.images.list(filters=mine):  # snapshots' images
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            engine.images.remove(image.id, force=True)
