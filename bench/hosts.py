"""A fleet across hosts (issue 14), on a nested Docker engine as the second host.

Measured in the same run, against the raw engine of that host:

- provisioning a machine placed on the nested host (POST /machines?wait=true, ``local``
  cordoned) vs a bare ``docker run`` of the image on the nested engine: goal ratio <= 1.25;
- a session command to that machine vs ``docker exec`` of ``true`` on the nested engine:
  goal >= 10x faster;
- the placement decision (read hosts and what their machines reserve, choose) with 50 hosts
  registered (47 of them cordoned records or full) and 500 machines: goal p99 <= 20 ms.

Also printed: how long copying the runner image to the new host took (``save`` -> ``load``).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import docker
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _controller import BENCH_LABEL, BENCH_RUN, KeepAlive, bare_run, running_controller  # noqa: E402

from controller.settings import Settings  # noqa: E402
from controller.store.db import make_engine, migrate, unit_of_work  # noqa: E402
from controller.store.models import Host, HostState, Machine, MachineState  # noqa: E402
from tests.integration.nested_hosts import NestedHost, NestedHosts  # noqa: E402

ROUNDS = 10
COMMANDS = 200
PLACEMENTS = 500


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def provision(api: httpx.Client) -> float:
    started = time.perf_counter()
    machine = api.post("/api/v1/machines?wait=true", json={}).json()
    elapsed = time.perf_counter() - started
    assert machine["state"] == "ready", machine
    assert machine["host"] == "far", machine
    api.delete(f"/api/v1/machines/{machine['id']}")
    return elapsed


def join(api: httpx.Client, host: NestedHost, image: str) -> float:
    assert api.post("/api/v1/hosts/local/cordon").status_code == 200
    added = api.put("/api/v1/hosts/far", json={"url": host.url})
    assert added.status_code == 200, added.text
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = api.get("/api/v1/hosts/far").json()["images"].get(image, {})
        if state.get("state") == "ready":
            return float(state.get("seconds", 0.0))
        assert state.get("state") != "failed", state
        time.sleep(0.5)
    raise SystemExit("the runner image did not reach the nested host")


def commands(api: httpx.Client, engine: docker.DockerClient) -> tuple[list[float], list[float]]:
    machine = api.post("/api/v1/machines?wait=true", json={}).json()
    assert machine["host"] == "far", machine
    machine_id = machine["id"]
    session = api.post(f"/api/v1/machines/{machine_id}/sessions").json()["id"]
    lean = KeepAlive(api)
    path = f"/api/v1/machines/{machine_id}/sessions/{session}/run"
    container = engine.containers.get(f"shopfloor-{machine_id}")
    lean.call("POST", path, {"cmd": "true"})
    container.exec_run(["true"], user="runner")  # warm both paths
    ours, raw = [], []
    for _ in range(COMMANDS):
        started = time.perf_counter()
        answer = lean.call("POST", path, {"cmd": "true"})
        ours.append(time.perf_counter() - started)
        assert answer["exit_code"] == 0, answer
        started = time.perf_counter()
        container.exec_run(["true"], user="runner")
        raw.append(time.perf_counter() - started)
    lean.close()
    api.delete(f"/api/v1/machines/{machine_id}")
    return ours, raw


def placement_decisions(tmp: Path) -> list[float]:
    """``hosts.place`` in a transaction that is rolled back: the decision alone."""
    from controller.errors import ShopfloorError
    from controller.services import hosts

    settings = Settings(data_dir=tmp / "placement")
    settings.data_dir.mkdir(parents=True)
    migrate(settings.sqlalchemy_url)
    db = make_engine(settings.sqlalchemy_url)
    with unit_of_work(db) as tx:
        for i in range(50):
            state = HostState.cordoned if i % 2 else HostState.ready
            full = 10 if i >= 3 else 1000  # three hosts with room; the rest cordoned or full
            tx.add(Host(name=f"h{i:02d}", url="unix:///x", state=state, cpus=64, max_machines=full))
        for i in range(500):
            tx.add(
                Machine(
                    image="img",
                    cpus=0.5,
                    memory_mb=512,
                    container_name=f"c{i}",
                    volume_name=f"v{i}",
                    state=MachineState.ready,
                    host=f"h{i % 50:02d}",
                )
            )
    times = []
    for _ in range(PLACEMENTS):
        started = time.perf_counter()
        try:
            with unit_of_work(db) as tx:
                hosts.place(
                    tx, settings=settings, cpus=1, memory_mb=1024, host_labels={}, pool=None
                )
                raise LookupError  # roll back: the decision only
        except LookupError:
            pass
        except ShopfloorError as exc:
            raise SystemExit(f"placement failed: {exc.message}") from exc
        times.append(time.perf_counter() - started)
    db.dispose()
    return times


def main() -> None:
    nested = NestedHosts({BENCH_LABEL: BENCH_RUN}, prefix="sf-bench-host")
    try:
        (host,) = nested.start(1)
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_controller(Path(tmp)) as (api, image),
            closing(host.client(timeout=300)) as engine,
        ):
            copy_s = join(api, host, image)
            bare_run(engine, image), provision(api)  # warm both paths
            bare, ours = [], []
            for _ in range(ROUNDS):
                bare.append(bare_run(engine, image))
                ours.append(provision(api))
            session, raw_exec = commands(api, engine)
            decisions = placement_decisions(Path(tmp))
    finally:
        nested.close()
    ratio = statistics.median(ours) / statistics.median(bare)
    speedup = statistics.median(raw_exec) / statistics.median(session)
    p99 = p(decisions, 0.99) * 1000
    print(f"runner image copied to the nested host (save -> load): {copy_s:.1f} s")
    print(f"provision on a nested host (no clone), median of {ROUNDS}:")
    print(f"  docker run on its engine   {statistics.median(bare) * 1000:8.1f} ms")
    print(f"  POST /machines?wait=true   {statistics.median(ours) * 1000:8.1f} ms")
    print(f"  ratio                      {ratio:8.2f}   goal <= 1.25  {ok(ratio <= 1.25)}")
    print(f"session command on a nested host's machine, {COMMANDS} each:")
    print(f"  docker exec (its engine)   p50 {statistics.median(raw_exec) * 1000:7.1f} ms")
    print(
        f"  session command            p50 {statistics.median(session) * 1000:7.1f} ms"
        f"  p99 {p(session, 0.99) * 1000:7.1f} ms"
    )
    print(f"  faster by                  {speedup:8.1f}x  goal >= 10x  {ok(speedup >= 10)}")
    print(f"placement decision, 50 hosts, 500 machines, {PLACEMENTS} decisions:")
    print(f"  p50 {statistics.median(decisions) * 1000:.2f} ms  p99 {p99:.2f} ms")
    print(f"  goal p99 <= 20 ms  {ok(p99 <= 20)}")


def ok(met: bool) -> str:
    return "OK" if met else "MISSED"


if __name__ == "__main__":
    main()
