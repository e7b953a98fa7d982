"""The reconcile rules on a fake engine: pure logic, no Docker."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from controller.errors import EngineError
from controller.providers.base import ContainerInfo, ImageInfo, VolumeInfo, VolumeSnapshot
from controller.services import machines
from controller.services.reconcile import STRAY_PAUSE_S, ReconcileReport, fail_interrupted
from controller.services.reconcile import reconcile as reconcile_engine
from controller.services.runtime import DiskWatch
from controller.store.db import make_engine, migrate, unit_of_work
from controller.store.models import Event, Machine, MachineState, Snapshot

OLD = datetime.now(UTC) - timedelta(hours=1)


class FakeEngine:
    def __init__(self) -> None:
        self.containers: dict[str, ContainerInfo] = {}
        self.volumes: dict[str, VolumeInfo] = {}
        self.fail = False
        self.disks: dict[str, tuple[int, int]] = {}
        """volume name -> (used, limit)"""
        self.stray_disks: set[str] = set()
        self.images: dict[str, ImageInfo] = {}
        self.snapshot_copies: dict[str, VolumeSnapshot] = {}

    def add(self, machine_id: str, status: str = "running", created: datetime = OLD) -> None:
        labels = {machines.LABEL_CONTROLLER: "me", machines.LABEL_MACHINE: machine_id}
        name = machines.container_name(machine_id)
        self.containers[name] = ContainerInfo(name, name, labels, status, created)
        vol = machines.volume_name(machine_id)
        self.volumes[vol] = VolumeInfo(vol, labels, created)

    def hosts(self) -> list[str]:
        return ["local"]

    def on_host(self, host: str) -> FakeEngine:
        assert host == "local"
        return self

    def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]:
        if self.fail:
            raise EngineError("engine down")
        return list(self.containers.values())

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        if self.fail:
            raise EngineError("engine down")
        return list(self.volumes.values())

    def remove_container(self, name: str) -> None:
        del self.containers[name]

    def remove_volume(self, name: str) -> None:
        del self.volumes[name]

    def disk_usage(self, volume: str) -> tuple[int, int] | None:
        return self.disks.get(volume)

    def remove_stray_disks(self, keep: set[str], grace_s: float) -> list[str]:
        gone = sorted(d for d in self.stray_disks if d not in keep)
        self.stray_disks -= set(gone)
        return gone

    def start_container(self, name: str) -> None:
        info = self.containers[name]
        self.containers[name] = ContainerInfo(
            info.id, info.name, info.labels, "running", info.created_at
        )

    unpause_container = start_container

    def list_images(self, labels: dict[str, str]) -> list[ImageInfo]:
        return list(self.images.values())

    def remove_image(self, ref: str) -> None:
        del self.images[ref]

    def list_volume_snapshots(self, labels: dict[str, str]) -> list[VolumeSnapshot]:
        return list(self.snapshot_copies.values())

    def remove_volume_snapshot(self, name: str) -> None:
        del self.snapshot_copies[name]


@pytest.fixture
def db(tmp_path: Path) -> Engine:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    return make_engine(url)


def add_machine(db: Engine, machine_id: str, state: MachineState) -> None:
    with unit_of_work(db) as tx:
        tx.add(
            Machine(
                id=machine_id,
                state=state,
                image="img",
                cpus=1,
                memory_mb=64,
                container_name=machines.container_name(machine_id),
                volume_name=machines.volume_name(machine_id),
            )
        )


class FakeAccess:
    """Records which machines' channels were closed."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def close_machine(self, *, machine: Machine, why: str) -> None:
        self.closed.append(machine.id)


def reconcile(
    db: Engine, engine: FakeEngine, access: FakeAccess | None = None, now: datetime | None = None
) -> ReconcileReport:
    return reconcile_engine(
        db=db,
        provider=engine,  # type: ignore[arg-type]
        access=access or FakeAccess(),  # type: ignore[arg-type]
        install_id="me",
        grace_s=60,
        now=now,
    )


def state_of(db: Engine, machine_id: str) -> MachineState:
    with unit_of_work(db) as tx:
        machine = tx.get(Machine, machine_id)
        assert machine
        return machine.state


def test_vanished_container_makes_machine_lost_and_closes_its_channels(db: Engine) -> None:
    add_machine(db, "m-1", MachineState.ready)
    access = FakeAccess()
    report = reconcile(db, FakeEngine(), access)
    assert report.lost == ["m-1"]
    assert state_of(db, "m-1") == MachineState.lost
    assert access.closed == ["m-1"]


def test_provisioning_machine_without_container_is_left_to_its_worker(db: Engine) -> None:
    add_machine(db, "m-1", MachineState.provisioning)
    assert reconcile(db, FakeEngine()).lost == []


