"""Pause, snapshot and fork through the HTTP API, against the raw engine in the same run.

    .venv/bin/python bench/fork.py [--rounds 5]
    .venv/bin/python bench/fork.py --stages-only    # pool refill and fork: 3 stage only

A real controller (`shopfloor serve`, SQLite, disk limits on when run as root) makes a
machine of the sample repo whose setup builds a workspace of about 150 MB (a virtualenv,
a copy of the Python library standing in for installed packages, and build output), then:

- pause + resume: ``POST /machines/{id}/pause`` then ``/resume``, against the engine's own
  ``docker pause`` + ``unpause`` of a twin container (the same image and a copy of the
  workspace, not the controller's: reconcile thaws a machine it did not pause itself);
- fork of one machine at ~150 MB and again once the workspace holds ~1.5 GB (build cache
  added): ``POST /machines/{id}/fork {"count": 1}`` until the copy is ready, against a fork
  with the raw engine alone on the twin (pause, ``docker commit``, a ``cp -a`` of the
  workspace volume into a new volume in a helper container, unpause, ``docker run``);
- a fresh machine with clone + setup (``POST /machines?wait=true`` with the same template).

Goals (issue 15): pause + resume <= 150 ms; fork <= 1.5 s at 150 MB; fork at 1.5 GB <= 2x
the fork at 150 MB; fork >= 5x faster than a fresh machine with clone + setup.

Then, on a second controller (:func:`stage_and_pool_figures`):

- pool refill: a pool of one machine with that setup and the same with ``"prebuild": true``;
  its machine destroyed, the pool makes another: the time from the new machine's record to
  ``ready`` (and from the delete until then), median of the rounds. Goal: prebuild >= 5x
  faster than running setup.
- a ``fork: 3`` stage against the same stage unforked, in runs on the sample repo: the
  stage's agent runs the sample's tests and waits ``AGENT_WAIT_S`` (an agent mostly waits on
  its model), ``select: "first"``; the stage's duration from its record, and the fixed cost
  forking adds (seconds). Goal: <= 1.5x.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _controller import BENCH_LABEL, BENCH_RUN, running_controller  # noqa: E402
from make_repo import make_sample_repo  # noqa: E402

API = "/api/v1"
GOAL_PAUSE_MS = 150.0
GOAL_FORK_S = 1.5
GOAL_GROWTH = 2.0
GOAL_VS_FRESH = 5.0
AGENT_WAIT_S = 10
"""The bench stage's agent: the sample's tests, then this long waiting (a coding agent mostly
waits on its model; real stages take minutes). Forking adds a fixed cost (snapshot, forks
started), printed apart, so a shorter stage gives a larger ratio."""
MB = 1024 * 1024
SETUP = [
    "python3 -m venv /workspace/venv",
    "cp -a /usr/lib/python3.11 /workspace/venv/lib/python3.11/site-packages/vendored",
    # build output up to ~150 MB in all
    "mkdir -p /workspace/build && n=$(( (150 * 1048576 - $(du -sb /workspace | cut -f1)) "
    "/ 1048576 )) && for i in $(seq 1 $n); do head -c 1048576 /dev/urandom "
    "> /workspace/build/obj$i.o; done",
]
GROW = (
    "mkdir -p /workspace/cache && for i in $(seq 1 135); do "
    "head -c 10485760 /dev/urandom > /workspace/cache/blob$i; done; sync"
)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def call(api: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    answer = api.request(method, f"{API}{path}", **kwargs)
    if answer.status_code >= 400:
        raise SystemExit(f"{method} {path} -> {answer.status_code}: {answer.text[:500]}")
    return answer.json()


def workspace_mb(api: httpx.Client, machine_id: str) -> float:
    out = call(api, "POST", f"/machines/{machine_id}/exec", json={"cmd": "du -sb /workspace"})
    return int(out["stdout"].split()[0]) / MB


def engine_pause(engine: docker.DockerClient, container: str) -> None:
    """``docker pause``, again when the cgroup freezer gave up ("unable to freeze": a task
    in an uninterruptible wait), as the controller's provider does."""
    for attempt in range(5):
        try:
            engine.api.pause(container)
            return
        except docker.errors.APIError as exc:
            if "unable to freeze" not in str(exc) or attempt == 4:
                raise


