"""One engine per host behind one :class:`Provider`: every call goes to the right engine.

The fleet holds a provider per host (``local`` is the engine of SHOPFLOOR_DOCKER_HOST,
with its disks and namespace shortcuts; the others are remote engines). A call about a
container or volume goes to the engine of the host that holds it: placement chose that
host and recorded it (the database, which ``locate`` reads once per name); a machine is
made on its host through :meth:`on_host`. Lists gather over every host and say which
host each entry is on; a host whose engine does not answer is left out of a list (reconcile
asks host by host and skips such a host instead of taking its machines for lost).
Images are built and kept on the local engine (the hosts service copies them elsewhere).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from controller.errors import EngineError
from controller.providers.base import (
    ContainerInfo,
    ContainerSpec,
    DuplexStream,
    ExecHandle,
    ImageInfo,
    Provider,
    VolumeInfo,
    VolumeSnapshot,
)

log = logging.getLogger(__name__)
LOCAL = "local"
_Placed = TypeVar("_Placed", ContainerInfo, VolumeInfo)


class FleetProvider:
    """``locate(name)``: the host of a container or volume name (None: unknown, the local
    engine). ``connect(host)``: a provider for a host not connected yet (None: unknown)."""

    def __init__(
        self,
        local: Provider,
        *,
        locate: Callable[[str], str | None],
        connect: Callable[[str], Provider | None],
    ) -> None:
        self._engines: dict[str, Provider] = {LOCAL: local}
        self._where: dict[str, str] = {}
        self._locate = locate
        self._connect = connect
        self._lock = threading.Lock()

    # the hosts
    def add_engine(self, host: str, provider: Provider) -> None:
        with self._lock:
            old = self._engines.get(host)
            self._engines[host] = provider
        if old is not None and old is not provider:
            _close(old)

    def remove_engine(self, host: str) -> None:
        if host == LOCAL:
            return
        with self._lock:
            old = self._engines.pop(host, None)
            self._where = {n: h for n, h in self._where.items() if h != host}
        if old is not None:
            _close(old)

    def connected(self) -> set[str]:
        with self._lock:
            return set(self._engines)

    def hosts(self) -> list[str]:
        with self._lock:
            return sorted(self._engines)

    def on_host(self, host: str) -> Provider:
        with self._lock:
            engine = self._engines.get(host)
        if engine is not None:
            return engine
        made = self._connect(host)
        if made is None:
            raise EngineError(f"no engine for host {host!r}: it is not registered")
        with self._lock:
            engine = self._engines.setdefault(host, made)
        if engine is not made:
            _close(made)
        return engine

    def place(self, name: str, host: str) -> None:
        """Remember where a container or volume lives (saves a database read)."""
        with self._lock:
            self._where[name] = host

    def host_of(self, name: str) -> str:
        with self._lock:
            host = self._where.get(name)
        if host is None:
            host = self._locate(name) or LOCAL
            with self._lock:
                self._where[name] = host
        return host

    def _for(self, name: str) -> Provider:
        return self.on_host(self.host_of(name))

    @property
    def local(self) -> Provider:
        return self._engines[LOCAL]

    def close(self) -> None:
        with self._lock:
            engines = list(self._engines.values())
            self._engines.clear()
        for engine in engines:
            _close(engine)

    # the local engine's business
    def ping(self) -> None:
        self.local.ping()

    def data_root(self) -> str:
        return self.local.data_root()

    def engine_version(self) -> str:
        return self.local.engine_version()

    def image_exists(self, ref: str) -> bool:
        return self.local.image_exists(ref)

    def image_id(self, ref: str) -> str | None:
        return self.local.image_id(ref)

    def pull_image(self, ref: str) -> bool:
        return self.local.pull_image(ref)

    def build_image(self, context: Path, tag: str, buildargs: dict[str, str]) -> None:
        self.local.build_image(context, tag, buildargs)

    def import_image(self, tarball: Path, tag: str) -> None:
        self.local.import_image(tarball, tag)

    def save_image(self, ref: str) -> Iterator[bytes]:
        return self.local.save_image(ref)

    def load_image(self, chunks: Iterable[bytes]) -> None:
        self.local.load_image(chunks)

    def remove_stray_disks(self, keep: set[str], grace_s: float) -> list[str]:
        return self.local.remove_stray_disks(keep, grace_s)  # disks are the local engine's

    # snapshots' parts, the local engine's (the snapshots service asks the engine of each
    # snapshot's host itself, through ``on_host``)
    def snapshot_volume(
        self, volume: str, name: str, labels: dict[str, str], helper_image: str
    ) -> int:
        return self.local.snapshot_volume(volume, name, labels, helper_image)

    def volume_from_snapshot(
        self, name: str, volume: str, labels: dict[str, str], helper_image: str
    ) -> None:
        self.place(volume, LOCAL)
        self.local.volume_from_snapshot(name, volume, labels, helper_image)

    def remove_volume_snapshot(self, name: str) -> None:
        self.local.remove_volume_snapshot(name)

    def list_volume_snapshots(self, labels: dict[str, str]) -> list[VolumeSnapshot]:
        return self.local.list_volume_snapshots(labels)

    def snapshots_share_blocks(self) -> bool:
        return self.local.snapshots_share_blocks()

    def checkpoint_unsupported(self) -> str | None:
        return self.local.checkpoint_unsupported()

    def image_info(self, ref: str) -> ImageInfo | None:
        return self.local.image_info(ref)

    def list_images(self, labels: dict[str, str]) -> list[ImageInfo]:
        return self.local.list_images(labels)

    def remove_image(self, ref: str) -> None:
        self.local.remove_image(ref)

    # one container or volume: its host's engine
    def create_volume(self, name: str, labels: dict[str, str], size_bytes: int = 0) -> None:
        self._for(name).create_volume(name, labels, size_bytes)

    def remove_volume(self, name: str) -> None:
        self._for(name).remove_volume(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._where.pop(name, None)

    def disk_usage(self, volume: str) -> tuple[int, int] | None:
        if self.host_of(volume) != LOCAL:
            return None  # remote machines run without a disk cap of ours
        return self.local.disk_usage(volume)

    def run_container(self, spec: ContainerSpec) -> ContainerInfo:
        self.place(spec.name, spec.host)
        self.place(spec.workspace_volume, spec.host)
        return self.on_host(spec.host).run_container(spec)

    def inspect_container(self, name_or_id: str) -> ContainerInfo | None:
        host = self.host_of(name_or_id)
        found = self.on_host(host).inspect_container(name_or_id)
        return dataclasses.replace(found, host=host) if found else None

    def start_container(self, name_or_id: str) -> None:
        self._for(name_or_id).start_container(name_or_id)

    def stop_container(self, name_or_id: str, timeout_s: int = 5) -> None:
        self._for(name_or_id).stop_container(name_or_id, timeout_s)

    def pause_container(self, name_or_id: str) -> None:
        self._for(name_or_id).pause_container(name_or_id)

    def unpause_container(self, name_or_id: str) -> None:
        self._for(name_or_id).unpause_container(name_or_id)

    def commit_container(self, name_or_id: str, image: str, labels: dict[str, str]) -> str:
        return self._for(name_or_id).commit_container(name_or_id, image, labels)

    def flush_volume(self, volume: str) -> None:
        self._for(volume).flush_volume(volume)

    def remove_container(self, name_or_id: str) -> None:
        self._for(name_or_id).remove_container(name_or_id)
        self._forget(name_or_id)

    def exec(
        self,
        name_or_id: str,
        argv: list[str],
        *,
        user: str = "runner",
        workdir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ExecHandle:
        engine = self._for(name_or_id)
        return engine.exec(name_or_id, argv, user=user, workdir=workdir, env=env)

    def connect_loopback(
        self, name_or_id: str, port: int, *, timeout_s: float
    ) -> socket.socket | None:
        return self._for(name_or_id).connect_loopback(name_or_id, port, timeout_s=timeout_s)

    def connect_unix(self, name_or_id: str, path: str, *, timeout_s: float) -> socket.socket | None:
        return self._for(name_or_id).connect_unix(name_or_id, path, timeout_s=timeout_s)

    def open_stream(
        self,
        name_or_id: str,
        argv: list[str],
        *,
        user: str = "root",
        env: dict[str, str] | None = None,
    ) -> DuplexStream:
        return self._for(name_or_id).open_stream(name_or_id, argv, user=user, env=env)

    def put_archive(self, name_or_id: str, path: str, tarball: bytes) -> None:
        self._for(name_or_id).put_archive(name_or_id, path, tarball)

    # every host
    def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]:
        return self._gather(lambda engine: engine.list_containers(labels))

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        return self._gather(lambda engine: engine.list_volumes(labels))

    def _gather(self, listing: Callable[[Provider], list[_Placed]]) -> list[_Placed]:
        """One list over every host's engine, each entry marked with its host; a host that
        does not answer is left out, unless none answers (an empty list would then say
        "nothing exists")."""
        found: list[_Placed] = []
        answered, error = False, None
        for host in self.hosts():
            try:
                listed = listing(self.on_host(host))
            except EngineError as exc:
                log.info("host %s left out of the list: %s", host, exc.message)
                error = exc
                continue
            found += [dataclasses.replace(entry, host=host) for entry in listed]
            answered = True
        if not answered and error is not None:
            raise error
        return found


def _close(engine: Provider) -> None:
    close = getattr(engine, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - a dead engine's client may fail to close
            log.debug("closing an engine's client failed", exc_info=True)
