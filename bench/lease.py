"""Lease + release latency from a warm pool through the HTTP API, on SQLite and PostgreSQL.

    .venv/bin/python bench/lease.py [--database both|sqlite|postgres] [--n 400] [--agents 50]

A real controller (`shopfloor serve`) keeps a warm pool of machines holding the sample
repo's checkout; agents take a lease and give it back (reset policy ``keep``) over
keep-alive HTTP/1.1. In the same run the raw engine is timed: an inspect round trip and
`docker exec true` on one of the machines. It runs once on SQLite (the data dir's) and once
on PostgreSQL: a private cluster started for the run (scripts/pg_cluster.py, as the tests
start theirs), first with one controller, then with a second ``shopfloor serve`` on the
same database serving the same pool (its own data dir, as every controller has). The
controllers reach the cluster over its unix socket, as a controller on the database's own
host does; ``--pg-via tcp`` takes TCP loopback instead.

- 1 agent: lease, release, lease, ... one request at a time; timed with a lean client
  (see ``_controller.KeepAlive``) and, beside it, with httpx as agents/client.py uses it.
- 50 agents at once: in each round all agents ask for a lease at the same instant, then
  all give theirs back at the same instant; every agent times its own requests.
- 10 agents back to back: rounds in which the agents drain the warm pool of 50 with no
  pause between their cycles (5 each), which is a saturation test: latency there is
  queueing, printed with the cycles per second over the timed rounds. On PostgreSQL again
  with the agents spread over two controllers.

- hand-over (SQLite): release -> the machine ready for the next holder, with the wipe
  between holders (every process of the machine's user ended, home, /tmp, /dev/shm and
  the rest wiped; ``clean`` also restores the checkout), per policy on a one-machine pool
  of the sample repo: the time from the release call to the next lease of the same
  machine (``wait_s``) answering, as the next agent sees it.

A machine is leasable again only after its hand-over (~0.1 s of work in the machine, two
at a time per controller), so a steady stream of cycles runs at the hand-overs' pace
whatever the database. Between timed rounds the bench waits (untimed) for the pool to be
ready again, and leases wait (``wait_s``) rather than fail when an agent outruns the
hand-overs: the lease figures time a warm pool's API path.

Goals (issue 3): at 1 agent p50 <= 5 ms and p99 <= 25 ms; at 50 agents p99 <= 100 ms.
Goal (issue 12): hand-over p50 <= 300 ms for ``keep`` and for ``clean``.
Goals (issue 14): the same on PostgreSQL, and >= 500 cycles/s with two controllers.

    .venv/bin/python bench/lease.py --only handover    # the hand-over figures alone
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from _controller import KeepAlive, another_controller, running_controller  # noqa: E402
from make_repo import make_sample_repo  # noqa: E402
from pg_cluster import PgCluster  # noqa: E402

from controller.providers.docker import DockerProvider  # noqa: E402

GOAL_P50_1, GOAL_P99_1, GOAL_P99_50 = 5.0, 25.0, 100.0
GOAL_HANDOVER_P50 = 300.0
GOAL_CYCLES_TWO = 500.0
LEASE = {"pool": "bench", "ttl_s": 60, "wait_s": 60}


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
        wait_ready(client, 1)  # a released machine is leasable after its hand-over: untimed
        lean.add(*cycle_keepalive(agent, "solo"))
    for _ in range(n):
        wait_ready(client, 1)
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
        for round_ in range(rounds + 1):
            if i == 0:
                wait_ready(client, agents)  # the last round's hand-overs, untimed
            start_lease.wait()
            grant_ms, lease = timed_ms(
                lambda: own.call("POST", "/api/v1/leases", LEASE | {"holder": f"agent-{i}"})
            )
            start_release.wait()
            path = f"/api/v1/leases/{lease['id']}"  # type: ignore[index]
            release_ms, _ = timed_ms(lambda: own.call("DELETE", path))  # noqa: B023
            if round_:  # the first round warms up (the database connections it opens)
                samples.add(grant_ms, release_ms)
        own.close()

    run_threads(agents, agent)
    return samples


def back_to_back(
    clients: list[httpx.Client], agents: int, per_agent: int, rounds: int, warmup: int = 1
) -> tuple[Samples, float]:
    """Rounds in which ``agents`` agents, spread over ``clients`` (one per controller), each
    run ``per_agent`` lease+release cycles with no pause between: the warm pool drained as
    fast as the controllers serve it. Between rounds the bench waits, untimed, for the
    hand-overs; the first ``warmup`` rounds are not timed. Answers the samples and the
    cycles per second over the timed rounds."""
    samples = Samples()
    start, done = threading.Barrier(agents + 1), threading.Barrier(agents + 1)

    def agent(i: int) -> None:
        own = KeepAlive(clients[i % len(clients)])
        for round_ in range(warmup + rounds):
            start.wait()
            for _ in range(per_agent):
                cycle = cycle_keepalive(own, f"agent-{i}")
                if round_ >= warmup:
                    samples.add(*cycle)
            done.wait()
        own.close()

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for thread in threads:
        thread.start()
    timed = 0.0
    for round_ in range(warmup + rounds):
        wait_ready(clients[0], agents * per_agent)
        start.wait()
        started = time.perf_counter()
        done.wait()
        if round_ >= warmup:
            timed += time.perf_counter() - started
    for thread in threads:
        thread.join()
    return samples, agents * per_agent * rounds / timed


def run_threads(n: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def fill_pool(
    client: httpx.Client, repo: Path, size: int, name: str = "bench", reset: str = "keep"
) -> None:
    pool = {
        "template": {"repo": str(repo), "memory_mb": 128, "cpus": 0.25},
        "min_ready": size,
        "max_machines": size,
        "reset": reset,
    }
    client.put(f"/api/v1/pools/{name}", json=pool).raise_for_status()
    wait_ready(client, size, name, timeout_s=600)


def wait_ready(
    client: httpx.Client, size: int, name: str = "bench", timeout_s: float = 120
) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/api/v1/pools/{name}").json()["counts"].get("ready", 0) < size:
        if time.monotonic() > deadline:
            raise SystemExit(f"the pool {name} did not fill")
        time.sleep(0.05)


def hand_over(client: httpx.Client, repo: Path, policy: str, n: int) -> list[float]:
    """Release -> the same machine granted again (``wait_s``), ``n`` times, on a pool of one
    machine with ``policy``; each holder leaves a little behind (a process, files)."""
    name = f"handover-{policy}"
    fill_pool(client, repo, 1, name=name, reset=policy)
    agent = KeepAlive(client)
    body = {"pool": name, "ttl_s": 60, "wait_s": 60, "holder": "bench"}
    mess = (
        "setsid nohup sleep 600 >/dev/null 2>&1 </dev/null & "
        "echo x > /tmp/x; echo x > /dev/shm/x; echo x > ~/x; echo x > scratch"
    )
    samples: list[float] = []
    lease = agent.call("POST", "/api/v1/leases", body)
    for i in range(n + 3):
        exec_path = f"/api/v1/machines/{lease['machine_id']}/exec"
        agent.headers["X-Lease-Token"] = str(lease["token"])
        agent.call("POST", exec_path, {"cmd": mess})
        del agent.headers["X-Lease-Token"]
        started = time.perf_counter()
        agent.call("DELETE", f"/api/v1/leases/{lease['id']}")
        lease = agent.call("POST", "/api/v1/leases", body)
        if i >= 3:  # warm-up
            samples.append((time.perf_counter() - started) * 1000)
    agent.call("DELETE", f"/api/v1/leases/{lease['id']}")
    agent.close()
    return samples


def raw_engine(client: httpx.Client, pool: str = "bench") -> tuple[float, float]:
    """Inspect and `docker exec true` p50 on one of the pool's machines, in this run."""
    machine = client.get(f"/api/v1/machines?pool={pool}").json()["data"][0]
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


