"""200 concurrent lease requests against 10 real machines, on SQLite and on PostgreSQL, and
on two controllers serving one pool from one PostgreSQL.

Each test runs a real ``shopfloor serve`` (uvicorn; two of them on one database in the
last) and a pool of 10 real machines; 200 threads each take a lease (waiting for one if
needed), hold it briefly and give it back. The database is then read directly: every grant
is unique, tokens grow strictly per machine, no two leases of one machine overlap in time,
every lease ended once, and no request was lost.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
from pg_cluster import fresh_database
from sqlmodel import col, select

from controller.store.db import make_engine, unit_of_work
from controller.store.models import Event, Lease, LeaseState, Machine, Role
from tests.integration.conftest import ControllerProcess

REQUESTS = 200
MACHINES = 10


def _storm(urls: list[str], agent: str, pool: str) -> list[dict[str, Any]]:
    """REQUESTS threads at once, spread over ``urls`` (one per controller): lease (waiting),
    hold a moment, release. Answers in order."""
    answers: list[dict[str, Any]] = [{} for _ in range(REQUESTS)]
    start = threading.Barrier(REQUESTS)
    headers = {"Authorization": f"Bearer {agent}"}

    def one(i: int) -> None:
        with httpx.Client(base_url=urls[i % len(urls)], headers=headers, timeout=180) as http:
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
            ends = Counter(
                event.subject_id
                for event in tx.exec(
                    select(Event).where(col(Event.kind).in_(["lease.released", "lease.expired"]))
                )
            )
    finally:
        engine.dispose()
    assert len(leases) == REQUESTS
    assert all(ends[lease.id] == 1 for lease in leases), "a lease ended twice or never"
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


def _run_storm(controller: ControllerProcess, db_url: str, *others: ControllerProcess) -> None:
    ops = {"Authorization": f"Bearer {controller.token(Role.ops)}"}
    agent = controller.token(Role.agent)
    with httpx.Client(base_url=controller.url, headers=ops, timeout=60) as http:
        body = {"template": {}, "min_ready": MACHINES, "max_machines": MACHINES, "reset": "keep"}
        assert http.put("/api/v1/pools/storm", json=body).status_code == 200
        deadline = time.monotonic() + 180
        while http.get("/api/v1/pools/storm").json()["counts"]["ready"] < MACHINES:
            assert time.monotonic() < deadline, "the pool did not fill"
            time.sleep(0.3)
    urls = [controller.url, *(other.url for other in others)]
    _check(db_url, _storm(urls, agent, "storm"))


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


def test_two_controllers_on_one_postgres_never_hand_one_machine_to_two_agents(
    tmp_path: Path, runner_image: str, postgres_url: str
) -> None:
    """The 200 requests spread over two controllers serving one pool from one database
    (each grants and ends leases on the event loop's own connections, one statement per
    round trip): the same checks hold. Then one lease released through both controllers
    at the same instant ends once: one 200, one 409, one end event."""
    db_url = fresh_database(postgres_url, "two")
    env = {"SHOPFLOOR_POOL_INTERVAL_S": "0.3", "SHOPFLOOR_DATABASE_URL": db_url}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = ControllerProcess(tmp_path / "a" / "data", runner_image, **env).start()
    second = ControllerProcess(tmp_path / "b" / "data", runner_image, **env).start()
    try:
        _run_storm(first, db_url, second)
        _release_through_both(first, second)
    finally:
        first.stop()
        second.stop()


def _release_through_both(first: ControllerProcess, second: ControllerProcess) -> None:
    headers = {"Authorization": f"Bearer {first.token(Role.agent)}"}
    body = {"pool": "storm", "holder": "racer", "ttl_s": 60, "wait_s": 60}
    for _ in range(5):
        with httpx.Client(base_url=first.url, headers=headers, timeout=60) as http:
            lease = http.post("/api/v1/leases", json=body)
            assert lease.status_code == 201, lease.text
        answers = _race_release([first.url, second.url], headers, lease.json()["id"])
        assert sorted(answers) == [200, 409], answers
    events = httpx.get(
        f"{first.url}/api/v1/events?limit=1000",
        headers={"Authorization": f"Bearer {first.token(Role.ops)}"},
        timeout=60,
    ).json()["data"]
    ends = Counter(e["subject_id"] for e in events if e["kind"] == "lease.released")
    assert len(ends) >= 5, ends
    assert set(ends.values()) == {1}, ends


def _race_release(urls: list[str], headers: dict[str, str], lease_id: str) -> list[int]:
    """DELETE the lease through each URL at the same instant; the answers' status codes."""
    start = threading.Barrier(len(urls))
    answers: list[int] = []

    def release(url: str) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            start.wait()
            answers.append(http.delete(f"/api/v1/leases/{lease_id}").status_code)

    racers = [threading.Thread(target=release, args=(url,)) for url in urls]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=60)
    return answers