def test_orphans_older_than_grace_are_removed_young_ones_kept(db: Engine) -> None:
    engine = FakeEngine()
    engine.add("m-old")
    engine.add("m-young", created=datetime.now(UTC))
    report = reconcile(db, engine)
    assert report.removed_containers == ["shopfloor-m-old"]
    assert report.removed_volumes == ["shopfloor-ws-m-old"]
    assert "shopfloor-m-young" in engine.containers


def test_containers_of_failed_or_destroyed_machines_are_orphans(db: Engine) -> None:
    engine = FakeEngine()
    for machine_id, state in (("m-f", MachineState.failed), ("m-d", MachineState.destroyed)):
        add_machine(db, machine_id, state)
        engine.add(machine_id)
    reconcile(db, engine)
    assert engine.containers == {}
    assert engine.volumes == {}


def test_engine_error_removes_nothing_and_marks_nothing(db: Engine) -> None:
    add_machine(db, "m-1", MachineState.ready)
    engine = FakeEngine()
    engine.add("m-orphan")
    engine.fail = True
    report = reconcile(db, engine)
    assert report.engine_error == "engine down"
    assert state_of(db, "m-1") == MachineState.ready
    assert "shopfloor-m-orphan" in engine.containers


def test_exited_container_of_ready_machine_is_started(db: Engine) -> None:
    add_machine(db, "m-1", MachineState.ready)
    engine = FakeEngine()
    engine.add("m-1", status="exited")
    assert reconcile(db, engine).restarted == ["m-1"]
    assert engine.containers["shopfloor-m-1"].status == "running"


def test_stopped_machine_is_not_restarted(db: Engine) -> None:
    add_machine(db, "m-1", MachineState.stopped)
    engine = FakeEngine()
    engine.add("m-1", status="exited")
    assert reconcile(db, engine).restarted == []


def test_near_full_workspace_is_measured_and_reported_once(db: Engine) -> None:
    add_machine(db, "m-1", MachineState.ready)
    engine = FakeEngine()
    engine.add("m-1")
    volume = machines.volume_name("m-1")
    watch = DiskWatch()

    def run() -> ReconcileReport:
        return reconcile_engine(
            db=db,
            provider=engine,  # type: ignore[arg-type]
            access=FakeAccess(),  # type: ignore[arg-type]
            install_id="me",
            grace_s=60,
            disk_watch=watch,
            near_full=0.9,
        )

    engine.disks[volume] = (50, 100)
    assert run().near_full == []
    assert watch.usage == {"m-1": (50, 100)}
    engine.disks[volume] = (95, 100)
    assert run().near_full == ["m-1"]
    assert run().near_full == []  # still full: no second event
    engine.disks[volume] = (10, 100)
    run()
    engine.disks[volume] = (91, 100)
    assert run().near_full == ["m-1"]  # crossed again after it was freed
    with unit_of_work(db) as tx:
        kinds = [e.kind for e in tx.exec(select(Event).where(Event.subject_id == "m-1"))]
    assert kinds.count("machine.disk_near_full") == 2


def test_stray_disks_are_removed_but_not_those_of_live_volumes(db: Engine) -> None:
    add_machine(db, "m-1", MachineState.ready)
    engine = FakeEngine()
    engine.add("m-1")
    engine.stray_disks = {machines.volume_name("m-1"), "shopfloor-ws-gone"}
    assert reconcile(db, engine).removed_disks == ["shopfloor-ws-gone"]


def test_a_container_the_engine_holds_paused_is_thawed_unless_paused_or_snapshotted(
    db: Engine,
) -> None:
    """A controller killed mid-snapshot leaves its source paused in the engine."""
    for machine_id, state in (
        ("m-1", MachineState.ready),
        ("m-2", MachineState.paused),
        ("m-3", MachineState.leased),
    ):
        add_machine(db, machine_id, state)
    with unit_of_work(db) as tx:
        tx.add(Snapshot(machine_id="m-3"))  # being taken now
    engine = FakeEngine()
    for machine_id in ("m-1", "m-2", "m-3"):
        engine.add(machine_id, status="paused")
    # not at first sight: a snapshot may have paused it a moment ago
    assert reconcile(db, engine).resumed == []
    later = datetime.now(UTC) + timedelta(seconds=STRAY_PAUSE_S + 1)
    assert reconcile(db, engine, now=later).resumed == ["m-1"]
    assert engine.containers["shopfloor-m-1"].status == "running"
    assert engine.containers["shopfloor-m-2"].status == "paused"
    assert engine.containers["shopfloor-m-3"].status == "paused"
    assert state_of(db, "m-2") == MachineState.paused  # a paused machine is not lost
    del engine.containers["shopfloor-m-2"]  # unless its container vanished
    assert reconcile(db, engine, now=later).lost == ["m-2"]