def api_fork(api: httpx.Client, machine_id: str) -> float:
    started = time.perf_counter()
    done = call(api, "POST", f"/machines/{machine_id}/fork", json={"count": 1})
    elapsed = time.perf_counter() - started
    assert all(m["state"] == "ready" for m in done["machines"]), done
    for machine in done["machines"]:
        call(api, "DELETE", f"/machines/{machine['id']}")
    call(api, "DELETE", f"/snapshots/{done['snapshot']['id']}")
    return elapsed


def raw_fork(engine: docker.DockerClient, container: str, volume: str) -> float:
    """A fork with the engine alone: the machine paused while its filesystem is committed
    and its workspace copied whole, then a container of the image on the copy."""
    labels = {BENCH_LABEL: BENCH_RUN}
    name = f"bench-raw-{time.monotonic_ns()}"
    started = time.perf_counter()
    engine_pause(engine, container)
    try:
        image = engine.api.commit(container, repository="bench-raw-fork", tag=name, pause=False)
        engine.volumes.create(name=name, labels=labels)
        # The copy lands on /workspace: the image declares it a volume (the machine's was
        # mounted there), and left unmounted it would become an anonymous volume that
        # `remove=True` leaves behind.
        engine.containers.run(
            image["Id"],
            ["bash", "-c", "cp -a /from/. /workspace/"],
            entrypoint=[],
            user="root",
            remove=True,
            labels=labels,
            network_mode="none",
            volumes={
                volume: {"bind": "/from", "mode": "ro"},
                name: {"bind": "/workspace", "mode": "rw"},
            },
            cap_drop=["ALL"],
            cap_add=["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID"],
        )
    finally:
        engine.api.unpause(container)
    copy = engine.containers.run(
        image["Id"],
        detach=True,
        labels=labels,
        network_mode="none",
        init=True,
        volumes={name: {"bind": "/workspace", "mode": "rw"}},
    )
    elapsed = time.perf_counter() - started
    copy.remove(force=True)
    engine.volumes.get(name).remove(force=True)
    engine.images.remove(image["Id"], force=True)
    return elapsed


