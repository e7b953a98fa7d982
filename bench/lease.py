"""Lease + release latency from a warm pool through the HTTP API, against the raw engine.

    .venv/bin/python bench/lease.py [--n 400] [--agents 50] [--rounds 20]

A real controller (`shopfloor serve`, SQLite) keeps a warm pool of machines holding the
sample repo's checkout; agents take a lease and give it back (reset policy ``keep``) over
keep-alive HTTP/1.1. In the same run the raw engine is timed: an inspect round trip and
`docker exec true` on one of the machines.

- 1 agent: lease, release, lease, ... one request at a time; timed with a lean client
  (see ``_controller.KeepAlive``) and, beside it, with httpx as agents/client.py uses it.
- 50 agents at once: in each round all agents ask for a lease at the same instant, then
  all give theirs back at the same instant; every agent times its own requests.
- 50 agents back to back: each agent leases and releases in a loop with no pause between,
  which is a saturation test: latency there is queueing (agents / throughput), printed
  with the throughput the controller sustained.

Goals (issue 3): at 1 agent p50 <= 5 ms and p99 <= 25 ms; at 50 agents p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _controller import KeepAlive, running_controller  # noqa: E402
from make_repo import make_sample_repo  # noqa: E402

from controller.providers.docker import DockerProvider  # noqa: E402

GOAL_P50_1, GOAL_P99_1, GOAL_P99_50 = 5.0, 25.0, 100.0
LEASE = {"pool": "bench", "ttl_s": 60}


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def timed_ms(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return (time.perf_counter() - started) * 1000, result


class Samples:
    def __init__(self) -> None:
        self.grants: list[float] = []
        self.releases: list[float] = []
        self.lock = threading.Lock()

    def add(self, grant: float, release: float) -> None:
        with self.lock:
            self.grants.append(grant)
            self.releases.append(release)

    @property
    def cycles(self) -> list[float]:
        return [g + r for g, r in zip(self.grants, self.releases, strict=True)]


def cycle_keepalive(client: KeepAlive, holder: str) -> tuple[float, float]:
    grant_ms, lease = timed_ms(
        lambda: client.call("POST", "/api/v1/leases", LEASE | {"holder": holder})
    )
    release_ms, _ = timed_ms(lambda: client.call("DELETE", f"/api/v1/leases/{lease['id']}"))  # type: ignore[index]
    return grant_ms, release_ms


def cycle_httpx(client: httpx.Client, holder: str) -> tuple[float, float]:
    def grant() -> httpx.Response:
        return client.post("/api/v1/leases", json=LEASE | {"holder": holder}).raise_for_status()

    grant_ms, got = timed_ms(grant)
    lease_id = got.json()["id"]  # type: ignore[attr-defined]
    release_ms, _ = timed_ms(lambda: client.delete(f"/api/v1/leases/{lease_id}").raise_for_status())
    return grant_ms, release_ms


def one_agent(client: httpx.Client, n: int) -> tuple[Samples, Samples]:
    lean, through_httpx = Samples(), Samples()
    agent = KeepAlive(client)
    for _ in range(20):
        cycle_keepalive(agent, "warmup")
        cycle_httpx(client, "warmup")
    for _ in range(n):
        lean.add(*cycle_keepalive(agent, "solo"))
    for _ in range(n):
        through_httpx.add(*cycle_httpx(client, "solo-httpx"))
    agent.close()
    return lean, through_httpx


def many_agents_at_once(client: httpx.Client, agents: int, rounds: int) -> Samples:
    """Each round: all agents lease at the same instant, then all release at the same instant."""
    samples = Samples()
    start_lease = threading.Barrier(agents)
    start_release = threading.Barrier(agents)

    def agent(i: int) -> None:
        own = KeepAlive(client)
        for _ in range(rounds):
            start_lease.wait()
            grant_ms, lease = timed_ms(
                lambda: own.call("POST", "/api/v1/leases", LEASE | {"holder": f"agent-{i}"})
            )
            start_release.wait()
            path = f"/api/v1/leases/{lease['id']}"  # type: ignore[index]
            release_ms, _ = timed_ms(lambda: own.call("DELETE", path))  # noqa: B023
            samples.add(grant_ms, release_ms)
        own.close()

    run_threads(agents, agent)
    return samples


def many_agents_back_to_back(
    client: httpx.Client, agents: int, per_agent: int
) -> tuple[Samples, float]:
    samples = Samples()
    barrier = threading.Barrier(agents)

    def agent(i: int) -> None:
        own = KeepAlive(client)
        barrier.wait()
        for _ in range(per_agent):
            samples.add(*cycle_keepalive(own, f"agent-{i}"))
        own.close()

    started = time.perf_counter()
    run_threads(agents, agent)
    return samples, agents * per_agent / (time.perf_counter() - started)


def run_threads(n: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def fill_pool(client: httpx.Client, repo: Path, size: int) -> None:
    pool = {
        "template": {"repo": str(repo), "memory_mb": 128, "cpus": 0.25},
        "min_ready": size,
        "max_machines": size,
        "reset": "keep",
    }
    client.put("/api/v1/pools/bench", json=pool).raise_for_status()
    deadline = time.monotonic() + 600
    while client.get("/api/v1/pools/bench").json()["counts"].get("ready", 0) < size:
        if time.monotonic() > deadline:
            raise SystemExit("the pool did not fill")
        time.sleep(0.5)


def raw_engine(client: httpx.Client) -> tuple[float, float]:
    """Inspect and `docker exec true` p50 on one of the pool's machines, in this run."""
    machine = client.get("/api/v1/machines?pool=bench").json()["data"][0]
    engine = DockerProvider(None)
    container = f"shopfloor-{machine['id']}"
    inspect = [timed_ms(lambda: engine.inspect_container(container))[0] for _ in range(50)]

    def exec_true() -> None:
        handle = engine.exec(container, ["true"])
        list(handle)
        handle.exit_code()

    execs = [timed_ms(exec_true)[0] for _ in range(30)]
    return pct(inspect, 50), pct(execs, 50)


