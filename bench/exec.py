"""Round trip of `true`: session vs one-shot exec (both through the HTTP API) vs docker exec.

All hit the same machine in one run, so the ratios compare like with like:

    .venv/bin/python bench/exec.py [--n 300]

Goals (issue 4): session p50 <= 2 ms through the HTTP API, and >= 25x faster than
`docker exec`. The controller runs in its own process (`shopfloor serve`) on a loopback
port. The client holds a keep-alive HTTP/1.1 connection (``_controller.KeepAlive``); the
same session is also timed through httpx, which adds its own Python per request. ``GET
/healthz`` is printed as the floor any route stands on, on this host, right now.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _controller import KeepAlive, running_controller  # noqa: E402

from controller.providers.docker import DockerProvider  # noqa: E402
from controller.transport import sessions  # noqa: E402
from controller.transport.ssh import SshPool  # noqa: E402

SESSION_P50_GOAL_MS = 2.0
ROUNDS = 10
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


def interleaved(
    paths: list[tuple[str, Callable[[], object], int]], n: int, rounds: int
) -> list[tuple[str, list[float]]]:
    """Time every path in each of ``rounds`` short turns, so that all of them sample the
    same moments: this host's speed drifts by 2x within seconds, and a path timed only at
    the start or only at the end would compare against another machine. ``every`` k: a
    slow path is timed on one call in k of the fast paths' count."""
    samples: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    for _ in range(rounds):
        for name, call, every in paths:
            samples[name] += measure(max(1, n // rounds // every), call, warmup=2)
    return list(samples.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="round trips per path")
    args = parser.parse_args()

    provider = DockerProvider()
    tmp = tempfile.TemporaryDirectory(prefix="shopfloor-bench-")
    data_dir = Path(tmp.name) / "data"
    with tmp, running_controller(data_dir) as (http, _image):
        machine = http.post("/api/v1/machines?wait=true", json={}, timeout=300).json()
        if machine["state"] != "ready":
            sys.stderr.write(f"machine did not become ready: {machine}\n")
            return 1
        mid = machine["id"]
        container = f"shopfloor-{mid}"
        sid = http.post(f"/api/v1/machines/{mid}/sessions").json()["id"]
        lean = KeepAlive(http)

        def session_true() -> None:
            answer = lean.call(
                "POST", f"/api/v1/machines/{mid}/sessions/{sid}/run", {"cmd": "true"}
            )
            assert answer["exit_code"] == 0, answer

        def session_true_httpx() -> None:
            answer = http.post(f"/api/v1/machines/{mid}/sessions/{sid}/run", json={"cmd": "true"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["exit_code"] == 0, answer.text

        def exec_true() -> None:
            answer = lean.call("POST", f"/api/v1/machines/{mid}/exec", {"cmd": "true"})
            assert answer["exit_code"] == 0, answer

        def docker_exec_sdk() -> None:
            handle = provider.exec(container, ["true"])
            for _ in handle:
                pass
            assert handle.exit_code() == 0

        def docker_exec_cli() -> None:
            subprocess.run(["docker", "exec", container, "true"], check=True)

        pool = SshPool(provider, data_dir)
        raw = sessions.open_session(
            transport=pool.transport(container),
            session_id="bench",
            machine_id=mid,
            fence=0,
            workdir="/workspace",
            output_cap=1 << 20,
            state_secret=pool.keys().state_secret,
        )

        loop = asyncio.new_event_loop()  # one loop for every call: starting one costs ~1 ms

        async def session_direct() -> None:
            assert (await raw.run_async("true", 60)).exit_code == 0

        def http_floor() -> None:
            lean.call("GET", "/healthz")

        paths: list[tuple[str, Callable[[], object], int]] = [
            ("session via HTTP", session_true, 1),
            ("session via HTTP (httpx)", session_true_httpx, 1),
            ("one-shot exec via HTTP", exec_true, 5),
            ("docker exec (engine API)", docker_exec_sdk, 5),
            ("docker exec (CLI)", docker_exec_cli, 5),
            ("HTTP floor: GET /healthz", http_floor, 1),
            ("session, no HTTP (transport)", lambda: loop.run_until_complete(session_direct()), 1),
        ]
        rows = interleaved(paths, n=args.n, rounds=ROUNDS)
        loop.close()
        pool.close()
        lean.close()
        http.delete(f"/api/v1/machines/{mid}")

    docker_p50 = statistics.median(rows[3][1])
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
