"""Lease logic that needs no engine: targets and the first-come-first-served queue."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from controller.errors import EngineError
from controller.services import leases, machines
from controller.services.lease_runtime import LeaseRuntime
from controller.services.leases import Target
from controller.services.runtime import Controller
from controller.store.db import make_engine, migrate, unit_of_work
from controller.store.models import Machine, MachineState, Pool


def test_selector_labels_must_all_match() -> None:
    target = Target(repo="r", labels=(("gpu", "no"), ("team", "web")))
    assert target.matches_labels({"team": "web", "gpu": "no", "extra": "x"})
    assert not target.matches_labels({"team": "web"})
    assert not target.matches_labels({"team": "api", "gpu": "no"})
    assert Target(pool="p").matches_labels({})


def test_waiters_are_served_in_arrival_order_per_target() -> None:
    rt = LeaseRuntime()
    woken: list[str] = []
    first = rt.join(Target(pool="a").key, lambda: woken.append("first"))
    second = rt.join(Target(pool="a").key, lambda: woken.append("second"))
    other = rt.join(Target(pool="b").key, lambda: woken.append("other"))
    assert rt.is_first(first)
    assert rt.is_first(second)  # nobody has waited yet: both may try at once
    first.waiting = True
    assert not rt.is_first(second)  # now it queues behind the one that found nothing
    assert rt.is_first(other)  # another pool's queue is its own

    second.waiting = other.waiting = True  # both asleep now
    rt.leave(first)  # leaving wakes the sleepers, so the next in line looks again
    assert woken == ["second", "other"]
    assert rt.is_first(second)


def test_only_sleeping_requests_are_woken_but_every_notify_counts() -> None:
    rt = LeaseRuntime()
    woken: list[str] = []
    trying = rt.join(Target(pool="a").key, lambda: woken.append("trying"))
    seen = rt.generation
    rt.notify()  # a machine came back while `trying` was looking
    assert woken == []  # it is not asleep: no wake-up needed ...
    assert rt.generation != seen  # ... it sees the change before sleeping and looks again
    rt.leave(trying)  # it never waited, so nobody is woken for its leaving
    assert woken == []


def test_a_hand_over_cut_short_by_the_stop_is_left_to_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller closes its engines while a hand-over runs: the machine must not be
    marked failed (it is fine), only left leased by nobody for the next start's orphan pass.
    The same error while the controller runs marks it failed with the reason."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    with unit_of_work(engine) as tx:
        tx.add(Pool(name="p", reset="keep"))
        for name in ("m-stop", "m-run"):
            tx.add(
                Machine(
                    id=name, state=MachineState.leased, image="x", cpus=1.0, memory_mb=64,
                    labels={}, pool="p", container_name=name, volume_name=name, repo="r",
                )
            )  # fmt: skip

    def engine_gone(**_: object) -> None:
        raise EngineError("no engine for host 'local': it is not registered")

    monkeypatch.setattr(machines, "hand_over", engine_gone)
    stopping = threading.Event()
    ctl = cast(
        Controller,
        SimpleNamespace(db=engine, stopping=stopping, settings=None, provider=None, access=None),
    )
    leases._return(ctl, "m-run", "m-run", "keep")
    stopping.set()
    leases._return(ctl, "m-stop", "m-stop", "keep")
    with unit_of_work(engine) as tx:
        stopped, running = tx.get(Machine, "m-stop"), tx.get(Machine, "m-run")
        assert stopped is not None
        assert running is not None
        assert stopped.state == MachineState.leased
        assert running.state == MachineState.failed
        assert "not registered" in (running.reason or "")
    engine.dispose()