def raw_twin(engine: docker.DockerClient, image: str, volume: str, name: str) -> str:
    """A container the controller does not own (its reconcile thaws any machine it did not
    pause itself) with a copy of the machine's workspace: what the raw engine is timed on."""
    labels = {BENCH_LABEL: BENCH_RUN}
    for old in engine.containers.list(all=True, filters={"name": f"^{name}$"}):
        old.remove(force=True)
    for old_volume in engine.volumes.list(filters={"name": name}):
        old_volume.remove(force=True)
    engine.volumes.create(name=name, labels=labels)
    engine.containers.run(
        image,
        ["bash", "-c", "cp -a /from/. /to/"],
        entrypoint=[],
        user="root",
        remove=True,
        labels=labels,
        network_mode="none",
        volumes={volume: {"bind": "/from", "mode": "ro"}, name: {"bind": "/to", "mode": "rw"}},
        cap_drop=["ALL"],
        cap_add=["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID"],
    )
    engine.containers.run(
        image,
        detach=True,
        name=name,
        labels=labels,
        network_mode="none",
        init=True,
        volumes={name: {"bind": "/workspace", "mode": "rw"}},
    )
    return name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    engine = docker.from_env()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_controller(Path(tmp) / "data") as (api, image),
    ):
        repo = make_sample_repo(Path(tmp) / "sample-app")
        template = {"repo": str(repo), "setup": SETUP}
        fresh: list[float] = []
        source = ""
        for _ in range(2):  # the first one stays as the source of the forks
            started = time.perf_counter()
            machine = call(api, "POST", "/machines?wait=true", json=template)
            fresh.append(time.perf_counter() - started)
            assert machine["state"] == "ready", machine
            if source:
                call(api, "DELETE", f"/machines/{machine['id']}")
            else:
                source = machine["id"]
        volume = f"shopfloor-ws-{source}"
        twin = raw_twin(engine, image, volume, f"bench-twin-{BENCH_RUN}")
        small_mb = workspace_mb(api, source)

        ours_pause, raw_pause = [], []
        for _ in range(args.rounds * 4):
            ours_pause.append(
                timed(lambda: call(api, "POST", f"/machines/{source}/pause"))
                + timed(lambda: call(api, "POST", f"/machines/{source}/resume"))
            )
            raw_pause.append(
                timed(lambda: engine_pause(engine, twin)) + timed(lambda: engine.api.unpause(twin))
            )

        api_fork(api, source)  # warm
        small = [api_fork(api, source) for _ in range(args.rounds)]
        raw_small = [raw_fork(engine, twin, twin) for _ in range(2)]

        call(api, "POST", f"/machines/{source}/exec", json={"cmd": GROW, "timeout_s": 1200})
        big_mb = workspace_mb(api, source)
        big = [api_fork(api, source) for _ in range(args.rounds)]
        twin = raw_twin(engine, image, volume, twin)
        raw_big = [raw_fork(engine, twin, twin)]
        shared = call(api, "POST", f"/machines/{source}/snapshots", json={})
        call(api, "DELETE", f"/snapshots/{shared['id']}")
        call(api, "DELETE", f"/machines/{source}")

    med = statistics.median
    pause_ms, raw_pause_ms = med(ours_pause) * 1000, med(raw_pause) * 1000
    fresh_s, small_s, big_s = med(fresh), med(small), med(big)
    raw_small_s, raw_big_s = med(raw_small), med(raw_big)

    def verdict(met: bool) -> str:
        return "met" if met else "NOT MET"

    print(f"fork bench (copy-on-write disks: {shared['shared_blocks']}), medians")  # noqa: T201
    rows = [
        ("pause + resume, API", pause_ms, "ms"),
        ("pause + unpause, raw engine", raw_pause_ms, "ms"),
        (f"fork at {small_mb:.0f} MB, API", small_s, "s"),
        (f"fork at {small_mb:.0f} MB, raw engine (commit + copy)", raw_small_s, "s"),
        (f"fork at {big_mb:.0f} MB, API", big_s, "s"),
        (f"fork at {big_mb:.0f} MB, raw engine (commit + copy)", raw_big_s, "s"),
        ("fresh machine, clone + setup", fresh_s, "s"),
    ]
    for name, value, unit in rows:
        print(f"  {name:<48} {value:9.3f} {unit}")  # noqa: T201
    print("ratios")  # noqa: T201
    print(f"  pause + resume / raw engine                      {pause_ms / raw_pause_ms:9.2f}")  # noqa: T201
    print(
        f"  fork {small_mb:.0f} MB / raw engine fork                   {small_s / raw_small_s:9.2f}"
    )  # noqa: T201
    print(f"  fork {big_mb:.0f} MB / raw engine fork                  {big_s / raw_big_s:9.2f}")  # noqa: T201
    print(
        f"  fork {big_mb:.0f} MB / fork {small_mb:.0f} MB                       {big_s / small_s:9.2f}"
    )  # noqa: T201
    print(f"  fresh machine / fork                             {fresh_s / small_s:9.2f}")  # noqa: T201
    print("goals")  # noqa: T201
    goals = [
        (f"pause + resume <= {GOAL_PAUSE_MS:.0f} ms", pause_ms <= GOAL_PAUSE_MS),
        (f"fork at ~150 MB <= {GOAL_FORK_S} s", small_s <= GOAL_FORK_S),
        (f"fork at ~1.5 GB <= {GOAL_GROWTH:.0f}x fork at ~150 MB", big_s <= GOAL_GROWTH * small_s),
        (
            f"fork >= {GOAL_VS_FRESH:.0f}x faster than clone + setup",
            fresh_s >= GOAL_VS_FRESH * small_s,
        ),
    ]
    for name, met in goals:
        print(f"  {name:<48} {verdict(met)}")  # noqa: T201