def report(label: str, samples: Samples, raw_ms: float) -> None:
    for what, values in (
        ("lease", samples.grants),
        ("release", samples.releases),
        ("lease+release", samples.cycles),
    ):
        p50, p99 = pct(values, 50), pct(values, 99)
        print(  # noqa: T201
            f"  {label:30} {what:14} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms"
            f"   ({raw_ms / p50:6.1f}x / {raw_ms / p99:5.1f}x faster than docker exec p50)"
        )


def verdict(value: float, goal: float) -> str:
    return f"{value:.2f} ({'met' if value <= goal else 'MISSED'})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400, help="lease cycles at 1 agent")
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of all agents at once")
    parser.add_argument("--per-agent", type=int, default=20, help="cycles per agent back to back")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_sample_repo(Path(tmp) / "sample-app")
        with running_controller(Path(tmp) / "data") as (client, _image):
            fill_pool(client, repo, args.agents)
            inspect_ms, exec_ms = raw_engine(client)
            solo, solo_httpx = one_agent(client, args.n)
            at_once = many_agents_at_once(client, args.agents, args.rounds)
            back_to_back, cycles_per_s = many_agents_back_to_back(
                client, args.agents, args.per_agent
            )

    many = f"{args.agents} agents"
    print("lease + release through the HTTP API, warm pool, SQLite")  # noqa: T201
    print(  # noqa: T201
        f"  raw engine (same run): inspect p50 {inspect_ms:.2f} ms,"
        f" docker exec true p50 {exec_ms:.2f} ms"
    )
    report("1 agent", solo, exec_ms)
    report("1 agent, through httpx", solo_httpx, exec_ms)
    report(f"{many} at once", at_once, exec_ms)
    report(f"{many} back to back", back_to_back, exec_ms)
    print(  # noqa: T201
        f"  {many} back to back: {cycles_per_s:.0f} lease+release cycles/s sustained"
        " (latency there is queueing: agents / throughput)"
    )
    print(  # noqa: T201
        f"  goals: 1 agent lease+release p50 <= {GOAL_P50_1:g} ms:"
        f" {verdict(pct(solo.cycles, 50), GOAL_P50_1)};"
        f" p99 <= {GOAL_P99_1:g} ms: {verdict(pct(solo.cycles, 99), GOAL_P99_1)};"
        f" {many} at once, lease and release p99 <= {GOAL_P99_50:g} ms:"
        f" lease {verdict(pct(at_once.grants, 99), GOAL_P99_50)},"
        f" release {verdict(pct(at_once.releases, 99), GOAL_P99_50)};"
        f" read as one lease+release cycle: {verdict(pct(at_once.cycles, 99), GOAL_P99_50)}"
    )


if __name__ == "__main__":
    main()
