"""Plain SQL on the driver's connection: values as SQLAlchemy stores them, and group commit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from controller.errors import Conflict
from controller.store.db import make_engine
from controller.store.rawsql import GroupCommit, Sql, Tx, Work, transaction

_CREATE = Sql("CREATE TABLE marks (name TEXT PRIMARY KEY, at TIMESTAMP, data JSON)")
_MARK = Sql("INSERT INTO marks (name, at, data) VALUES (:name, :at, :data)")
_ALL = Sql("SELECT name, at, data FROM marks ORDER BY name")


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'raw.db'}")
    with transaction(engine) as tx:
        tx.run(_CREATE)
    return engine


def _names(engine: Engine) -> list[str]:
    with transaction(engine, write=False) as tx:
        return [row["name"] for row in tx.rows(_ALL)]


def test_postgres_text_takes_psycopg_parameters() -> None:
    sql = Sql("SELECT id FROM t WHERE a = :a AND b::text = :b_2 {skip_locked}")
    assert (
        sql.postgres
        == "SELECT id FROM t WHERE a = %(a)s AND b::text = %(b_2)s FOR UPDATE SKIP LOCKED"
    )
    assert sql.sqlite == "SELECT id FROM t WHERE a = :a AND b::text = :b_2 "


def test_values_round_trip_as_sqlalchemy_stores_them(engine: Engine) -> None:
    at = datetime(2026, 11, 26, 1, 2, 3, 45, tzinfo=UTC)
    with transaction(engine) as tx:
        tx.run(_MARK, name="a'; DROP TABLE marks; --", at=at, data={"k": [1, "é"]})
    with transaction(engine, write=False) as tx:
        (row,) = tx.rows(_ALL)
    assert row == {"name": "a'; DROP TABLE marks; --", "at": at, "data": {"k": [1, "é"]}}
    with engine.connect() as conn:  # the text SQLAlchemy writes for a DATETIME, sortable
        assert conn.exec_driver_sql("SELECT at FROM marks").scalar() == "2026-11-26 01:02:03.000045"


def test_error_rolls_the_transaction_back(engine: Engine) -> None:
    def mark_then_fail() -> None:
        with transaction(engine) as tx:
            _mark("lost", fail=True)(tx)

    with pytest.raises(Conflict):
        mark_then_fail()
    assert _names(engine) == []


def _mark(name: str, fail: bool = False) -> Work[Tx]:
    def work(tx: Tx) -> Tx:
        tx.run(_MARK, name=name, at=None, data=None)
        if fail:
            raise Conflict(f"{name} fails")
        return tx

    return work


def test_requests_arriving_together_share_one_commit_and_fail_alone(engine: Engine) -> None:
    async def arrive_together() -> list[Tx | BaseException]:
        group = GroupCommit(engine)
        works = [_mark("a"), _mark("b", fail=True), _mark("c")]
        return await asyncio.gather(*(group.run(w) for w in works), return_exceptions=True)

    first, failed, third = asyncio.run(arrive_together())
    assert first is third  # one transaction for the three
    assert isinstance(failed, Conflict)
    assert _names(engine) == ["a", "c"]  # b's insert went with its savepoint


def test_a_lone_request_commits_alone_and_its_error_reaches_it(engine: Engine) -> None:
    async def one_after_another() -> None:
        group = GroupCommit(engine)
        await group.run(_mark("a"))
        with pytest.raises(Conflict, match="b fails"):
            await group.run(_mark("b", fail=True))

    asyncio.run(one_after_another())
    assert _names(engine) == ["a"]