def _wait(check: Callable[[], Any], what: str, timeout_s: float = 600) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _ready_in(api: httpx.Client, pool: str, not_ids: set[str]) -> dict[str, Any] | None:
    found = call(api, "GET", "/machines", params={"pool": pool, "state": "ready"})["data"]
    fresh = [m for m in found if m["id"] not in not_ids]
    return fresh[0] if fresh else None


def _refills(api: httpx.Client, pool: str, rounds: int) -> tuple[list[float], list[float]]:
    """(record -> ready, delete -> ready) of the pool's machine, ``rounds`` times."""
    seen: set[str] = set()
    current = _wait(lambda: _ready_in(api, pool, seen), f"pool {pool} to fill")
    provisioning, wall = [], []
    for _ in range(rounds):
        seen.add(current["id"])
        started = time.perf_counter()
        call(api, "DELETE", f"/machines/{current['id']}")
        current = _wait(lambda: _ready_in(api, pool, seen), f"pool {pool} to refill")
        wall.append(time.perf_counter() - started)
        made = _parse(current["created_at"])
        provisioning.append((_parse(current["ready_at"]) - made).total_seconds())
    call(api, "DELETE", f"/machines/{current['id']}")
    return provisioning, wall


def _parse(value: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _stage_seconds(api: httpx.Client, body: dict[str, Any], stage: str) -> float:
    run = call(api, "POST", "/runs", json=body)
    done = _wait(
        lambda: (
            (r := call(api, "GET", f"/runs/{run['id']}"))["status"]
            in ("passed", "failed", "cancelled")
            and r
        ),
        f"run {run['id']}",
    )
    if done["status"] != "passed":
        raise SystemExit(f"bench run failed: {done['reason']}")
    found = next(s for s in done["stages"] if s["name"] == stage)
    return float((_parse(found["finished_at"]) - _parse(found["started_at"])).total_seconds())


def stage_and_pool_figures(rounds: int, *, pools: bool = True) -> None:
    import os

    os.environ["SHOPFLOOR_POOL_INTERVAL_S"] = "0.1"
    os.environ["SHOPFLOOR_RUN_POLL_INTERVAL_S"] = "0.1"
    setup_made = setup_wall = pre_made = pre_wall = [float("nan")]
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_controller(Path(tmp) / "data") as (api, _image),
    ):
        repo = make_sample_repo(Path(tmp) / "sample-app")
        if pools:
            setup_made, setup_wall, pre_made, pre_wall = _pool_refills(api, repo, rounds)
        plain, forked, making = _fork_stages(api, repo, rounds)
    _print_stage_and_pool(setup_made, setup_wall, pre_made, pre_wall, plain, forked, making)


