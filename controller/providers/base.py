"""The one interface between Shopfloor and wherever machines live.

Everything the controller asks of an engine goes through :class:`Provider`; nothing else
imports the engine's SDK. Specs and answers are plain dataclasses so fakes are easy.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

NetworkPolicy = Literal["none", "egress"]
StreamName = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class Bind:
    host_path: str
    container_path: str
    read_only: bool = True


@dataclass(frozen=True)
class ScratchMount:
    """A folder of the machine kept on its scratch disk (see ``ContainerSpec.scratch_bytes``)."""

    container_path: str
    uid: int = 0
    mode: int = 0o1777


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    labels: dict[str, str]
    workspace_volume: str
    binds: list[Bind] = field(default_factory=list)
    cpus: float = 1.0
    memory_mb: int = 1024
    pids_limit: int = 512
    network: NetworkPolicy = "none"
    cap_add: list[str] = field(default_factory=list)
    publish_ports: list[int] = field(default_factory=list)
    """Container ports to publish on 127.0.0.1 at an engine-chosen host port."""
    env: dict[str, str] = field(default_factory=dict)
    scratch_bytes: int = 0
    """Size of one disk holding every ``scratch_mounts`` folder; 0: they stay in the
    container's writable layer (no limit)."""
    scratch_mounts: list[ScratchMount] = field(default_factory=list)
    shm_bytes: int = 0
    """Size of /dev/shm; 0: the engine's default (64 MiB)."""
    tmpfs: dict[str, str] = field(default_factory=dict)
    """Small sized tmpfs mounts (path -> mount options, e.g. ``size=1m``)."""
    host: str = "local"
    """The host (engine) of the fleet the machine was placed on (issue 14)."""


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    labels: dict[str, str]
    status: str
    """Engine words: created, running, paused, restarting, exited, dead."""
    created_at: datetime
    ports: dict[int, int] = field(default_factory=dict)
    """Container port -> host port on 127.0.0.1."""
    host: str = "local"
    """The host (engine) of the fleet it runs on."""

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    labels: dict[str, str]
    created_at: datetime | None
    host: str = "local"


@dataclass(frozen=True)
class ImageInfo:
    id: str
    tags: list[str]
    labels: dict[str, str]
    created_at: datetime | None
    size_bytes: int


@dataclass(frozen=True)
class VolumeSnapshot:
    """A frozen copy of a workspace volume, kept by the provider under ``name``."""

    name: str
    labels: dict[str, str]
    created_at: datetime | None


class ExecHandle(Protocol):
    """A started command: iterate its output, then ask for its exit code."""

    def __iter__(self) -> Iterator[tuple[StreamName, bytes]]: ...

    def exit_code(self) -> int | None: ...


class DuplexStream(Protocol):
    """stdin/stdout of a process in the machine, shaped like a socket (what paramiko needs).

    ``recv`` returns b"" at end of stream and raises ``TimeoutError`` (``socket.timeout``)
    when a timeout set by ``settimeout`` passes; ``_closed`` says whether it was closed.
    """

    _closed: bool

    def send(self, data: bytes) -> int: ...

    def recv(self, n: int) -> bytes: ...

    def settimeout(self, timeout: float | None) -> None: ...

    def close(self) -> None: ...

    def stderr_tail(self) -> bytes:
        """The last bytes the process wrote to stderr (for error messages)."""
        ...


