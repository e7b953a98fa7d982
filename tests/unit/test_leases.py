"""Lease logic that needs no engine: targets and the first-come-first-served queue."""

from __future__ import annotations

from controller.services.lease_runtime import LeaseRuntime
from controller.services.leases import Target


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
