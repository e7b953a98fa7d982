"""Round trip of `true`: session vs one-shot exec (both through the HTTP API) vs docker exec.

All hit the same machine in one run, so the ratios compare like with like:

    .venv/bin/python bench/exec.py [--n 300]

Goals (issue 4): session p50 <= 2 ms through the HTTP API, and >= 25x faster than
`docker exec`. The controller runs in its own process under uvicorn on a loopback port;
the client is httpx with keep-alive, as a remote agent would use it. ``GET /healthz`` is
printed as the floor any authenticated route stands on, on this host, right now.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from controller import auth, images
from controller.db import make_engine, session_scope
from controller.models import Role
from controller.providers.docker import DockerProvider
from controller.settings import Settings
from controller.transport import sessions
from controller.transport.ssh import SshPool

SESSION_P50_GOAL_MS = 2.0
SPEEDUP_GOAL = 25.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(n: int, call: Callable[[], None], warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="round trips per path")
    args = parser.parse_args()

    provider = DockerProvider()
    data_dir = Path(tempfile.mkdtemp(prefix="shopfloor-bench-"))
    settings = Settings(
        data_dir=data_dir,
        extra_labels=f"shopfloor.bench={secrets.token_hex(4)}",
        runner_image=images.ensure_runner_image(provider),
    )
    port = free_port()
    env = {
        **os.environ,
        "SHOPFLOOR_DATA_DIR": str(settings.data_dir),
        "SHOPFLOOR_EXTRA_LABELS": settings.extra_labels,
        "SHOPFLOOR_RUNNER_IMAGE": settings.runner_image or "",
    }
    # The controller in its own process, as in production: the client does not share its GIL.
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "controller.app:create_app",
            "--factory",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    deadline = time.monotonic() + 60
    while not _answers(port):
        if server.poll() is not None or time.monotonic() > deadline:
            sys.stderr.write("the controller did not start\n")
            return 1
        time.sleep(0.1)
    engine = make_engine(settings.sqlalchemy_url)
    with session_scope(engine) as db:
        token = auth.create_token(session=db, role=Role.ops)
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )
    machine = http.post("/machines?wait=true", json={}).json()
    mid = machine["id"]
    try:
        if machine["state"] != "ready":
            sys.stderr.write(f"machine did not become ready: {machine}\n")
            return 1
        container = f"shopfloor-{mid}"
        sid = http.post(f"/machines/{mid}/sessions").json()["id"]

        def session_true() -> None:
            answer = http.post(f"/machines/{mid}/sessions/{sid}/run", json={"cmd": "true"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["exit_code"] == 0, answer.text

        def exec_true() -> None:
            answer = http.post(f"/machines/{mid}/exec", json={"cmd": "true"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["exit_code"] == 0, answer.text

        def docker_exec_sdk() -> None:
            handle = provider.exec(container, ["true"])
            for _ in handle:
                pass
            assert handle.exit_code() == 0

        def docker_exec_cli() -> None:
            subprocess.run(["docker", "exec", container, "true"], check=True)

        pool = SshPool(provider, settings.data_dir)
        raw = sessions.open_session(
            transport=pool.transport(container),
            session_id="bench",
            machine_id=mid,
            container=container,
            fence=0,
            workdir="/workspace",
            output_cap=1 << 20,
        )

        def session_direct() -> None:
            assert raw.run("true", 60).exit_code == 0

        def http_floor() -> None:
            assert http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200

        slow_n = max(20, args.n // 5)
        rows = [
            ("session via HTTP", measure(args.n, session_true)),
            ("one-shot exec via HTTP", measure(slow_n, exec_true)),
            ("docker exec (engine API)", measure(slow_n, docker_exec_sdk)),
            ("docker exec (CLI)", measure(slow_n, docker_exec_cli)),
            ("HTTP floor: GET /healthz", measure(args.n, http_floor)),
            ("session, no HTTP (transport)", measure(args.n, session_direct)),
        ]
        pool.close()
    finally:
        http.delete(f"/machines/{mid}")
        server.terminate()
        server.wait(timeout=30)

    docker_p50 = statistics.median(rows[2][1])
    print(f"round trip of `true` on machine {mid} (ms)")  # noqa: T201
    print(f"{'path':<30}{'n':>6}{'p50':>10}{'p99':>10}{'x faster than docker exec':>28}")  # noqa: T201
    for name, samples in rows:
        p50 = statistics.median(samples)
        print(  # noqa: T201
            f"{name:<30}{len(samples):>6}{p50:>10.2f}{percentile(samples, 0.99):>10.2f}"
            f"{docker_p50 / p50:>28.1f}"
        )
    session_p50 = statistics.median(rows[0][1])
    speedup = docker_p50 / session_p50
    p50_ok = "met" if session_p50 <= SESSION_P50_GOAL_MS else "MISSED"
    ratio_ok = "met" if speedup >= SPEEDUP_GOAL else "MISSED"
    print(  # noqa: T201
        f"goal: session p50 <= {SESSION_P50_GOAL_MS} ms -> {session_p50:.2f} ms ({p50_ok}); "
        f">= {SPEEDUP_GOAL:g}x faster than docker exec -> {speedup:.1f}x ({ratio_ok})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