def _pool_refills(
    api: httpx.Client, repo: Path, rounds: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Refills of a pool that runs setup, then of one with ``prebuild``."""
    template = {"repo": str(repo), "setup": SETUP}
    pool_body = {"min_ready": 1, "max_machines": 1}
    call(api, "PUT", "/pools/bench-setup", json={"template": template, **pool_body})
    setup_made, setup_wall = _refills(api, "bench-setup", max(2, rounds // 2))
    call(api, "PUT", "/pools/bench-setup", json={"template": template, "min_ready": 0})
    prebuilt = {**template, "prebuild": True}
    call(api, "PUT", "/pools/bench-pre", json={"template": prebuilt, **pool_body})
    pre_made, pre_wall = _refills(api, "bench-pre", rounds)
    call(api, "PUT", "/pools/bench-pre", json={"template": prebuilt, "min_ready": 0})
    return setup_made, setup_wall, pre_made, pre_wall


def _fork_stages(
    api: httpx.Client, repo: Path, rounds: int
) -> tuple[list[float], list[float], list[float]]:
    """(unforked stage s, fork: 3 stage s, of which making the forks s) per round."""
    stage = {
        "name": "implement",
        "agent": "command",
        "with": {"cmd": f"python3 run_tests.py && sleep {AGENT_WAIT_S} && echo done > done.txt"},
    }
    first = {"name": "prepare", "agent": "command", "with": {"cmd": "true"}}
    after = {"name": "after", "agent": "command", "with": {"cmd": "test -s done.txt"}}

    def body(forked: bool) -> dict[str, Any]:
        extra = {"fork": 3, "select": "first"} if forked else {}
        return {
            "task": "bench",
            "repo": str(repo),
            "stages": [first, {**stage, **extra}, after],
        }

    plain, forked = [], []
    for _ in range(rounds):
        plain.append(_stage_seconds(api, body(False), "implement"))
        forked.append(_stage_seconds(api, body(True), "implement"))
    made = call(api, "GET", "/events", params={"kind": "stage.forked", "limit": 1000})
    making = [e["data"]["took_ms"] / 1000 for e in made["data"]]
    snapping = [e["data"]["snapshot_ms"] / 1000 for e in made["data"]]
    print(f"  (snapshot of the run's machine: median {statistics.median(snapping):.3f} s)")  # noqa: T201
    return plain, forked, making


def _print_stage_and_pool(
    setup_made: list[float],
    setup_wall: list[float],
    pre_made: list[float],
    pre_wall: list[float],
    plain: list[float],
    forked: list[float],
    making: list[float],
) -> None:
    med = statistics.median
    print("pool refill and fork stage, medians")  # noqa: T201
    rows = [
        ("pool refill, setup: record -> ready", med(setup_made)),
        ("pool refill, setup: delete -> ready", med(setup_wall)),
        ("pool refill, prebuild: record -> ready", med(pre_made)),
        ("pool refill, prebuild: delete -> ready", med(pre_wall)),
        (f"stage unforked (tests + {AGENT_WAIT_S} s of agent)", med(plain)),
        ("stage with fork: 3", med(forked)),
        ("  of which snapshot + 3 forks started + leased", med(making)),
        ("  fork: 3 stage - unforked stage (fixed cost)", med(forked) - med(plain)),
    ]
    pools = not math.isnan(med(setup_made))  # not measured with --fork-stage-only
    for name, value in rows if pools else rows[4:]:
        print(f"  {name:<48} {value:9.3f} s")  # noqa: T201
    refill = med(setup_made) / med(pre_made)
    stage_ratio = med(forked) / med(plain)
    print("ratios")  # noqa: T201
    if pools:
        print(f"  refill with setup / refill from prebuild         {refill:9.2f}")  # noqa: T201
    print(f"  fork: 3 stage / same stage unforked              {stage_ratio:9.2f}")  # noqa: T201
    print("goals")  # noqa: T201
    goals = [("fork: 3 stage <= 1.5x the stage unforked", stage_ratio <= 1.5)]
    if pools:
        goals.insert(
            0,
            (f"prebuild refill >= {GOAL_VS_FRESH:.0f}x faster than setup", refill >= GOAL_VS_FRESH),
        )
    for name, met in goals:
        print(f"  {name:<48} {'met' if met else 'NOT MET'}")  # noqa: T201


if __name__ == "__main__":
    if "--fork-stage-only" in sys.argv:  # the fork-stage figure alone
        stage_and_pool_figures(5, pools=False)
    elif "--stages-only" in sys.argv:  # the pool-refill and fork-stage figures alone
        stage_and_pool_figures(5)
    else:
        main()
        stage_and_pool_figures(5)
