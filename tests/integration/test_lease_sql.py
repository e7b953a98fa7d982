"""The lease hot paths' plain SQL (controller/store/rawsql.py) on SQLite and on a real PostgreSQL.

The lease service runs here without HTTP against each database; what it writes is read
back through the ORM, so both layers are seen to agree on timestamps, enums and JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import update
from sqlmodel import col, select

from controller.domain import LeasePublic, LeaseSelector
from controller.errors import Conflict, Forbidden, NotFound
from controller.services import leases
from controller.services.runtime import Controller
from controller.services.startup import build_controller
from controller.settings import Settings
from controller.store import leases as rows
from controller.store.db import unit_of_work
from controller.store.models import (
    ApiToken,
    Event,
    Lease,
    LeaseState,
    Machine,
    MachineState,
    Pool,
    Role,
    utcnow,
)
from controller.store.rawsql import LoopConnections, Sql, transaction


@pytest.fixture(params=["sqlite", "postgres"])
def ctl(request: pytest.FixtureRequest, tmp_path: Path, runner_image: str) -> Iterator[Controller]:
    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    settings = Settings(data_dir=tmp_path / "data", database_url=url, runner_image=runner_image)
    controller = build_controller(settings)
    try:
        _reset_tables(controller)
        _seed(controller)
        yield controller
    finally:
        controller.close()


@pytest.fixture(autouse=True)
def hand_overs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """These machines are rows only, with no container: the hand-over a lease end asks for
    (off the request path, in a worker) is recorded here instead of run."""
    asked: list[tuple[str, str]] = []

    def record(*, ctl: Controller, machine_id: str, policy: str) -> None:
        asked.append((machine_id, policy))

    monkeypatch.setattr(leases, "return_machine", record)
    return asked


def _handed_over(asked: list[tuple[str, str]], machine_id: str) -> bool:
    deadline = time.monotonic() + 10
    while (machine_id, "keep") not in asked:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _reset_tables(ctl: Controller) -> None:
    """The PostgreSQL cluster is shared by the test session: start each test from empty tables."""
    with unit_of_work(ctl.db) as tx:
        for model in (Event, Lease, Machine, Pool, ApiToken):
            for row in tx.exec(select(model)).all():
                tx.delete(row)


def _seed(ctl: Controller) -> None:
    with unit_of_work(ctl.db) as tx:
        tx.add(Pool(name="py", reset="keep"))
        for index, labels in enumerate(({"gpu": "no"}, {"gpu": "yes"})):
            tx.add(
                Machine(
                    id=f"m-{index}",
                    state=MachineState.ready,
                    image="x",
                    cpus=1.0,
                    memory_mb=256,
                    labels=labels,
                    pool="py",
                    container_name=f"c-{index}",
                    volume_name=f"v-{index}",
                    repo="https://example.invalid/r.git",
                )
            )
        tx.add(ApiToken(id="t-agent", role=Role.agent, token_hash="a"))
        tx.add(ApiToken(id="t-other", role=Role.agent, token_hash="b"))


def _owner(ctl: Controller, token_id: str) -> ApiToken:
    with unit_of_work(ctl.db) as tx:
        token = tx.get(ApiToken, token_id)
        assert token is not None
        return token


def _grant(ctl: Controller, **target: object) -> LeasePublic | None:
    chosen = leases.make_target(
        pool=target.get("pool"),  # type: ignore[arg-type]
        machine_id=target.get("machine_id"),  # type: ignore[arg-type]
        selector=target.get("selector"),  # type: ignore[arg-type]
    )
    owner = _owner(ctl, "t-agent")  # before the write transaction, which it would wait for
    with transaction(ctl.db) as tx:
        return leases.grant_in(
            tx,
            target=chosen,
            holder=str(target.get("holder", "agent")),
            ttl_s=60,
            owner=owner,
            requested_at_monotonic=time.monotonic(),
            first_try=True,
        )


def test_grant_renew_release_round_trip(ctl: Controller, hand_overs: list[tuple[str, str]]) -> None:
    hostile = "x'); DROP TABLE leases; --"
    lease = _grant(ctl, pool="py", holder=hostile)
    assert lease is not None
    assert lease.fence == 1

    renewed = leases.renew(db=ctl.db, lease_id=lease.id, caller=_owner(ctl, "t-agent"), ttl_s=600)
    assert renewed.expires_at > lease.expires_at + timedelta(seconds=500)

    with unit_of_work(ctl.db) as tx:
        stored = tx.get(Lease, lease.id)
        machine = tx.get(Machine, lease.machine_id)
        assert stored is not None
        assert machine is not None
        assert stored.holder == hostile
        assert stored.state == LeaseState.active
        assert machine.state == MachineState.leased
        assert stored.acquired_at == lease.acquired_at  # aware, to the microsecond
        assert stored.expires_at == renewed.expires_at
        kinds = [e.kind for e in tx.exec(select(Event).order_by(col(Event.id))).all()]
        granted = tx.exec(select(Event).where(Event.kind == "lease.granted")).one()
        assert granted.data["holder"] == hostile
        assert granted.data["fence"] == 1
    assert kinds == ["machine.state", "lease.granted", "lease.renewed"]

    with pytest.raises(Forbidden):
        leases.release(ctl=ctl, lease_id=lease.id, caller=_owner(ctl, "t-other"))
    ended = leases.release(ctl=ctl, lease_id=lease.id, caller=_owner(ctl, "t-agent"))
    assert ended.state == LeaseState.released
    with pytest.raises(Conflict, match="already released"):
        leases.release(ctl=ctl, lease_id=lease.id, caller=None)
    with unit_of_work(ctl.db) as tx:
        machine = tx.get(Machine, lease.machine_id)
        assert machine is not None
        assert machine.state == MachineState.leased  # by nobody, until its hand-over is done
        assert machine.fence == 2
    assert _handed_over(hand_overs, lease.machine_id)


def test_a_machine_comes_back_only_once_no_lease_holds_it(ctl: Controller) -> None:
    """The hand-over's bookkeeping (``store.leases.coming_back`` and ``settle``, plain SQL
    as every lease end takes it) reads and writes what the ORM does."""
    lease = _grant(ctl, machine_id="m-0")
    assert lease is not None
    handed_over = ("machine.handed_over", "m-0", {"reset": False, "ms": 12.5})
    with transaction(ctl.db) as tx:
        assert rows.coming_back(tx, "m-0") == {
            "state": "leased",
            "container_name": "c-0",
            "unheld": False,
        }
        assert not rows.settle(tx, "m-0", MachineState.ready)  # its holder still has it
        assert rows.coming_back(tx, "m-nope") is None

    leases.release(ctl=ctl, lease_id=lease.id, caller=None)
    before = utcnow()
    with transaction(ctl.db) as tx:
        assert rows.coming_back(tx, "m-0") == {
            "state": "leased",
            "container_name": "c-0",
            "unheld": True,
        }
        later = before + timedelta(hours=1)
        assert [row["id"] for row in rows.orphans(tx, settled_before=later)] == ["m-0"]
        assert rows.settle(tx, "m-0", MachineState.ready, also=(handed_over,))
        assert rows.orphans(tx, settled_before=later) == []
        assert not rows.settle(tx, "m-0", MachineState.failed, "late")  # back already
    with transaction(ctl.db) as tx:
        assert rows.settle(tx, "m-1", MachineState.failed, "never leased") is False

    with unit_of_work(ctl.db) as tx:
        machine = tx.get(Machine, "m-0")
        assert machine is not None
        assert machine.state == MachineState.ready
        assert machine.reason is None
        assert machine.ready_at is not None
        assert machine.ready_at >= before  # aware, and set by the hand-over
        last = tx.exec(select(Event).order_by(col(Event.id).desc()).limit(2)).all()
    assert [(e.kind, e.data) for e in reversed(last)] == [
        ("machine.handed_over", {"reset": False, "ms": 12.5}),
        ("machine.state", {"state": "ready", "previous": "leased", "reason": None}),
    ]


def test_pool_hands_out_each_machine_once(ctl: Controller) -> None:
    first, second = _grant(ctl, pool="py"), _grant(ctl, pool="py")
    assert first is not None
    assert second is not None
    assert {first.machine_id, second.machine_id} == {"m-0", "m-1"}
    assert _grant(ctl, pool="py") is None
    with pytest.raises(NotFound, match="unknown pool 'nope'; pools: py"):
        _grant(ctl, pool="nope")
    with pytest.raises(NotFound, match="no machine m-9"):
        _grant(ctl, machine_id="m-9")


def test_selector_matches_labels(ctl: Controller) -> None:
    selector = LeaseSelector(repo="https://example.invalid/r.git", labels={"gpu": "yes"})
    lease = _grant(ctl, selector=selector)
    assert lease is not None
    assert lease.machine_id == "m-1"
    assert _grant(ctl, selector=selector) is None


def test_reaper_expires_an_unrenewed_lease(
    ctl: Controller, hand_overs: list[tuple[str, str]]
) -> None:
    lease = _grant(ctl, machine_id="m-0")
    assert lease is not None
    with unit_of_work(ctl.db) as tx:
        past = utcnow() - timedelta(seconds=1)
        tx.exec(update(Lease).where(col(Lease.id) == lease.id).values(expires_at=past))
    assert leases.reap(ctl=ctl) == [lease.id]
    with unit_of_work(ctl.db) as tx:
        stored, machine = tx.get(Lease, lease.id), tx.get(Machine, "m-0")
        assert stored is not None
        assert machine is not None
        assert stored.state == LeaseState.expired
        assert stored.ended_at is not None
        assert machine.state == MachineState.leased  # by nobody, until its hand-over is done
    assert _handed_over(hand_overs, "m-0")
    with pytest.raises(Conflict, match="already expired"):
        leases.renew(db=ctl.db, lease_id=lease.id, caller=None)


def test_the_event_loop_lane_writes_what_the_transactions_write(
    ctl: Controller, hand_overs: list[tuple[str, str]]
) -> None:
    """Grant, renew and release from the event loop (``store.leases.LeaseLane``: a group
    commit on SQLite, one statement per round trip on PostgreSQL) leave the same rows and
    events as the transactions above, and refuse what they refuse."""
    owner, other = _owner(ctl, "t-agent"), _owner(ctl, "t-other")

    async def scenario() -> tuple[LeasePublic, LeasePublic, LeasePublic]:
        request = leases.LeaseRequest(
            target=leases.make_target(pool="py", machine_id=None, selector=None),
            holder="x'); DROP TABLE leases; --",
            ttl_s=60,
            wait_s=0,
            owner=owner,
        )
        lease = await leases.acquire_async(ctl=ctl, request=request)
        with pytest.raises(Forbidden):
            await leases.renew_async(ctl=ctl, lease_id=lease.id, caller=other)
        renewed = await leases.renew_async(ctl=ctl, lease_id=lease.id, caller=owner, ttl_s=600)
        with pytest.raises(NotFound, match="no lease l-nope"):
            await leases.release_async(ctl=ctl, lease_id="l-nope", caller=owner)
        with pytest.raises(Forbidden):
            await leases.release_async(ctl=ctl, lease_id=lease.id, caller=other)
        ended = await leases.release_async(ctl=ctl, lease_id=lease.id, caller=owner)
        with pytest.raises(Conflict, match="already released"):
            await leases.release_async(ctl=ctl, lease_id=lease.id, caller=owner)
        with pytest.raises(Conflict, match="already released"):
            await leases.renew_async(ctl=ctl, lease_id=lease.id, caller=owner)
        unknown = leases.LeaseRequest(
            target=leases.Target(pool="nope"), holder="a", ttl_s=60, wait_s=0, owner=owner
        )
        with pytest.raises(NotFound, match="unknown pool 'nope'; pools: py"):
            await leases.acquire_async(ctl=ctl, request=unknown)
        return lease, renewed, ended

    lease, renewed, ended = asyncio.run(scenario())
    assert lease.fence == 1
    assert renewed.expires_at > lease.expires_at + timedelta(seconds=500)
    assert ended.state == LeaseState.released
    with unit_of_work(ctl.db) as tx:
        stored = tx.get(Lease, lease.id)
        machine = tx.get(Machine, lease.machine_id)
        assert stored is not None
        assert machine is not None
        assert stored.holder == "x'); DROP TABLE leases; --"
        assert stored.owner_token_id == "t-agent"
        assert stored.state == LeaseState.released
        assert stored.acquired_at == lease.acquired_at  # aware, to the microsecond
        assert stored.expires_at == renewed.expires_at
        assert stored.ended_at == ended.ended_at
        assert stored.token_hash is not None
        assert machine.state == MachineState.leased  # by nobody, until its hand-over is done
        assert machine.fence == 2
        found = tx.exec(select(Event).order_by(col(Event.id))).all()
    assert [(e.kind, e.subject_id) for e in found] == [
        ("machine.state", lease.machine_id),
        ("lease.granted", lease.id),
        ("lease.renewed", lease.id),
        ("lease.released", lease.id),
    ]
    assert found[0].data == {"state": "leased", "previous": "ready", "reason": None}
    assert found[1].data == {
        "machine_id": lease.machine_id,
        "holder": "x'); DROP TABLE leases; --",
        "fence": 1,
        "ttl_s": 60,
        "wait_ms": lease.wait_ms,
    }
    assert found[2].data == {"expires_at": renewed.expires_at.isoformat()}
    assert found[3].data == {"machine_id": lease.machine_id, "fence": 1}
    assert _handed_over(hand_overs, lease.machine_id)


def test_a_lease_ends_once_when_two_ends_race(ctl: Controller) -> None:
    """A release and the reaper (or two controllers' releases) that both read the lease
    active: one ends it and fences the machine off, the other is refused; one end event."""
    lease = _grant(ctl, machine_id="m-0")
    assert lease is not None
    with transaction(ctl.reader, write=False) as first:
        row = leases.rows.load(first, lease.id)  # the reaper's read: active
    assert row is not None
    asyncio.run(leases.release_async(ctl=ctl, lease_id=lease.id, caller=None))
    with transaction(ctl.db) as late:  # its change, after the release committed
        assert leases.rows.end(late, row, LeaseState.expired, utcnow()) == (False, None)
    with unit_of_work(ctl.db) as tx:
        stored, machine = tx.get(Lease, lease.id), tx.get(Machine, "m-0")
        assert stored is not None
        assert machine is not None
        assert stored.state == LeaseState.released
        assert machine.fence == 2
        ends = tx.exec(
            select(Event).where(col(Event.kind).in_(["lease.released", "lease.expired"]))
        )
        assert len(ends.all()) == 1


def test_statements_that_reach_the_loop_together_commit_together_and_fail_alone(
    postgres_url: str, tmp_path: Path, runner_image: str
) -> None:
    """PostgreSQL's loop connections (``rawsql.LoopConnections``) send the statements of a
    wave as one pipeline and one transaction; when one of them fails, the others are tried
    again alone and hold, and only the failing one is refused."""
    settings = Settings(
        data_dir=tmp_path / "data", database_url=postgres_url, runner_image=runner_image
    )
    controller = build_controller(settings)
    insert = Sql(
        "INSERT INTO events (at, kind, subject_id, data) VALUES (:at, 'test.wave', :subject, "
        "'{}') RETURNING id, txid_current() AS tx"
    )
    divide = Sql("SELECT 1 / CAST(:zero AS integer) AS x")

    async def wave(subjects: range, *, failing: bool) -> list[object]:
        conns = LoopConnections(controller.db)
        try:
            asked = [conns.one(insert, at=utcnow(), subject=str(s)) for s in subjects]
            if failing:
                asked.insert(3, conns.one(divide, zero=0))
            return await asyncio.gather(*asked, return_exceptions=True)
        finally:
            conns.close()

    try:
        _reset_tables(controller)
        together = asyncio.run(wave(range(10), failing=False))
        assert len({row["tx"] for row in together}) == 1, together  # type: ignore[index]
        apart = asyncio.run(wave(range(10, 20), failing=True))
        assert isinstance(apart.pop(3), psycopg.errors.DivisionByZero), apart
        assert len({row["tx"] for row in apart}) == 10, apart  # type: ignore[index]
        with unit_of_work(controller.db) as tx:
            stored = tx.exec(select(Event.subject_id).where(Event.kind == "test.wave")).all()
        assert sorted(stored, key=int) == [str(s) for s in range(20)]
    finally:
        controller.close()


def test_who_may_release_from_the_loop(ctl: Controller) -> None:
    """The rule a release from the loop applies (on PostgreSQL inside its one statement,
    ``acting_for``) is the service's: the token that took the lease or ops; anyone for a
    lease no token took. A refused release leaves the lease active."""
    with unit_of_work(ctl.db) as tx:
        tx.add(ApiToken(id="t-ops", role=Role.ops, token_hash="c"))
    agent, other, ops = _owner(ctl, "t-agent"), _owner(ctl, "t-other"), _owner(ctl, "t-ops")

    def release(lease_id: str, caller: ApiToken | None) -> LeasePublic:
        return asyncio.run(leases.release_async(ctl=ctl, lease_id=lease_id, caller=caller))

    taken = _grant(ctl, machine_id="m-0")  # by t-agent
    assert taken is not None
    with pytest.raises(Forbidden, match="taken by another token"):
        release(taken.id, other)
    with unit_of_work(ctl.db) as tx:
        stored = tx.get(Lease, taken.id)
        assert stored is not None
        assert stored.state == LeaseState.active
    assert release(taken.id, ops).state == LeaseState.released
    with pytest.raises(Conflict, match="already released"):
        release(taken.id, agent)

    with unit_of_work(ctl.db) as tx:
        tx.exec(update(Machine).where(col(Machine.id) == "m-1").values(state=MachineState.ready))
    with transaction(ctl.db) as tx:
        unowned = leases.rows.grant(
            tx, filters={"id": "m-1"}, labels_fit=None, holder="h", ttl_s=60,
            owner_token_id=None, token_hash="x", wait_ms=0.0,
        )  # fmt: skip
    assert unowned is not None
    assert release(unowned["id"], other).state == LeaseState.released
