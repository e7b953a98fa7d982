"""Provisioning a machine (no clone) through the HTTP API vs a bare `docker run` of the image.

Both are measured in the same run, alternating, until the container is running; removal is
not timed. Each is timed on a quiet host: the one before it has finished its work in the
background (the engine's removal of a container, the controller's spare disks made again
after a machine started), which would otherwise land on whichever comes next.
Goal (issue 2): median ratio <= 1.2.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _controller import bare_run, running_controller  # noqa: E402

ROUNDS = 15
QUIET_S = 0.5
"""The pause before each timed provisioning (a spare disk takes ~40 ms to make)."""


def provision(api: httpx.Client) -> float:
    started = time.perf_counter()
    machine = api.post("/api/v1/machines?wait=true", json={}).json()
    elapsed = time.perf_counter() - started
    assert machine["state"] == "ready", machine
    api.delete(f"/api/v1/machines/{machine['id']}")
    return elapsed


def main() -> None:
    engine = docker.from_env()
    with tempfile.TemporaryDirectory() as tmp, running_controller(Path(tmp)) as (api, image):
        bare_run(engine, image), provision(api)  # warm both paths
        bare, ours = [], []
        for _ in range(ROUNDS):
            time.sleep(QUIET_S)
            bare.append(bare_run(engine, image))
            time.sleep(QUIET_S)
            ours.append(provision(api))
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"provision (no clone), median of {ROUNDS}:")
    print(f"  docker run (raw engine)    {statistics.median(bare) * 1000:8.1f} ms")
    print(f"  POST /machines?wait=true   {statistics.median(ours) * 1000:8.1f} ms")
    print(
        f"  ratio                      {ratio:8.2f}   goal <= 1.20  {'OK' if ratio <= 1.2 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