class Provider(Protocol):
    def ping(self) -> None: ...

    # the fleet (issue 14): one engine per host
    def hosts(self) -> list[str]:
        """The hosts whose engines this provider reaches (``["local"]`` for one engine)."""
        ...

    def on_host(self, host: str) -> Provider:
        """The provider of one host's engine alone (reconcile compares host by host; a
        machine is made on the host placement chose)."""
        ...

    def engine_version(self) -> str: ...

    def image_id(self, ref: str) -> str | None:
        """The image's content id (``sha256:…``), None when the engine lacks it."""
        ...

    def save_image(self, ref: str) -> Iterator[bytes]:
        """The image as a ``docker save`` tarball, in chunks."""
        ...

    def load_image(self, chunks: Iterable[bytes]) -> None:
        """``docker load`` of a tarball streamed in chunks."""
        ...

    def put_archive(self, name_or_id: str, path: str, tarball: bytes) -> None:
        """Unpack a tar into the container's filesystem at ``path`` (as the engine: root)."""
        ...

    def data_root(self) -> str:
        """The folder where the engine keeps its data (layers, volumes) on its host
        (``docker info``: DockerRootDir). Every machine's workspace lies under it."""
        ...

    # images
    def image_exists(self, ref: str) -> bool: ...

    def pull_image(self, ref: str) -> bool: ...

    def build_image(self, context: Path, tag: str, buildargs: dict[str, str]) -> None: ...

    def import_image(self, tarball: Path, tag: str) -> None: ...

    # volumes
    def create_volume(self, name: str, labels: dict[str, str], size_bytes: int = 0) -> None:
        """A named volume; ``size_bytes`` > 0 gives it a disk of that size when this
        provider can (``disk_usage`` then answers for it)."""
        ...

    def remove_volume(self, name: str) -> None: ...

    def disk_usage(self, volume: str) -> tuple[int, int] | None:
        """(used, limit) bytes of a sized volume; None when it has no disk of its own."""
        ...

    def remove_stray_disks(self, keep: set[str], grace_s: float) -> list[str]:
        """Remove the disks whose volume or container (by name) is not in ``keep`` and is
        older than ``grace_s``; answer their names."""
        ...

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]: ...

    # snapshots (issue 15): a machine's disk state saved, and machines started from it
    def snapshot_volume(
        self, volume: str, name: str, labels: dict[str, str], helper_image: str
    ) -> int:
        """Keep a frozen copy of ``volume`` as the volume snapshot ``name``; answer the bytes
        it holds. Copy-on-write where the provider can (disk images on a filesystem that
        shares blocks), else a whole copy made in a short-lived container of
        ``helper_image``. The caller keeps writers still (the machine paused). Leaves
        nothing behind on failure; a full store raises :class:`InsufficientStorage`."""
        ...

    def flush_volume(self, volume: str) -> None:
        """Write the volume's pending data down before a snapshot (with the machine still
        running), so that :meth:`snapshot_volume` has little left to do while it is paused."""
        ...

    def volume_from_snapshot(
        self, name: str, volume: str, labels: dict[str, str], helper_image: str
    ) -> None:
        """A new volume ``volume`` whose content is the volume snapshot ``name``."""
        ...

    def remove_volume_snapshot(self, name: str) -> None: ...

    def list_volume_snapshots(self, labels: dict[str, str]) -> list[VolumeSnapshot]: ...

    def snapshots_share_blocks(self) -> bool:
        """Whether volume snapshots and the volumes made from them are copy-on-write (fast
        whatever the size) rather than whole copies."""
        ...

    def checkpoint_unsupported(self) -> str | None:
        """Why this engine cannot save a running container's memory (CRIU checkpoints), or
        None when it can."""
        ...

    def commit_container(self, name_or_id: str, image: str, labels: dict[str, str]) -> str:
        """Save the container's filesystem (not its volumes or bind mounts) as ``image``
        with ``labels`` (the container's other labels are blanked); answer the image id."""
        ...

    def image_info(self, ref: str) -> ImageInfo | None: ...

    def list_images(self, labels: dict[str, str]) -> list[ImageInfo]: ...

    def remove_image(self, ref: str) -> None: ...

    # containers
    def run_container(self, spec: ContainerSpec) -> ContainerInfo: ...

    def inspect_container(self, name_or_id: str) -> ContainerInfo | None: ...

    def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]: ...

    def start_container(self, name_or_id: str) -> None: ...

    def stop_container(self, name_or_id: str, timeout_s: int = 5) -> None: ...

    def remove_container(self, name_or_id: str) -> None: ...

    def pause_container(self, name_or_id: str) -> None:
        """Freeze every process of the container with its memory (cgroup freezer)."""
        ...

    def unpause_container(self, name_or_id: str) -> None: ...

    # commands
    def exec(
        self,
        name_or_id: str,
        argv: list[str],
        *,
        user: str = "runner",
        workdir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ExecHandle: ...

    def connect_loopback(
        self, name_or_id: str, port: int, *, timeout_s: float
    ) -> socket.socket | None:
        """A TCP connection to ``port`` on the machine's own loopback, made from inside its
        network namespace: no engine in the path, whatever the machine's network. None when
        this engine cannot (a remote engine, a controller without the rights, nothing
        listening): callers fall back to :meth:`open_stream`."""
        ...

    def connect_unix(self, name_or_id: str, path: str, *, timeout_s: float) -> socket.socket | None:
        """A connection to the Unix socket at ``path`` in the machine's own filesystem (as
        the machine's root sees it), made from the host: no engine in the path. None when
        this engine cannot (a remote engine, a controller without the rights, nothing
        listening there)."""
        ...

    def open_stream(
        self,
        name_or_id: str,
        argv: list[str],
        *,
        user: str = "root",
        env: dict[str, str] | None = None,
    ) -> DuplexStream:
        """Start ``argv`` in the machine with stdin attached; talk to it like a socket.

        The SSH transport runs ``sshd -i`` this way, so it reaches every machine through
        the engine, whatever its network (``none`` included).
        """
        ...