def test_snapshot_parts_are_removed_only_without_their_record(db: Engine) -> None:
    with unit_of_work(db) as tx:
        tx.add(Snapshot(id="snap-kept", machine_id="m-1"))
    engine = FakeEngine()
    for snapshot_id in ("snap-kept", "snap-gone"):
        labels = {machines.LABEL_CONTROLLER: "me", machines.LABEL_SNAPSHOT: snapshot_id}
        ref = f"shopfloor/snapshot:{snapshot_id}"
        engine.images[ref] = ImageInfo(ref, [ref], labels, OLD, 1)
        name = f"shopfloor-snap-{snapshot_id}"
        engine.snapshot_copies[name] = VolumeSnapshot(name, labels, OLD)
        engine.volumes[name] = VolumeInfo(name, labels, OLD)  # a whole copy is a volume
    report = reconcile(db, engine)
    assert sorted(report.removed_snapshot_parts) == [
        "shopfloor-snap-snap-gone",
        "shopfloor/snapshot:snap-gone",
    ]
    assert report.removed_volumes == []  # not a machine's orphan
    assert list(engine.images) == ["shopfloor/snapshot:snap-kept"]
    assert list(engine.snapshot_copies) == ["shopfloor-snap-snap-kept"]


class FakeFleet:
    """Two fake engines, one per host, behind the fleet's two calls reconcile makes."""

    def __init__(self) -> None:
        self.engines = {"local": FakeEngine(), "far": FakeEngine()}

    def hosts(self) -> list[str]:
        return sorted(self.engines)

    def on_host(self, host: str) -> FakeEngine:
        return self.engines[host]

    def disk_usage(self, volume: str) -> tuple[int, int] | None:
        return None

    def remove_stray_disks(self, keep: set[str], grace_s: float) -> list[str]:
        return []


def test_a_host_that_does_not_answer_is_skipped_not_lost(db: Engine) -> None:
    add_machine(db, "m-here", MachineState.ready)
    add_machine(db, "m-far", MachineState.ready)
    add_machine(db, "m-gone", MachineState.ready)
    with unit_of_work(db) as tx:
        for machine_id in ("m-far", "m-gone"):
            machine = tx.get(Machine, machine_id)
            assert machine
            machine.host = "far"
            tx.add(machine)
    fleet = FakeFleet()
    fleet.engines["local"].add("m-here")
    fleet.engines["far"].add("m-far")
    fleet.engines["far"].fail = True
    report = reconcile(db, fleet)  # type: ignore[arg-type]
    assert report.lost == []
    assert report.skipped == {"far": "engine down"}
    assert report.engine_error is None
    assert state_of(db, "m-far") == MachineState.ready

    fleet.engines["far"].fail = False  # back: only what vanished there is lost
    report = reconcile(db, fleet)  # type: ignore[arg-type]
    assert report.lost == ["m-gone"]
    assert state_of(db, "m-far") == MachineState.ready


def test_a_provisioning_cut_short_by_the_stop_is_failed_by_the_next_start(
    db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller closes its engines while its pool loop provisions: the machine must not
    be failed with the engines' reason ("no engine for host"), only left to the next start,
    which fails it as interrupted and removes what was made. The same error while the
    controller runs fails it with that reason."""

    def engine_gone(*_: object) -> None:
        raise EngineError("no engine for host 'local': it is not registered")

    monkeypatch.setattr(machines, "_build", engine_gone)
    engine, stopping = FakeEngine(), threading.Event()
    for machine_id in ("m-run", "m-stop"):
        add_machine(db, machine_id, MachineState.provisioning)
        engine.add(machine_id)  # what the build had made before the error

    def provision(machine_id: str) -> None:
        machines.provision(
            db=db,
            provider=engine,  # type: ignore[arg-type]
            settings=None,  # type: ignore[arg-type]
            install_id="me",
            machine_id=machine_id,
            stopping=stopping,
        )

    provision("m-run")
    stopping.set()
    provision("m-stop")
    with unit_of_work(db) as tx:
        running, stopped = tx.get(Machine, "m-run"), tx.get(Machine, "m-stop")
        assert running is not None
        assert stopped is not None
        assert (running.state, stopped.state) == (MachineState.failed, MachineState.provisioning)
        assert "not registered" in (running.reason or "")
    assert list(engine.containers) == [machines.container_name("m-stop")]  # left as it was

    assert fail_interrupted(db=db, provider=engine) == ["m-stop"]  # type: ignore[arg-type]
    with unit_of_work(db) as tx:
        stopped = tx.get(Machine, "m-stop")
        assert stopped is not None
        assert stopped.state == MachineState.failed
        assert stopped.reason == "controller restarted while provisioning"
    assert engine.containers == {}
    assert engine.volumes == {}
