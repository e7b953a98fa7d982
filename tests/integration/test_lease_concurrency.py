"""200 concurrent lease requests against 10 real machines, on SQLite and on PostgreSQL.

Each test runs a real ``shopfloor serve`` (uvicorn) and a pool of 10 real machines; 200
threads each take a lease (waiting for one if needed), hold it briefly and give it back.
The database is then read directly: every grant is unique, tokens grow strictly per
machine, no two leases of one machine overlap in time, and no request was lost.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import select

from controller.store.db import make_engine, unit_of_work
from controller.store.models import Lease, LeaseState, Machine, Role
from tests.integration.conftest import ControllerProcess

REQUESTS = 200
MACHINES = 10


def _storm(url: str, agent: str, pool: str) -> list[dict[str, Any]]:
    """REQUESTS threads at once: lease (waiting), hold a moment, release. Answers in order."""
    answers: list[dict[str, Any]] = [{} for _ in range(REQUESTS)]
    start = threading.Barrier(REQUESTS)
    headers = {"Authorization": f"Bearer {agent}"}

    def one(i: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=180) as http:
            start.wait()
            got = http.post(
                "/api/v1/leases",
                json={"pool": pool, "holder": f"agent-{i}", "ttl_s": 120, "wait_s": 150},
            )
            answers[i] = {"status": got.status_code, "body": got.json()}
            if got.status_code == 201:
                time.sleep(0.005)
                gone = http.delete(f"/api/v1/leases/{got.json()['id']}")
                answers[i]["released"] = gone.status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(REQUESTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return answers


def _check(db_url: str, answers: list[dict[str, Any]]) -> None:
    failed = [a for a in answers if a.get("status") != 201 or a.get("released") != 200]
    assert not failed, f"{len(failed)} requests lost or refused, e.g. {failed[:3]}"
    lease_ids = [a["body"]["id"] for a in answers]
    assert len(set(lease_ids)) == REQUESTS
    grants = {(a["body"]["machine_id"], a["body"]["fence"]) for a in answers}
    assert len(grants) == REQUESTS, "two grants carried the same machine and token"

    engine = make_engine(db_url)
    try:
        with unit_of_work(engine) as tx:
            leases = list(tx.exec(select(Lease).where(Lease.holder.startswith("agent-"))))  # type: ignore[attr-defined]
            machines = {m.id: m for m in tx.exec(select(Machine))}
    finally:
        engine.dispose()
    assert len(leases) == REQUESTS
    assert all(lease.state == LeaseState.released for lease in leases)
    by_machine: dict[str, list[Lease]] = defaultdict(list)
    for lease in leases:
        by_machine[lease.machine_id].append(lease)
    assert len(by_machine) == MACHINES, "the grants did not spread over the pool"
    for machine_id, held in by_machine.items():
        held.sort(key=lambda lease: lease.fence)
        tokens = [lease.fence for lease in held]
        assert tokens == sorted(set(tokens)), f"tokens not strictly increasing on {machine_id}"
        for before, after in zip(held, held[1:], strict=False):
            assert before.ended_at is not None
            assert before.ended_at <= after.acquired_at, f"overlapping leases on {machine_id}"
        assert machines[machine_id].fence > tokens[-1]  # released: fenced past the last token


def _run_storm(controller: ControllerProcess, db_url: str) -> None:
    ops = {"Authorization": f"Bearer {controller.token(Role.ops)}"}
    agent = controller.token(Role.agent)
    with httpx.Client(base_url=controller.url, headers=ops, timeout=60) as http:
        body = {"template": {}, "min_ready": MACHINES, "max_machines": MACHINES, "reset": "keep"}
        assert http.put("/api/v1/pools/storm", json=body).status_code == 200
        deadline = time.monotonic() + 180
        while http.get("/api/v1/pools/storm").json()["counts"]["ready"] < MACHINES:
            assert time.monotonic() < deadline, "the pool did not fill"
            time.sleep(0.3)
    _check(db_url, _storm(controller.url, agent, "storm"))


def test_200_concurrent_leases_on_sqlite(tmp_path: Path, runner_image: str) -> None:
    controller = ControllerProcess(
        tmp_path / "data", runner_image, SHOPFLOOR_POOL_INTERVAL_S="0.3"
    ).start()
    try:
        _run_storm(controller, f"sqlite:///{tmp_path / 'data' / 'shopfloor.db'}")
    finally:
        controller.stop()


def test_200_concurrent_leases_on_postgres(
    tmp_path: Path, runner_image: str, postgres_url: str
) -> None:
    controller = ControllerProcess(
        tmp_path / "data",
        runner_image,
        SHOPFLOOR_POOL_INTERVAL_S="0.3",
        SHOPFLOOR_DATABASE_URL=postgres_url,
    ).start()
    try:
        _run_storm(controller, postgres_url)
    finally:
        controller.stop()
