"""The hosts of the fleet: register, list, cordon, drain, remove; place; copy images.

A host is one Docker engine (``local`` is SHOPFLOOR_DOCKER_HOST's, registered at start-up
with no capacity limit, so a single-host install changes nothing). Registering a host
connects and pings its engine first: a wrong address or bad TLS files are refused with the
engine's reason. Placement (:func:`place`) reads the hosts and what their live machines
reserve and records the choice in the caller's transaction, which holds the host rows
(PostgreSQL: ``SELECT … FOR UPDATE``; SQLite: the write lock every write transaction
takes), so two controllers never overbook a host. A host that lacks an image gets it
streamed from the local engine (``save`` → ``load`` over its engine API), once per host
and image, with its progress on the host's record.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.domain import HostCapacity, HostSpec
from controller.errors import Conflict, EngineError, ImageNotFound, InvalidInput, NotFound
from controller.providers.base import Provider
from controller.providers.docker import DockerProvider, EngineTLS
from controller.providers.fleet import LOCAL, FleetProvider
from controller.services import placement
from controller.services.runtime import Controller
from controller.settings import Settings
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.models import ALIVE_STATES, Host, HostState, Machine, MachineState, utcnow

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SCHEMES = ("unix", "ssh", "tcp")
PROGRESS_EVERY_S = 1.0
"""How often an image copy writes its progress to the host's record."""
DEFAULT_LOCAL_URL = "unix:///var/run/docker.sock"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            f"host name {name!r} must be 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class HostView:
    """A host with what its live machines reserve and its machines counted by state."""

    host: Host
    used: dict[str, float]
    free: dict[str, float | None]
    machines: dict[str, int]


_COPIES: dict[tuple[str, str], threading.Lock] = {}
_COPIES_LOCK = threading.Lock()


_HAVE: set[tuple[str, str]] = set()
"""(host, image) pairs this process saw on the host with the local content: provisioning
there asks no engine again (``forget_image`` when a run finds it gone)."""


def forget_image(host: str, image: str) -> None:
    with _COPIES_LOCK:
        _HAVE.discard((host, image))


def _copy_lock(host: str, image: str) -> threading.Lock:
    """One copy of an image to a host at a time in this process; the next caller waits."""
    with _COPIES_LOCK:
        return _COPIES.setdefault((host, image), threading.Lock())


def fleet(ctl: Controller) -> FleetProvider | None:
    return ctl.provider if isinstance(ctl.provider, FleetProvider) else None


# ---------------------------------------------------------------- engines


def check_url(url: str, tls: EngineTLS | None) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in _SCHEMES:
        raise InvalidInput(
            f"host url {url!r} must start with unix://, ssh:// or tcp:// (the engine's address)"
        )
    if parsed.scheme == "unix" and not parsed.path.startswith("/"):
        raise InvalidInput(f"host url {url!r}: a unix socket needs an absolute path")
    if parsed.scheme in ("ssh", "tcp") and not parsed.hostname:
        raise InvalidInput(f"host url {url!r} names no host")
    if parsed.scheme == "tcp" and tls is None:
        raise InvalidInput(
            f"host url {url!r}: a tcp:// engine needs client TLS files "
            '("tls": {"ca", "cert", "key"}); an engine without TLS would take orders from anyone'
        )
    if parsed.scheme != "tcp" and tls is not None:
        raise InvalidInput("tls files are for tcp:// engines only")
    return url


def _tls(host: Host) -> EngineTLS | None:
    return EngineTLS(**host.tls) if host.tls else None


def open_engine(url: str, tls: EngineTLS | None, timeout_s: float) -> DockerProvider:
    """A provider for a remote host's engine (no local disks, no namespace shortcuts)."""
    return DockerProvider(url, tls=tls, timeout_s=max(1, round(timeout_s)), remote=True)


def connector(db: Engine) -> Callable[[str], Provider | None]:
    """``FleetProvider``'s ``connect``: a provider for a registered host not connected yet."""

    def connect(name: str) -> Provider | None:
        with unit_of_work(db) as tx:
            host = tx.get(Host, name)
        if host is None or name == LOCAL:
            return None
        return open_engine(host.url, _tls(host), timeout_s=120)

    return connect


