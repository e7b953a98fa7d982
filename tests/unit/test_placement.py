"""The placement choice (pure): state, labels, capacity, spread and pack, and the reasons."""

from __future__ import annotations

import pytest

from controller.errors import Conflict, LimitReached
from controller.services.placement import Load, Need, choose

NEED = Need(cpus=1, memory_mb=1024, disk_gb=12)


def host(name: str, **kwargs: object) -> Load:
    values: dict[str, object] = {"state": "ready", "labels": {}}
    values.update(kwargs)
    return Load(name=name, **values)  # type: ignore[arg-type]


def test_spread_takes_the_least_loaded_host() -> None:
    hosts = [
        host("a", cpus=4, used_cpus=3, machines=3),
        host("b", cpus=4, used_cpus=1, machines=1),
        host("c", cpus=4, used_cpus=2, machines=2),
    ]
    assert choose(hosts, NEED) == "b"


def test_pack_takes_the_most_loaded_host_that_still_has_room() -> None:
    hosts = [
        host("a", cpus=4, used_cpus=3.5, machines=3),  # no room for one more CPU
        host("b", cpus=4, used_cpus=1, machines=1),
        host("c", cpus=4, used_cpus=2, machines=2),
    ]
    assert choose(hosts, NEED, "pack") == "c"


def test_ties_break_on_the_name_both_ways() -> None:
    hosts = [host("b"), host("a"), host("c")]
    assert choose(hosts, NEED) == "a"
    assert choose(hosts, NEED, "pack") == "a"


def test_unlimited_hosts_spread_by_machine_count() -> None:
    hosts = [host("a", machines=2), host("b", machines=1)]
    assert choose(hosts, NEED) == "b"


def test_a_pool_spreads_its_own_machines_first() -> None:
    hosts = [
        host("a", machines=0, pool_machines=1),
        host("b", machines=5, pool_machines=0),
    ]
    assert choose(hosts, Need(cpus=1, memory_mb=64, disk_gb=0, pool="p")) == "b"


@pytest.mark.parametrize(
    ("full", "what"),
    [
        ({"cpus": 2, "used_cpus": 1.5}, "cpus: 1.5 of 2 reserved, the machine needs 1"),
        ({"memory_mb": 2048, "used_memory_mb": 1536}, "memory_mb: 1536 MB of 2048 MB"),
        ({"disk_gb": 20, "used_disk_gb": 12}, "disk_gb: 12 GB of 20 GB reserved"),
        ({"max_machines": 3, "machines": 3}, "machines: 3 of 3 reserved"),
    ],
)
def test_each_resource_is_checked_and_named(full: dict[str, float], what: str) -> None:
    with pytest.raises(LimitReached) as refused:
        choose([host("a", **full)], NEED)
    assert what in refused.value.message
    assert refused.value.status_code == 429


def test_cordoned_draining_unreachable_and_unlabelled_hosts_are_refused_with_why() -> None:
    hosts = [
        host("a", state="cordoned"),
        host("b", state="draining"),
        host("c", state="unreachable"),
        host("d", labels={"gpu": "0"}),
    ]
    with pytest.raises(Conflict) as refused:
        choose(hosts, Need(cpus=1, memory_mb=64, disk_gb=0, host_labels={"gpu": "1"}))
    message = refused.value.message
    assert "a: cordoned" in message
    assert "b: draining" in message
    assert "c: unreachable" in message
    assert "d: lacks labels gpu=1" in message
    assert refused.value.status_code == 409


def test_labels_pick_the_host_that_carries_them() -> None:
    hosts = [host("a"), host("b", labels={"zone": "x", "gpu": "1"})]
    assert choose(hosts, Need(cpus=1, memory_mb=64, disk_gb=0, host_labels={"zone": "x"})) == "b"


def test_no_host_at_all_says_how_to_add_one() -> None:
    with pytest.raises(Conflict, match="PUT /api/v1/hosts"):
        choose([], NEED)


def test_capacity_is_never_exceeded_by_a_sequence_of_choices() -> None:
    """Reserve as the database would after each choice: no host goes over its capacity,
    and the counts stay within one of each other."""
    loads = {n: {"cpus": 0.0, "machines": 0} for n in ("a", "b", "c")}

    def hosts() -> list[Load]:
        return [
            host(n, cpus=3.0, max_machines=5, used_cpus=v["cpus"], machines=int(v["machines"]))
            for n, v in loads.items()
        ]

    need = Need(cpus=0.5, memory_mb=64, disk_gb=0)
    for _ in range(15):
        name = choose(hosts(), need)
        loads[name]["cpus"] += 0.5
        loads[name]["machines"] += 1
        counts = [v["machines"] for v in loads.values()]
        assert max(counts) - min(counts) <= 1
    with pytest.raises(LimitReached):
        choose(hosts(), need)
    assert all(v["cpus"] <= 3.0 and v["machines"] <= 5 for v in loads.values())