def verdict(value: float, goal: float, at_least: bool = False) -> str:
    met = value >= goal if at_least else value <= goal
    return f"{value:.2f} ({'met' if met else 'MISSED'})"


@dataclass
class Figures:
    """One database's lease figures, taken on one controller (and, on PostgreSQL, two)."""

    database: str
    inspect_ms: float
    exec_ms: float
    solo: Samples
    solo_httpx: Samples
    at_once: Samples
    back_to_back: Samples
    cycles_per_s: float
    two: tuple[Samples, float] | None = None


def lease_figures(
    client: httpx.Client, repo: Path, args: argparse.Namespace, database: str
) -> Figures:
    fill_pool(client, repo, args.agents)
    inspect_ms, exec_ms = raw_engine(client, "bench")
    solo, solo_httpx = one_agent(client, args.n)
    at_once = many_agents_at_once(client, args.agents, args.rounds)
    back, cycles_per_s = back_to_back(
        [client], args.b2b_agents, args.agents // args.b2b_agents, args.b2b_rounds
    )
    return Figures(database, inspect_ms, exec_ms, solo, solo_httpx, at_once, back, cycles_per_s)


def on_sqlite(tmp: Path, repo: Path, args: argparse.Namespace) -> None:
    with running_controller(tmp / "sqlite") as (client, _image):
        if args.handovers:
            handovers = {
                policy: hand_over(client, repo, policy, args.handovers)
                for policy in ("keep", "clean")
            }
            inspect_ms, exec_ms = raw_engine(client, "handover-keep")
        figures = lease_figures(client, repo, args, "SQLite") if args.only == "all" else None
    if args.handovers:
        print_handovers(handovers, inspect_ms, exec_ms)
    if figures is not None:
        print_figures(figures, args)