def locator(db: Engine) -> Callable[[str], str | None]:
    """``FleetProvider``'s ``locate``: the host of a machine's container or volume name."""

    def locate(name: str) -> str | None:
        query = select(Machine.host).where(
            (col(Machine.container_name) == name) | (col(Machine.volume_name) == name)
        )
        with unit_of_work(db) as tx:
            return tx.exec(query.limit(1)).first()

    return locate


def register_local(*, ctl: Controller) -> None:
    """The engine of SHOPFLOOR_DOCKER_HOST is the host ``local``: recorded at start-up
    (no capacity limits unless ops set some), so one host behaves as before."""
    url = ctl.settings.docker_host or DEFAULT_LOCAL_URL
    try:
        version: str | None = ctl.provider.on_host(LOCAL).engine_version()
    except EngineError:
        version = None
    with unit_of_work(ctl.db) as tx:
        host = tx.get(Host, LOCAL)
        if host is None:
            tx.add(Host(name=LOCAL, url=url, engine_version=version, last_heartbeat=utcnow()))
            events.record(tx, "host.added", LOCAL, url=url)
        elif host.url != url or host.engine_version != version:
            host.url, host.engine_version, host.updated_at = url, version, utcnow()
            tx.add(host)


# ---------------------------------------------------------------- the registry


def put_host(*, ctl: Controller, name: str, spec: HostSpec) -> HostView:
    """Add or change a host. Its engine must answer now (422 with the engine's reason)."""
    check_name(name)
    tls = EngineTLS(**spec.tls.model_dump()) if spec.tls else None
    if name == LOCAL:
        local_url = ctl.settings.docker_host or DEFAULT_LOCAL_URL
        if spec.url != local_url or tls is not None:
            raise InvalidInput(
                f"host local is this controller's own engine ({local_url}, "
                "SHOPFLOOR_DOCKER_HOST): its url cannot change here; give another host a name"
            )
        version = ctl.provider.on_host(LOCAL).engine_version()
        engine: DockerProvider | None = None
    else:
        check_url(spec.url, tls)
        engine, version = _probe(spec.url, tls, ctl.settings.host_connect_timeout_s)
    try:
        view, moved = _record(ctl, name, spec, version)
    finally:
        if engine is not None:
            engine.close()  # the probe; the fleet keeps a client of its own
    provider = fleet(ctl)
    if engine is not None:
        if provider is not None and (moved or name not in provider.connected()):
            provider.add_engine(name, open_engine(spec.url, tls, timeout_s=120))
        ctl.workers.submit(sync_images, ctl=ctl, host=name)  # the runner image, meanwhile
    return view


def _record(ctl: Controller, name: str, spec: HostSpec, version: str) -> tuple[HostView, bool]:
    """The host's record; and whether its address changed (a new engine client then)."""
    with unit_of_work(ctl.db) as tx:
        host = tx.get(Host, name)
        created = host is None
        host = host or Host(name=name, url=spec.url)
        new_tls = spec.tls.model_dump() if spec.tls else {}
        moved = created or host.url != spec.url or (host.tls or {}) != new_tls
        if not created and host.url != spec.url and _alive_on(tx, name):
            raise Conflict(
                f"host {name} has machines: its url cannot change (drain it, remove them, "
                "or register the new engine under another name)"
            )
        host.url, host.tls, host.labels = spec.url, new_tls, dict(spec.labels)
        _set_capacity(host, spec.capacity)
        host.engine_version, host.last_heartbeat, host.updated_at = version, utcnow(), utcnow()
        if host.state == HostState.unreachable:  # it answered just now
            host.state = host.state_before or HostState.ready
            host.state_before, host.reason = None, None
        tx.add(host)
        events.record(tx, "host.added" if created else "host.updated", name, url=spec.url)
        return _view(tx, host, ctl.settings), moved


def _probe(url: str, tls: EngineTLS | None, timeout_s: float) -> tuple[DockerProvider, str]:
    try:
        engine = open_engine(url, tls, timeout_s)
    except EngineError as exc:
        raise InvalidInput(f"cannot use the engine at {url}: {exc.message}") from exc
    try:
        engine.ping()
        return engine, engine.engine_version()
    except EngineError as exc:
        engine.close()
        raise InvalidInput(f"the engine at {url} does not answer: {exc.message}") from exc


def _set_capacity(host: Host, capacity: HostCapacity) -> None:
    host.cpus, host.memory_mb = capacity.cpus, capacity.memory_mb
    host.disk_gb, host.max_machines = capacity.disk_gb, capacity.machines


