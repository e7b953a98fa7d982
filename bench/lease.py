"""Lease + release latency from a warm pool through the HTTP API, against the raw engine.

    .venv/bin/python bench/lease.py [--n 400] [--agents 50]

A real controller (`shopfloor serve`, SQLite) keeps a warm pool of machines holding the
sample repo's checkout; agents take a lease and give it back (reset policy ``keep``), over
keep-alive HTTP, once with 1 agent and once with 50 at the same time. In the same run the
raw engine is timed: an inspect round trip and `docker exec true` on one of the machines.

Goals (issue 3): at 1 agent p50 <= 5 ms and p99 <= 25 ms; at 50 agents p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _controller import running_controller  # noqa: E402
from make_repo import make_sample_repo  # noqa: E402

from controller.providers.docker import DockerProvider  # noqa: E402

GOAL_P50_1, GOAL_P99_1, GOAL_P99_50 = 5.0, 25.0, 100.0


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def timed_ms(action: object) -> float:
    started = time.perf_counter()
    action()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000


def lease_cycles(client: httpx.Client, n: int, holder: str) -> tuple[list[float], list[float]]:
    grants, releases = [], []
    for _ in range(n):
        started = time.perf_counter()
        got = client.post("/api/v1/leases", json={"pool": "bench", "holder": holder, "ttl_s": 60})
        grants.append((time.perf_counter() - started) * 1000)
        got.raise_for_status()
        started = time.perf_counter()
        client.delete(f"/api/v1/leases/{got.json()['id']}").raise_for_status()
        releases.append((time.perf_counter() - started) * 1000)
    return grants, releases


def report(label: str, grants: list[float], releases: list[float], raw_ms: float) -> None:
    cycles = [g + r for g, r in zip(grants, releases, strict=True)]
    for what, samples in (("lease", grants), ("release", releases), ("lease+release", cycles)):
        p50, p99 = pct(samples, 50), pct(samples, 99)
        print(  # noqa: T201
            f"  {label:9} {what:14} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
            f"   ({p50 / raw_ms:.2f}x / {p99 / raw_ms:.2f}x of docker exec p50)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400, help="lease cycles at 1 agent")
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--per-agent", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_sample_repo(Path(tmp) / "sample-app")
        with running_controller(Path(tmp) / "data") as (client, _image):
            pool = {
                "template": {"repo": str(repo), "memory_mb": 128, "cpus": 0.25},
                "min_ready": args.agents,
                "max_machines": args.agents,
                "reset": "keep",
            }
            client.put("/api/v1/pools/bench", json=pool).raise_for_status()
            deadline = time.monotonic() + 600
            while client.get("/api/v1/pools/bench").json()["counts"]["ready"] < args.agents:
                if time.monotonic() > deadline:
                    raise SystemExit("the pool did not fill")
                time.sleep(0.5)
            machine = client.get("/api/v1/machines?pool=bench").json()["data"][0]

            engine = DockerProvider(None)
            container = f"shopfloor-{machine['id']}"
            inspect = [timed_ms(lambda: engine.inspect_container(container)) for _ in range(50)]

            def exec_true() -> None:
                handle = engine.exec(container, ["true"])
                list(handle)
                handle.exit_code()

            execs = [timed_ms(exec_true) for _ in range(30)]
            raw_exec = pct(execs, 50)

            lease_cycles(client, 20, "warmup")
            grants, releases = lease_cycles(client, args.n, "solo")

            many_g: list[float] = []
            many_r: list[float] = []
            lock = threading.Lock()
            barrier = threading.Barrier(args.agents)

            def agent(i: int) -> None:
                with httpx.Client(
                    base_url=str(client.base_url), headers=dict(client.headers), timeout=60
                ) as own:
                    barrier.wait()
                    g, r = lease_cycles(own, args.per_agent, f"agent-{i}")
                with lock:
                    many_g.extend(g)
                    many_r.extend(r)

            threads = [threading.Thread(target=agent, args=(i,)) for i in range(args.agents)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    print("lease + release through the HTTP API, warm pool, SQLite")  # noqa: T201
    print(  # noqa: T201
        f"  raw engine (same run): inspect p50 {pct(inspect, 50):.2f} ms,"
        f" docker exec true p50 {raw_exec:.2f} ms"
    )
    report("1 agent", grants, releases, raw_exec)
    report(f"{args.agents} agents", many_g, many_r, raw_exec)
    cycles1 = [g + r for g, r in zip(grants, releases, strict=True)]
    cycles50 = [g + r for g, r in zip(many_g, many_r, strict=True)]
    print(  # noqa: T201
        f"  goals: 1 agent p50 <= {GOAL_P50_1} ms (lease {pct(grants, 50):.2f},"
        f" lease+release {pct(cycles1, 50):.2f}); p99 <= {GOAL_P99_1} ms"
        f" (lease {pct(grants, 99):.2f}, lease+release {pct(cycles1, 99):.2f});"
        f" {args.agents} agents p99 <= {GOAL_P99_50} ms (lease {pct(many_g, 99):.2f},"
        f" lease+release {pct(cycles50, 99):.2f})"
    )


if __name__ == "__main__":
    main()
