"""The fleet provider's routing (pure): each call goes to the engine of the name's host."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from controller.errors import EngineError
from controller.providers.base import ContainerInfo, ContainerSpec, VolumeInfo
from controller.providers.fleet import FleetProvider

NOW = datetime.now(UTC)


class Engine:
    """Records the calls it gets; ``down`` makes every call fail like a silent engine."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.closed = False

    def _call(self, what: str, name: str) -> None:
        if self.down:
            raise EngineError(f"{self.name} is down")
        self.calls.append((what, name))

    def run_container(self, spec: ContainerSpec) -> ContainerInfo:
        self._call("run", spec.name)
        return ContainerInfo(spec.name, spec.name, {}, "running", NOW)

    def start_container(self, name: str) -> None:
        self._call("start", name)

    def remove_volume(self, name: str) -> None:
        self._call("remove_volume", name)

    def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]:
        self._call("list", "")
        return [ContainerInfo(f"{self.name}-c", f"{self.name}-c", {}, "running", NOW)]

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        self._call("list", "")
        return [VolumeInfo(f"{self.name}-v", {}, NOW)]

    def disk_usage(self, volume: str) -> tuple[int, int] | None:
        return (1, 2)

    def close(self) -> None:
        self.closed = True


def fleet(where: dict[str, str], engines: dict[str, Engine]) -> tuple[FleetProvider, list[str]]:
    asked: list[str] = []

    def locate(name: str) -> str | None:
        asked.append(name)
        return where.get(name)

    def connect(host: str) -> Any:
        return engines.get(host)

    made = FleetProvider(engines["local"], locate=locate, connect=connect)  # type: ignore[arg-type]
    return made, asked


def test_a_call_goes_to_the_engine_of_the_names_host_looked_up_once() -> None:
    engines = {"local": Engine("local"), "far": Engine("far")}
    provider, asked = fleet({"shopfloor-m-1": "far"}, engines)
    provider.start_container("shopfloor-m-1")
    provider.start_container("shopfloor-m-1")
    assert engines["far"].calls == [("start", "shopfloor-m-1")] * 2
    assert asked == ["shopfloor-m-1"]  # the database is asked once per name
    provider.start_container("unknown")  # not a machine of the database: the local engine
    assert engines["local"].calls == [("start", "unknown")]


def test_a_machine_is_made_on_its_spec_host_and_remembered() -> None:
    engines = {"local": Engine("local"), "far": Engine("far")}
    provider, asked = fleet({}, engines)
    spec = ContainerSpec("c", "img", {}, workspace_volume="v", host="far")
    provider.run_container(spec)
    provider.remove_volume("v")
    assert engines["far"].calls == [("run", "c"), ("remove_volume", "v")]
    assert asked == []


def test_remote_volumes_have_no_disk_of_ours() -> None:
    engines = {"local": Engine("local"), "far": Engine("far")}
    provider, _ = fleet({"v-far": "far"}, engines)
    assert provider.disk_usage("v-far") is None
    assert provider.disk_usage("v-here") == (1, 2)


def test_lists_gather_every_host_and_leave_out_a_silent_one() -> None:
    engines = {"local": Engine("local"), "far": Engine("far")}
    provider, _ = fleet({}, engines)
    provider.on_host("far")
    found = provider.list_containers({})
    assert {(c.name, c.host) for c in found} == {("local-c", "local"), ("far-c", "far")}
    engines["far"].down = True
    assert [c.host for c in provider.list_volumes({})] == ["local"]
    engines["local"].down = True
    with pytest.raises(EngineError):  # nobody answered: not "nothing exists"
        provider.list_containers({})


def test_an_unregistered_host_is_an_engine_error_and_removal_closes_the_client() -> None:
    engines = {"local": Engine("local"), "far": Engine("far")}
    provider, _ = fleet({}, engines)
    with pytest.raises(EngineError, match="not registered"):
        provider.on_host("nowhere")
    provider.on_host("far")
    provider.remove_engine("far")
    assert engines["far"].closed
    provider.remove_engine("local")  # the local engine stays
    assert provider.hosts() == ["local"]