def get_host(tx: Session, name: str) -> Host:
    host = tx.get(Host, name)
    if host is None:
        known = ", ".join(sorted(tx.exec(select(Host.name)))) or "none"
        raise NotFound(f"unknown host {name!r}; hosts: {known}")
    return host


def list_hosts(*, ctl: Controller) -> list[HostView]:
    with unit_of_work(ctl.reader) as tx:
        found = list(tx.exec(select(Host).order_by(col(Host.name))))
        return [_view(tx, host, ctl.settings) for host in found]


def show_host(*, ctl: Controller, name: str) -> HostView:
    with unit_of_work(ctl.reader) as tx:
        return _view(tx, get_host(tx, name), ctl.settings)


def set_state(*, ctl: Controller, name: str, action: str) -> HostView:
    """cordon (no new machine), drain (cordon, and the pools move their ready machines
    away; leased ones finish first), uncordon (ready again)."""
    target = {
        "cordon": HostState.cordoned,
        "drain": HostState.draining,
        "uncordon": HostState.ready,
    }[action]
    with unit_of_work(ctl.db) as tx:
        host = get_host(tx, name)
        if host.state == HostState.unreachable:  # applies when its engine answers again
            host.state_before, host.updated_at = target, utcnow()
            tx.add(host)
            events.record(tx, f"host.{target.value}", name, previous="unreachable")
            return _view(tx, host, ctl.settings)
        if host.state != target:
            previous = host.state
            host.state, host.reason, host.updated_at = target, None, utcnow()
            tx.add(host)
            events.record(tx, f"host.{target.value}", name, previous=previous.value)
        return _view(tx, host, ctl.settings)


def delete_host(*, ctl: Controller, name: str) -> None:
    if name == LOCAL:
        raise Conflict("host local is this controller's own engine: it cannot be removed")
    with unit_of_work(ctl.db) as tx:
        host = get_host(tx, name)
        alive = _alive_on(tx, name)
        if alive:
            raise Conflict(
                f"host {name} still has {alive} machines: drain it and destroy them first",
                machines=alive,
            )
        tx.delete(host)
        events.record(tx, "host.removed", name)
    provider = fleet(ctl)
    if provider is not None:
        provider.remove_engine(name)
    with _PROBES_LOCK:
        gone = [key for key in _PROBES if key[0] == name]
        probes = [_PROBES.pop(key) for key in gone]
    for probe in probes:
        probe.close()


def _alive_on(tx: Session, name: str) -> int:
    query = select(func.count()).where(
        Machine.host == name, col(Machine.state).in_([s.value for s in ALIVE_STATES])
    )
    return int(tx.exec(query).one())


def disk_reservation_gb(settings: Settings) -> float:
    """What one machine reserves of a host's disk: its workspace and scratch disks."""
    return (settings.workspace_disk_bytes + settings.scratch_disk_bytes) / 1024**3


def _view(tx: Session, host: Host, settings: Settings) -> HostView:
    states = Counter(
        MachineState(s).value
        for s in tx.exec(select(Machine.state).where(Machine.host == host.name))
        if s != MachineState.destroyed
    )
    load = _loads(tx, settings, [host], pool=None)[0]
    used = {
        "cpus": load.used_cpus,
        "memory_mb": load.used_memory_mb,
        "disk_gb": load.used_disk_gb,
        "machines": load.machines,
    }
    capacity = {
        "cpus": host.cpus,
        "memory_mb": host.memory_mb,
        "disk_gb": host.disk_gb,
        "machines": host.max_machines,
    }
    free = {k: (None if cap is None else max(0, cap - used[k])) for k, cap in capacity.items()}
    return HostView(host=host, used=used, free=free, machines=dict(states))


# ---------------------------------------------------------------- placement


