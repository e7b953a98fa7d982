"""The same five-stage run: one machine kept for the run vs a fresh machine per stage.

    .venv/bin/python bench/pipeline.py [--rounds 2]

Both go through a real controller (`shopfloor serve`) and the real engine, on the sample
repo, with a setup step (a Python virtualenv, standing in for a dependency install):

- kept: one run with five stages (plan, implement, test, review, qa); the run gets one
  machine (clone + setup once) and keeps it from plan to QA;
- fresh: five one-stage runs, one per stage, each on its own new machine (clone + setup
  each time), which is what a pipeline without affinity pays.

Also printed: the kept run from a warm pool (the machine was made before the run asked),
and the raw engine's `docker run` + remove of a container, measured in the same run.
Goal (issue 3): kept >= 3x faster than fresh.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _controller import running_controller  # noqa: E402
from make_repo import make_sample_repo  # noqa: E402

from controller.providers.base import ContainerSpec  # noqa: E402
from controller.providers.docker import DockerProvider  # noqa: E402

GOAL = 3.0
CTX = "/workspace/.shopfloor"
SETUP = "python3 -m venv /workspace/venv"
STAGES: list[dict[str, Any]] = [
    {
        "name": "plan",
        "agent": "command",
        "with": {"cmd": f"mkdir -p {CTX} && echo '1. shout' > {CTX}/plan.md"},
    },
    {"name": "implement", "agent": "command", "with": {"cmd": "echo '# shouted' >> app.py"}},
    {
        "name": "test",
        "agent": "command",
        "with": {"cmd": "/workspace/venv/bin/python -m unittest -q"},
    },
    {"name": "review", "agent": "command", "with": {"cmd": "git diff --stat"}},
    {
        "name": "qa",
        "agent": "command",
        "with": {"cmd": "/workspace/venv/bin/python -c 'import app; print(app.greeting(\"qa\"))'"},
    },
]


def wait_run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    while True:
        run: dict[str, Any] = client.get(f"/api/v1/runs/{run_id}").json()
        if run["status"] in ("passed", "failed", "cancelled"):
            if run["status"] != "passed":
                raise SystemExit(f"run {run_id} {run['status']}: {run['reason']}")
            return run
        time.sleep(0.05)


def timed_run(
    client: httpx.Client, repo: Path, stages: list[dict[str, Any]], pool: str | None
) -> float:
    body = {"task": "shout the greeting", "repo": str(repo), "stages": stages, "pool": pool}
    started = time.perf_counter()
    created = client.post("/api/v1/runs", json=body)
    created.raise_for_status()
    wait_run(client, created.json()["id"])
    return time.perf_counter() - started


def raw_container_s(engine: DockerProvider, image: str) -> float:
    name = f"shopfloor-bench-raw-{time.monotonic_ns()}"
    started = time.perf_counter()
    engine.create_volume(name, {"shopfloor.bench": "1"})
    engine.run_container(
        ContainerSpec(
            name=name, image=image, labels={"shopfloor.bench": "1"}, workspace_volume=name
        )
    )
    engine.remove_container(name)
    engine.remove_volume(name)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    kept, fresh, warm, raw = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_sample_repo(Path(tmp) / "sample-app")
        with running_controller(Path(tmp) / "data") as (client, image):
            engine = DockerProvider(None)
            template = {"repo": str(repo), "setup": [SETUP]}
            # Runs without a pool get a machine of the run's repo; give them the setup step
            # by running the kept and fresh variants on a pool with min_ready 0 (made on demand).
            pool = {"template": template, "min_ready": 0, "max_machines": 6, "reset": "recreate"}
            client.put("/api/v1/pools/cold", json=pool).raise_for_status()
            warm_pool = {
                "template": template,
                "min_ready": 1,
                "max_machines": 2,
                "reset": "recreate",
            }
            client.put("/api/v1/pools/warm", json=warm_pool).raise_for_status()
            for _ in range(args.rounds):
                raw.append(raw_container_s(engine, image))
                kept.append(timed_run(client, repo, STAGES, "cold"))
                fresh.append(sum(timed_run(client, repo, [stage], "cold") for stage in STAGES))
                while client.get("/api/v1/pools/warm").json()["counts"]["ready"] < 1:
                    time.sleep(0.2)
                warm.append(timed_run(client, repo, STAGES, "warm"))
    k, f, w, r = (statistics.median(x) for x in (kept, fresh, warm, raw))
    print("five-stage run on the sample repo (setup: a virtualenv), median of", args.rounds)  # noqa: T201
    print(f"  raw engine (same run): docker run + remove {r * 1000:.0f} ms")  # noqa: T201
    print(f"  fresh machine per stage (clone + setup x5): {f:6.2f} s  ({f / r:.1f}x raw)")  # noqa: T201
    print(f"  one machine kept for the run:               {k:6.2f} s  ({k / r:.1f}x raw)")  # noqa: T201
    print(f"  kept, machine from a warm pool:             {w:6.2f} s  ({w / r:.1f}x raw)")  # noqa: T201
    print(  # noqa: T201
        f"  kept vs fresh: {f / k:.2f}x faster (warm pool: {f / w:.2f}x); goal >= {GOAL:.0f}x"
    )


if __name__ == "__main__":
    main()