def on_postgres(tmp: Path, repo: Path, args: argparse.Namespace) -> None:
    """A private PostgreSQL cluster (scripts/pg_cluster.py, as the tests start theirs); one
    controller, then a second one on the same database serving the same pool."""
    cluster = PgCluster()
    try:
        cluster.start()
        url = cluster.tcp_url if args.pg_via == "tcp" else cluster.url
        with running_controller(tmp / "pg-a", database_url=url) as (client, image):
            figures = lease_figures(client, repo, args, f"PostgreSQL over its {args.pg_via}")
            with another_controller(client, tmp / "pg-b", image, url) as other:
                # A sustained rate: the second controller, just started, opens its
                # connections and fills its caches first (three untimed rounds), and twice
                # the rounds are timed, as one slow round weighs on a short sample.
                figures.two = back_to_back(
                    [client, other],
                    args.b2b_agents,
                    args.agents // args.b2b_agents,
                    args.b2b_rounds * 2,
                    warmup=3,
                )
    finally:
        cluster.remove()
    print_figures(figures, args)


def print_handovers(handovers: dict[str, list[float]], inspect_ms: float, exec_ms: float) -> None:
    print("lease hand-over: release -> the same machine leased again, with the wipe (SQLite)")
    print(
        f"  raw engine (same run): inspect p50 {inspect_ms:.2f} ms,"
        f" docker exec true p50 {exec_ms:.2f} ms"
    )
    for policy, values in handovers.items():
        p50, p99 = pct(values, 50), pct(values, 99)
        print(
            f"  {policy:6} hand-over p50 {p50:8.2f} ms  p99 {p99:8.2f} ms"
            f"   ({p50 / exec_ms:5.1f}x docker exec p50);"
            f" goal p50 <= {GOAL_HANDOVER_P50:g} ms: {verdict(p50, GOAL_HANDOVER_P50)}"
        )


def print_figures(f: Figures, args: argparse.Namespace) -> None:
    many = f"{args.agents} agents"
    b2b = f"{args.b2b_agents} agents back to back"
    print(f"lease + release through the HTTP API, warm pool, {f.database}")
    print(
        f"  raw engine (same run): inspect p50 {f.inspect_ms:.2f} ms,"
        f" docker exec true p50 {f.exec_ms:.2f} ms"
    )
    report("1 agent", f.solo, f.exec_ms)
    report("1 agent, through httpx", f.solo_httpx, f.exec_ms)
    report(f"{many} at once", f.at_once, f.exec_ms)
    report(b2b, f.back_to_back, f.exec_ms)
    print(
        f"  {b2b}, one controller: {f.cycles_per_s:.0f} lease+release cycles/s"
        f" (rounds that drain the warm pool of {args.agents}; latency there is queueing)"
    )
    if f.two is not None:
        report(f"{b2b}, 2 controllers", f.two[0], f.exec_ms)
        print(
            f"  {b2b}, spread over two controllers on one database:"
            f" {f.two[1]:.0f} lease+release cycles/s;"
            f" goal >= {GOAL_CYCLES_TWO:g}: {verdict(f.two[1], GOAL_CYCLES_TWO, at_least=True)}"
        )
    print(
        f"  goals ({f.database}): 1 agent lease+release p50 <= {GOAL_P50_1:g} ms:"
        f" {verdict(pct(f.solo.cycles, 50), GOAL_P50_1)};"
        f" p99 <= {GOAL_P99_1:g} ms: {verdict(pct(f.solo.cycles, 99), GOAL_P99_1)};"
        f" {many} at once, lease and release p99 <= {GOAL_P99_50:g} ms:"
        f" lease {verdict(pct(f.at_once.grants, 99), GOAL_P99_50)},"
        f" release {verdict(pct(f.at_once.releases, 99), GOAL_P99_50)};"
        f" read as one lease+release cycle: {verdict(pct(f.at_once.cycles, 99), GOAL_P99_50)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400, help="lease cycles at 1 agent")
    parser.add_argument("--agents", type=int, default=50, help="agents at once; the pool size")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of all agents at once")
    parser.add_argument(
        "--b2b-agents", type=int, default=10, help="agents back to back (each drains its share)"
    )
    parser.add_argument("--b2b-rounds", type=int, default=8, help="rounds back to back")
    parser.add_argument("--handovers", type=int, default=40, help="hand-overs per policy")
    parser.add_argument("--only", choices=["all", "handover"], default="all")
    parser.add_argument(
        "--pg-via",
        choices=["socket", "tcp"],
        default="socket",
        help="reach the cluster over its unix socket (a controller on the database's host)"
        " or over TCP loopback (one on another host, minus the network)",
    )
    parser.add_argument("--database", choices=["both", "sqlite", "postgres"], default="both")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # see the report
        repo = make_sample_repo(Path(tmp) / "sample-app")
        if args.database in ("both", "sqlite"):
            on_sqlite(Path(tmp), repo, args)
        if args.database in ("both", "postgres") and args.only == "all":
            on_postgres(Path(tmp), repo, args)


if __name__ == "__main__":
    main()