def _loads(
    tx: Session, settings: Settings, hosts: list[Host], pool: str | None
) -> list[placement.Load]:
    alive = [s.value for s in ALIVE_STATES]
    sums = tx.exec(
        select(Machine.host, func.count(), func.sum(Machine.cpus), func.sum(Machine.memory_mb))
        .where(col(Machine.state).in_(alive))
        .group_by(Machine.host)
    ).all()
    by_host = {row[0]: row for row in sums}
    in_pool: dict[str, int] = {}
    if pool is not None:
        rows = tx.exec(
            select(Machine.host, func.count())
            .where(col(Machine.state).in_(alive), Machine.pool == pool)
            .group_by(Machine.host)
        ).all()
        in_pool = {row[0]: int(row[1]) for row in rows}
    per_disk = disk_reservation_gb(settings) if settings.disk_limits else 0.0
    loads = []
    for host in hosts:
        _, count, cpus, memory = by_host.get(host.name, (host.name, 0, 0.0, 0))
        loads.append(
            placement.Load(
                name=host.name,
                state=host.state.value,
                labels=dict(host.labels),
                cpus=host.cpus,
                memory_mb=host.memory_mb,
                disk_gb=host.disk_gb,
                max_machines=host.max_machines,
                used_cpus=float(cpus or 0.0),
                used_memory_mb=int(memory or 0),
                used_disk_gb=int(count or 0) * per_disk,
                machines=int(count or 0),
                pool_machines=in_pool.get(host.name, 0),
            )
        )
    return loads


def place(
    tx: Session,
    *,
    settings: Settings,
    cpus: float,
    memory_mb: int,
    host_labels: dict[str, str],
    pool: str | None,
) -> str:
    """Choose the host of a new machine inside the caller's transaction, which then records
    the machine: the host rows stay locked until it commits (PostgreSQL ``FOR UPDATE``;
    SQLite's write transactions hold the database's write lock from their start)."""
    query = select(Host).order_by(col(Host.name))
    if tx.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    hosts = list(tx.exec(query))
    need = placement.Need(
        cpus=cpus,
        memory_mb=memory_mb,
        disk_gb=disk_reservation_gb(settings) if settings.disk_limits else 0.0,
        host_labels=host_labels,
        pool=pool,
    )
    return placement.choose(_loads(tx, settings, hosts, pool), need, settings.placement)


# ---------------------------------------------------------------- images


def _pullable(image: str) -> bool:
    """A reference naming a registry (``registry.example:5000/app:1``) is pulled."""
    first = image.split("/", 1)[0]
    return "/" in image and ("." in first or ":" in first or first == "localhost")


def sync_images(*, ctl: Controller, host: str) -> None:
    """What a joining host needs: the runner image (logged, not raised: in the background)."""
    try:
        ensure_image(db=ctl.db, provider=ctl.provider, host=host, image=ctl.default_image)
    except Exception as exc:  # noqa: BLE001 - recorded on the host; provisioning retries
        log.warning("could not give host %s the image %s: %s", host, ctl.default_image, exc)


def ensure_image(*, db: Engine, provider: Provider, host: str, image: str) -> None:
    """Make sure ``host`` has ``image`` with the local engine's content (same image id):
    pulled where the reference names a registry, else streamed from the local engine.
    Once per host and image at a time; a second caller waits for the first."""
    if host == LOCAL or (host, image) in _HAVE:
        return
    engine = provider.on_host(host)
    local = provider.on_host(LOCAL)
    with _copy_lock(host, image):
        if (host, image) in _HAVE:
            return  # copied while this caller waited
        want = local.image_id(image)
        have = engine.image_id(image)
        if have is not None and (want is None or have == want):
            _image_state(db, host, image, {"state": "ready", "id": have})
            return
        if _pullable(image) and engine.pull_image(image):
            have = engine.image_id(image)
            if have is not None and (want is None or have == want):
                _image_state(db, host, image, {"state": "ready", "id": have})
                return
        if want is None:
            reason = f"neither the local engine nor host {host} has image {image!r}"
            _image_state(db, host, image, {"state": "failed", "reason": reason})
            raise ImageNotFound(reason)
        _stream(db, host, image, local, engine, want)


def _stream(
    db: Engine, host: str, image: str, local: Provider, engine: Provider, want: str
) -> None:
    started = time.monotonic()
    sent = [0]
    last = [started]

    def chunks() -> Iterator[bytes]:
        for chunk in local.save_image(image):
            sent[0] += len(chunk)
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                _image_state(db, host, image, {"state": "loading", "bytes": sent[0]})
            yield chunk

    _image_state(db, host, image, {"state": "loading", "bytes": 0})
    try:
        engine.load_image(chunks())
        have = engine.image_id(image)
        if have != want:
            raise EngineError(f"host {host} loaded image {image} as {have}, not {want}")
    except EngineError as exc:
        _image_state(db, host, image, {"state": "failed", "reason": exc.message})
        raise
    seconds = round(time.monotonic() - started, 1)
    _image_state(
        db, host, image, {"state": "ready", "id": want, "bytes": sent[0], "seconds": seconds}
    )
    log.info("host %s got image %s (%d bytes in %.1fs)", host, image, sent[0], seconds)


