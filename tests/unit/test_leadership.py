"""The leader lease (one row, one conditional UPDATE) and the shared install id."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from controller.errors import Conflict
from controller.services import leadership
from controller.store.db import make_engine, migrate, unit_of_work


@pytest.fixture
def db(tmp_path: Path) -> Engine:
    url = f"sqlite:///{tmp_path / 'data' / 'db.sqlite'}"
    migrate(url)
    return make_engine(url)


def test_one_leader_at_a_time_and_the_fence_grows_with_each_takeover(db: Engine) -> None:
    assert leadership.try_lead(db=db, name="loops", holder="a", ttl_s=0.3) == 1
    assert leadership.try_lead(db=db, name="loops", holder="b", ttl_s=0.3) is None
    assert leadership.try_lead(db=db, name="loops", holder="a", ttl_s=0.3) == 1  # renewed
    time.sleep(0.4)  # a stopped heartbeating
    assert leadership.try_lead(db=db, name="loops", holder="b", ttl_s=5) == 2
    assert leadership.try_lead(db=db, name="loops", holder="a", ttl_s=5) is None
    with unit_of_work(db) as tx:
        leadership.check_fence(tx, name="loops", holder="b", fence=2)
    with pytest.raises(Conflict), unit_of_work(db) as tx:
        leadership.check_fence(tx, name="loops", holder="a", fence=1)
    leadership.step_down(db=db, name="loops", holder="b")
    assert leadership.try_lead(db=db, name="loops", holder="a", ttl_s=5) == 3


def test_every_controller_on_a_database_uses_the_first_ones_install_id(
    db: Engine, tmp_path: Path
) -> None:
    first = leadership.shared_install_id(db=db, data_dir=tmp_path / "one")
    second = leadership.shared_install_id(db=db, data_dir=tmp_path / "two")
    assert first == second == (tmp_path / "one" / "install-id").read_text().strip()


def test_the_sqlite_database_is_made_private(tmp_path: Path) -> None:
    migrate(f"sqlite:///{tmp_path / 'data' / 'shopfloor.db'}")
    assert stat.S_IMODE((tmp_path / "data" / "shopfloor.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