def _image_state(db: Engine, host: str, image: str, state: dict[str, Any]) -> None:
    if state["state"] == "ready":
        with _COPIES_LOCK:
            _HAVE.add((host, image))
    with unit_of_work(db) as tx:
        row = tx.get(Host, host)
        if row is None:
            return
        known = dict((row.images or {}).get(image) or {})
        known.pop("at", None)
        if state["state"] == "ready" and known.get("state") == "ready":
            return  # already recorded (a copy's figures stay)
        if known == state:
            return
        row.images = {**(row.images or {}), image: {**state, "at": utcnow().isoformat()}}
        tx.add(row)


# ---------------------------------------------------------------- heartbeat


def connect_all(*, ctl: Controller) -> None:
    """Every controller keeps an engine for every registered host (one added through
    another controller included) and drops the removed ones."""
    provider = fleet(ctl)
    if provider is None:
        return
    with unit_of_work(ctl.reader) as tx:
        rows = {h.name: h for h in tx.exec(select(Host))}
    connected = provider.connected()
    for name in connected - set(rows) - {LOCAL}:
        provider.remove_engine(name)


def heartbeat(*, ctl: Controller) -> list[str]:
    """Ping every host's engine; record the answer. A host silent for longer than
    ``host_timeout_s`` becomes unreachable; one that answers again is ready. Answers the
    names of the hosts that became unreachable on this tick (the caller loses their
    machines)."""
    with unit_of_work(ctl.reader) as tx:
        rows = list(tx.exec(select(Host)))
    answers: dict[str, tuple[bool, str]] = {}
    for host in rows:
        answers[host.name] = _ping(ctl, host)
    lost: list[str] = []
    now = utcnow()
    timeout = timedelta(seconds=ctl.settings.host_timeout_s)
    with unit_of_work(ctl.db) as tx:
        for name, (ok, detail) in answers.items():
            found = tx.get(Host, name)
            if found is None:
                continue
            host = found
            if ok:
                host.last_heartbeat, host.engine_version = now, detail
                if host.state == HostState.unreachable:
                    host.state = host.state_before or HostState.ready
                    host.state_before, host.reason = None, None
                    events.record(tx, "host.back", name, state=host.state.value)
            else:
                seen = host.last_heartbeat or host.created_at
                if seen.tzinfo is None:
                    seen = seen.replace(tzinfo=UTC)
                if host.state != HostState.unreachable and now - seen > timeout:
                    host.state_before, host.state = host.state, HostState.unreachable
                    host.reason = f"its engine has not answered since {seen.isoformat()}: {detail}"
                    events.record(tx, "host.unreachable", name, reason=host.reason)
                    lost.append(name)
                elif host.state == HostState.unreachable:
                    host.reason = f"its engine has not answered since {seen.isoformat()}: {detail}"
            host.updated_at = now
            tx.add(host)
    return lost


_PROBES: dict[tuple[str, str, str], DockerProvider] = {}
"""Heartbeat clients with the short timeout, one per host address (an ssh:// host keeps its
connection between ticks); dropped when their engine fails to answer."""
_PROBES_LOCK = threading.Lock()


def _ping(ctl: Controller, host: Host) -> tuple[bool, str]:
    """Whether the engine answers within the connect timeout, and its version or error."""
    try:
        if host.name == LOCAL:
            engine: Provider = ctl.provider.on_host(LOCAL)
            engine.ping()
            return True, engine.engine_version()
        key = (host.name, host.url, repr(sorted((host.tls or {}).items())))
        with _PROBES_LOCK:
            probe = _PROBES.get(key)
        if probe is None:
            probe = open_engine(host.url, _tls(host), ctl.settings.host_connect_timeout_s)
            with _PROBES_LOCK:
                _PROBES[key] = probe
        try:
            probe.ping()
            return True, probe.engine_version()
        except EngineError:
            with _PROBES_LOCK:
                _PROBES.pop(key, None)
            probe.close()
            raise
    except EngineError as exc:
        return False, exc.message
