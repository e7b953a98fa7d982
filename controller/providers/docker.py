"""The Docker engine behind the :class:`Provider` interface (docker SDK; local or ssh:// hosts)."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.tls import TLSConfig
from docker.types import Mount
from paramiko.ssh_exception import SSHException
from requests.exceptions import RequestException

from controller.errors import EngineError, ImageNotFound, InsufficientStorage
from controller.providers.base import (
    ContainerInfo,
    ContainerSpec,
    ImageInfo,
    StreamName,
    VolumeInfo,
    VolumeSnapshot,
)
from controller.providers.disks import DiskDir, DiskStore
from controller.providers.netns import connect_in_namespace
from controller.providers.procdirs import FirstProcess, ProcessDir, ProcessDirs

log = logging.getLogger(__name__)
LOCAL_ENGINE_URL = "http+docker://localhost"
"""docker-py's base URL for an engine on a local unix socket."""
ENGINE_FAILURES = (docker.errors.DockerException, SSHException, RequestException)
"""What a failed engine call raises: the SDK's errors, an ssh:// host's, and the HTTP
library's (a timeout of an engine that stopped answering is not wrapped by the SDK)."""
JUST_STARTED = timedelta(seconds=10)
LISTENER_WAIT_S = 2.0
"""How long :meth:`DockerProvider.connect_loopback` waits for a just-started machine's
listener."""


_RFC3339 = re.compile(
    r"(?P<head>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<frac>\d+))?(?P<zone>Z|[+-]\d\d:\d\d)?$",
    re.IGNORECASE,
)


def _parse_time(value: str | None) -> datetime | None:
    """The engine's RFC 3339 times: nanoseconds or no fraction at all (volumes), ``Z`` or an
    offset. None when missing, unreadable or the zero time (never happened)."""
    match = _RFC3339.match((value or "").strip())
    if match is None:
        return None
    frac = (match["frac"] or "")[:6].ljust(6, "0")  # Python keeps microseconds
    zone = match["zone"] or "Z"
    zone = "+00:00" if zone.upper() == "Z" else zone
    parsed = datetime.fromisoformat(f"{match['head']}.{frac}{zone}")
    return None if parsed.year <= 1 else parsed


def _label_filters(labels: dict[str, str]) -> list[str]:
    return [f"{k}={v}" if v else k for k, v in labels.items()]


class DockerExec:
    """A started ``docker exec``: yields demultiplexed output, then its exit code."""

    def __init__(self, api: Any, exec_id: str) -> None:
        self._api = api
        self._exec_id = exec_id

    def __iter__(self) -> Iterator[tuple[StreamName, bytes]]:
        for out, err in self._api.exec_start(self._exec_id, stream=True, demux=True):
            if out:
                yield "stdout", out
            if err:
                yield "stderr", err

    def exit_code(self) -> int | None:
        code = self._api.exec_inspect(self._exec_id).get("ExitCode")
        return int(code) if code is not None else None


class DemuxedStream:
    """The hijacked connection of a ``docker exec`` without a tty, as a socket of stdout.

    Without a tty the engine frames output: an 8-byte header (stream, 0, 0, 0, big-endian
    length) before each chunk; stdin goes up unframed. ``recv`` hands out stdout bytes only
    and keeps the last stderr bytes for error messages. One thread reads; writers are
    serialised by the caller (paramiko's packetizer holds its own lock).
    """

    STDERR_KEEP = 8192

    def __init__(self, raw: Any, keepalive: Any = None) -> None:
        self._raw = raw
        self._sock = getattr(raw, "_sock", raw)  # SocketIO wraps the real socket
        self._keepalive = keepalive
        self._buf = bytearray()
        self._stream = 1
        self._left = 0
        self._stderr = bytearray()
        self._closed = False

    def send(self, data: bytes) -> int:
        sent: int = self._sock.send(data)
        return sent

    def recv(self, n: int) -> bytes:
        while True:
            if self._left == 0 and len(self._buf) >= 8:
                self._stream = self._buf[0]
                self._left = int.from_bytes(self._buf[4:8], "big")
                del self._buf[:8]
                continue
            if self._left and self._buf:
                take = min(n, self._left, len(self._buf))
                chunk = bytes(self._buf[:take])
                del self._buf[:take]
                self._left -= take
                if self._stream == 1:
                    return chunk
                self._keep_stderr(chunk)
                continue
            more = self._sock.recv(65536)  # a timeout leaves the state intact
            if not more:
                return b""
            self._buf += more

    def _keep_stderr(self, chunk: bytes) -> None:
        self._stderr += chunk
        del self._stderr[: -self.STDERR_KEEP]

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def stderr_tail(self) -> bytes:
        return bytes(self._stderr)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for closing in (self._sock, self._raw, self._keepalive):
            try:
                if closing is not None:
                    closing.close()
            except Exception:  # noqa: BLE001, S110 - closing a dead connection may fail
                pass


_COPY_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"]
"""What ``cp -a`` as root needs to read every file of a volume and keep owners and modes
(DAC_OVERRIDE reads and searches every directory too). Not DAC_READ_SEARCH: it opens
``open_by_handle_at`` to the helper, the call of the known container escape."""
LABEL_SNAPSHOT = "shopfloor.snapshot"
PAUSE_ATTEMPTS = 5


def _volume_disk(name: str) -> str:
    return f"volume-{name}"


def _container_disk(name: str) -> str:
    return f"container-{name}"


class DockerProvider:
    """``disks``: where sized disks live (loop-mounted files, :mod:`disks`); None: sizes are
    ignored. Used only with an engine on this host (it mounts what this host mounted)."""

    def __init__(
        self,
        base_url: str | None = None,
        disks: DiskStore | None = None,
        *,
        tls: EngineTLS | None = None,
        timeout_s: int = 120,
        remote: bool = False,
    ) -> None:
        """``tls``: client TLS files of a ``tcp://`` engine. ``remote``: an engine of another
        host of the fleet (no disks, no namespace shortcuts, whatever its address says: a
        nested engine's unix socket looks local, but its pids are not this host's)."""
        try:
            if base_url:
                self.client = docker.DockerClient(
                    base_url=base_url,
                    timeout=timeout_s,
                    tls=_tls_config(tls) if tls else False,
                    use_ssh_client=False,  # paramiko: no docker CLI needed on the controller
                )
            else:
                self.client = docker.from_env(timeout=timeout_s)
        except ENGINE_FAILURES as exc:
            raise EngineError(f"cannot reach the Docker engine: {exc}") from exc
        except (OSError, ValueError, SSHException, RequestException) as exc:  # ssh://, address
            raise EngineError(f"cannot reach the Docker engine at {base_url}: {exc}") from exc
        self.api = self.client.api
        on_unix_socket = self.api.base_url == LOCAL_ENGINE_URL
        if on_unix_socket:
            # A unix socket goes through no proxy, yet requests reads the proxy variables
            # on every call: ~0.15 ms of CPU, a quarter of a ping (tcp:// engines keep them).
            self.api.trust_env = False
        self.local = not remote and on_unix_socket
        """Whether the engine runs on this host (it may use /proc and mounts of this host)."""
        self._data_root: str | None = None
        self._process_dirs = ProcessDirs()
        """The machines' first processes, kept open for the channels (see procdirs.py)."""
        self.disks: DiskStore | None = None
        if disks is not None:
            if not self.local:
                log.warning("disk limits are off: the engine is not on this host")
            else:
                self.disks = disks
                disks.start()  # remount after a host reboot, make the spares

    def close(self) -> None:
        if self.disks is not None:
            self.disks.close()
        self._process_dirs.close()
        self.client.close()

    def ping(self) -> None:
        with _engine_errors("ping the engine"):
            self.client.ping()

    def hosts(self) -> list[str]:
        return ["local"]

    def on_host(self, host: str) -> DockerProvider:
        if host != "local":
            raise EngineError(f"no engine for host {host!r}: this controller has one engine")
        return self

    def engine_version(self) -> str:
        with _engine_errors("ask the engine for its version"):
            return str(self.client.version().get("Version", "unknown"))

    def image_id(self, ref: str) -> str | None:
        try:
            return str(self.api.inspect_image(ref)["Id"])  # type: ignore[no-untyped-call]
        except docker.errors.ImageNotFound:
            return None
        except ENGINE_FAILURES as exc:
            raise EngineError(f"cannot look up image {ref}: {exc}") from exc

    def save_image(self, ref: str) -> Iterator[bytes]:
        with _engine_errors(f"save image {ref}"):
            chunks = self.api.get_image(ref, chunk_size=1024 * 1024)
        try:
            yield from chunks
        except ENGINE_FAILURES as exc:
            raise EngineError(f"cannot save image {ref}: {exc}") from exc

    def load_image(self, chunks: Iterable[bytes]) -> None:
        with _engine_errors("load an image"):
            # Progress lines; a failure is one of them.
            for answer in self.api.load_image(chunks):  # type: ignore[no-untyped-call]
                if isinstance(answer, dict) and answer.get("error"):
                    raise EngineError(f"cannot load the image: {answer['error']}")

    def put_archive(self, name_or_id: str, path: str, tarball: bytes) -> None:
        with _engine_errors(f"copy files into {name_or_id}"):
            if not self.api.put_archive(name_or_id, path, tarball):
                raise EngineError(f"cannot copy files into {name_or_id}:{path}")

    def data_root(self) -> str:
        if self._data_root is None:  # an engine's data root does not move while it runs
            with _engine_errors("ask the engine for its data root"):
                self._data_root = str(self.client.info()["DockerRootDir"])
        return self._data_root

    # images
    def image_exists(self, ref: str) -> bool:
        try:
            self.client.images.get(ref)
            return True
        except docker.errors.ImageNotFound:
            return False
        except ENGINE_FAILURES as exc:
            raise EngineError(f"cannot look up image {ref}: {exc}") from exc

    def pull_image(self, ref: str) -> bool:
        try:
            self.client.images.pull(ref)
            return True
        except ENGINE_FAILURES:
            return False

    def build_image(self, context: Path, tag: str, buildargs: dict[str, str]) -> None:
        try:
            self.client.images.build(
                path=str(context), tag=tag, buildargs=buildargs, rm=True, forcerm=True, timeout=1800
            )
        except docker.errors.BuildError as exc:
            tail = "".join(str(line.get("stream", "")) for line in exc.build_log)[-2000:]
            raise EngineError(f"image build failed: {exc.msg}\n{tail}") from exc
        except ENGINE_FAILURES as exc:
            raise EngineError(f"image build failed: {exc}") from exc

    def import_image(self, tarball: Path, tag: str) -> None:
        repo, _, version = tag.partition(":")
        with _engine_errors("import image"), tarball.open("rb") as fh:
            self.api.import_image_from_data(fh.read(), repository=repo, tag=version or "latest")

    # volumes
    def create_volume(self, name: str, labels: dict[str, str], size_bytes: int = 0) -> None:
        if not size_bytes or self.disks is None:
            with _engine_errors(f"create volume {name}"):
                self.client.volumes.create(name=name, labels=labels)
            return
        # The local driver binds the disk's data folder: it exists only while the disk is
        # mounted, so the volume never falls back to the host's own disk.
        data = self.disks.create(_volume_disk(name), size_bytes, [DiskDir("", 1000, 0o755)])
        try:
            with _engine_errors(f"create volume {name}"):
                self.client.volumes.create(
                    name=name,
                    labels=labels,
                    driver="local",
                    driver_opts={"type": "none", "o": "bind", "device": str(data)},
                )
        except EngineError:
            self.disks.remove(_volume_disk(name))
            raise

    def remove_volume(self, name: str) -> None:
        try:
            self.client.volumes.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass
        except ENGINE_FAILURES as exc:
            raise EngineError(f"cannot remove volume {name}: {exc}") from exc
        if self.disks is not None:
            self.disks.remove(_volume_disk(name))

    def disk_usage(self, volume: str) -> tuple[int, int] | None:
        return self.disks.usage(_volume_disk(volume)) if self.disks is not None else None

    def remove_stray_disks(self, keep: set[str], grace_s: float) -> list[str]:
        if self.disks is None:
            return []
        wanted = {_volume_disk(n) for n in keep} | {_container_disk(n) for n in keep}
        removed = []
        for owner in self.disks.owners(older_than_s=grace_s):
            if owner not in wanted and self._disk_owner_gone(owner):
                self.disks.remove(owner)
                removed.append(owner)
        return removed

    def _disk_owner_gone(self, owner: str) -> bool:
        """Whether the engine no longer has the volume or container the disk belongs to
        (asked only for disks reconcile did not expect: a few, rarely)."""
        kind, _, name = owner.partition("-")
        try:
            if kind == "volume":
                self.client.volumes.get(name)
            elif kind == "container":
                self.client.containers.get(name)
            return False
        except docker.errors.NotFound:
            return True
        except ENGINE_FAILURES:
            return False

    def list_volumes(self, labels: dict[str, str]) -> list[VolumeInfo]:
        with _engine_errors("list volumes"):
            volumes = self.client.volumes.list(filters={"label": _label_filters(labels)})
        return [
            VolumeInfo(
                name=v.name,
                labels=v.attrs.get("Labels") or {},
                created_at=_parse_time(v.attrs.get("CreatedAt")),
            )
            for v in volumes
        ]

    # snapshots
    def snapshot_volume(
        self, volume: str, name: str, labels: dict[str, str], helper_image: str
    ) -> int:
        disks = self.disks
        if disks is not None and disks.exists(_volume_disk(volume)):
            return disks.snapshot(_volume_disk(volume), name)
        # No disk image of its own: a whole copy into a volume of the snapshot's name.
        with _engine_errors(f"create the snapshot volume {name}"):
            self.client.volumes.create(name=name, labels=labels)
        try:
            self._copy_volume(volume, name, labels, helper_image)
            return self._volume_bytes(name, labels, helper_image)
        except BaseException:
            self._drop_volume(name)
            raise

    def flush_volume(self, volume: str) -> None:
        if self.disks is not None and self.disks.exists(_volume_disk(volume)):
            try:
                self.disks.flush(_volume_disk(volume))
            except OSError as exc:
                raise EngineError(f"cannot flush the disk of {volume}: {exc}") from exc

    def volume_from_snapshot(
        self, name: str, volume: str, labels: dict[str, str], helper_image: str
    ) -> None:
        disks = self.disks
        if disks is not None and disks.snapshot_path(name).exists():
            data = disks.create_from(_volume_disk(volume), name)
            try:
                with _engine_errors(f"create volume {volume}"):
                    self.client.volumes.create(
                        name=volume,
                        labels=labels,
                        driver="local",
                        driver_opts={"type": "none", "o": "bind", "device": str(data)},
                    )
            except EngineError:
                disks.remove(_volume_disk(volume))
                raise
            return
        with _engine_errors(f"create volume {volume}"):
            self.client.volumes.create(name=volume, labels=labels)
        try:
            self._copy_volume(name, volume, labels, helper_image)
        except BaseException:
            self._drop_volume(volume)
            raise

    def remove_volume_snapshot(self, name: str) -> None:
        if self.disks is not None:
            self.disks.remove_snapshot(name)
        self._drop_volume(name)

    def list_volume_snapshots(self, labels: dict[str, str]) -> list[VolumeSnapshot]:
        found = [
            VolumeSnapshot(name=v.name, labels=v.labels, created_at=v.created_at)
            for v in self.list_volumes({**labels, LABEL_SNAPSHOT: ""})
            if not v.labels.get("shopfloor.machine")
        ]
        if self.disks is not None:
            found += [
                VolumeSnapshot(name=name, labels={}, created_at=datetime.fromtimestamp(at, UTC))
                for name, at in self.disks.snapshots()
            ]
        return found

    def snapshots_share_blocks(self) -> bool:
        return self.disks is not None and self.disks.reflink

    def checkpoint_unsupported(self) -> str | None:
        with _engine_errors("ask the engine what it supports"):
            info = self.client.info()
        if not info.get("ExperimentalBuild"):
            return (
                "the engine runs without experimental features, which `docker checkpoint` "
                "(CRIU) needs: snapshots hold the disk state only"
            )
        return (
            "this controller does not take CRIU checkpoints yet: snapshots hold the disk state only"
        )

    def _copy_volume(
        self, source: str, target: str, labels: dict[str, str], helper_image: str
    ) -> None:
        """``cp -a`` from one volume into another in a short-lived container: root with just
        the capabilities a faithful copy needs, no network."""
        script = "cp -a /from/. /to/ 2>&1 | tail -c 2000; exit ${PIPESTATUS[0]}"
        self._helper(helper_image, script, source, target, labels, f"copy {source} into {target}")

    def _volume_bytes(self, name: str, labels: dict[str, str], helper_image: str) -> int:
        out = self._helper(helper_image, "du -sb /from | cut -f1", name, None, labels, "measure")
        try:
            return int(out.strip() or 0)
        except ValueError:
            return 0

    def _helper(
        self,
        image: str,
        script: str,
        source: str,
        target: str | None,
        labels: dict[str, str],
        doing: str,
    ) -> str:
        mounts = [Mount(target="/from", source=source, type="volume", read_only=True)]
        if target:
            mounts.append(Mount(target="/to", source=target, type="volume"))
        with _engine_errors(doing):
            container = self.client.containers.create(
                image,
                ["bash", "-c", script],
                entrypoint=[],
                user="root",
                labels=labels,
                mounts=mounts,
                network_mode="none",
                cap_drop=["ALL"],
                cap_add=_COPY_CAPABILITIES,
                security_opt=["no-new-privileges:true"],
                pids_limit=64,
            )
        try:
            with _engine_errors(doing):
                container.start()
                status = container.wait(timeout=3600)
                out = container.logs().decode(errors="replace")
        finally:
            try:
                container.remove(force=True)
            except docker.errors.DockerException as exc:
                log.warning("could not remove the helper %s: %s", container.id, exc)
        code = int(status.get("StatusCode", 1))
        if code != 0:
            if "No space left" in out:
                raise InsufficientStorage(
                    f"cannot {doing}: the engine's disk is full ({out[-300:]})"
                )
            raise EngineError(f"cannot {doing} (exit {code}): {out[-500:]}")
        return out

    def _drop_volume(self, name: str) -> None:
        try:
            self.client.volumes.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            log.warning("could not remove volume %s: %s", name, exc)

    def commit_container(self, name_or_id: str, image: str, labels: dict[str, str]) -> str:
        repository, _, tag = image.rpartition(":")
        if not repository:
            repository, tag = image, "latest"
        with _engine_errors(f"save the filesystem of {name_or_id}"):
            current = self.api.inspect_container(name_or_id)["Config"].get("Labels") or {}
            # The container's own labels (machine, pool, labels) must not pass to machines
            # started from the image: blanked; the run's labels set them again.
            merged = {**dict.fromkeys(current, ""), **labels}
            answer = self.api.commit(
                name_or_id, repository=repository, tag=tag, conf={"Labels": merged}, pause=True
            )
        return str(answer.get("Id", ""))

    def image_info(self, ref: str) -> ImageInfo | None:
        try:
            return self._image(self.api.inspect_image(ref))  # type: ignore[no-untyped-call]
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.DockerException as exc:
            raise EngineError(f"cannot look up image {ref}: {exc}") from exc

    def list_images(self, labels: dict[str, str]) -> list[ImageInfo]:
        with _engine_errors("list images"):
            found = self.api.images(filters={"label": _label_filters(labels)})
        return [
            ImageInfo(
                id=i.get("Id", ""),
                tags=[t for t in i.get("RepoTags") or [] if t != "<none>:<none>"],
                labels=i.get("Labels") or {},
                created_at=datetime.fromtimestamp(i.get("Created", 0), UTC),
                size_bytes=int(i.get("Size") or 0),
            )
            for i in found
        ]

    def remove_image(self, ref: str) -> None:
        try:
            self.api.remove_image(ref, force=True, noprune=False)
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.DockerException as exc:
            raise EngineError(f"cannot remove image {ref}: {exc}") from exc

    @staticmethod
    def _image(attrs: dict[str, Any]) -> ImageInfo:
        return ImageInfo(
            id=attrs.get("Id", ""),
            tags=list(attrs.get("RepoTags") or []),
            labels=(attrs.get("Config") or {}).get("Labels") or {},
            created_at=_parse_time(attrs.get("Created")),
            size_bytes=int(attrs.get("Size") or 0),
        )

    # containers
    def run_container(self, spec: ContainerSpec) -> ContainerInfo:
        scratch = spec.scratch_bytes and spec.scratch_mounts and self.disks is not None
        try:
            return self._run_container(spec, with_scratch=bool(scratch))
        except BaseException:
            if scratch and self.disks is not None:
                self.disks.remove(_container_disk(spec.name))
            raise
        finally:
            if self.disks is not None:  # the spares this machine's disks were: made again now
                self.disks.refill_spares()

    def _run_container(self, spec: ContainerSpec, *, with_scratch: bool) -> ContainerInfo:
        mounts = [Mount(target="/workspace", source=spec.workspace_volume, type="volume")]
        mounts += [
            Mount(target=b.container_path, source=b.host_path, type="bind", read_only=b.read_only)
            for b in spec.binds
        ]
        if with_scratch and self.disks is not None:
            folders = [
                DiskDir(m.container_path.strip("/").replace("/", "-"), m.uid, m.mode)
                for m in spec.scratch_mounts
            ]
            data = self.disks.create(_container_disk(spec.name), spec.scratch_bytes, folders)
            mounts += [
                Mount(target=m.container_path, source=str(data / f.name), type="bind")
                for m, f in zip(spec.scratch_mounts, folders, strict=True)
            ]
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "labels": spec.labels,
            "mounts": mounts,
            "detach": True,
            "init": True,
            "cap_drop": ["ALL"],
            "cap_add": spec.cap_add,
            "security_opt": ["no-new-privileges:true"],
            "pids_limit": spec.pids_limit,
            "mem_limit": f"{spec.memory_mb}m",
            "memswap_limit": f"{spec.memory_mb}m",
            "nano_cpus": int(spec.cpus * 1e9),
            "restart_policy": {"Name": "unless-stopped"},
            "environment": spec.env,
            "hostname": spec.name[:63],
        }
        if spec.shm_bytes:
            kwargs["shm_size"] = spec.shm_bytes
        if spec.tmpfs:
            kwargs["tmpfs"] = spec.tmpfs
        if spec.network == "none" and not spec.publish_ports:
            kwargs["network_mode"] = "none"
        else:
            kwargs["ports"] = {f"{p}/tcp": ("127.0.0.1", None) for p in spec.publish_ports}
        try:
            container = self.client.containers.run(spec.image, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise ImageNotFound(f"unknown image {spec.image!r}: build or pull it first") from exc
        except ENGINE_FAILURES as exc:
            raise EngineError(f"cannot start container {spec.name}: {exc}") from exc
        container.reload()
        return self._info(container)

    def inspect_container(self, name_or_id: str) -> ContainerInfo | None:
        try:
            return self._info(self.client.containers.get(name_or_id))
        except docker.errors.NotFound:
            return None
        except ENGINE_FAILURES as exc:
            raise EngineError(f"cannot inspect {name_or_id}: {exc}") from exc

    def list_containers(self, labels: dict[str, str]) -> list[ContainerInfo]:
        # The list endpoint's summaries, not one inspect per container: reconcile runs this
        # every few seconds, and a fleet of fifty made that fifty engine calls each time.
        with _engine_errors("list containers"):
            found = self.client.api.containers(all=True, filters={"label": _label_filters(labels)})
        return [self._summary_info(c) for c in found]

    def start_container(self, name_or_id: str) -> None:
        if self.disks is not None:
            self.disks.mount_all()  # no-op unless the host lost its mounts (reboot)
        with _engine_errors(f"start {name_or_id}"):
            self.client.containers.get(name_or_id).start()

    def stop_container(self, name_or_id: str, timeout_s: int = 5) -> None:
        with _engine_errors(f"stop {name_or_id}"):
            self.client.containers.get(name_or_id).stop(timeout=timeout_s)

    def remove_labelled(self, labels: dict[str, str]) -> int:
        """Remove every container, volume and image carrying ``labels``: what a test run, a
        bench or the demo made, when it ends. Answers how many containers there were."""
        containers = self.list_containers(labels)
        for container in containers:
            self.remove_container(container.id)
        for volume in self.list_volumes(labels):
            self.remove_volume(volume.name)
        for image in self.list_images(labels):  # snapshots' images
            self.remove_image(image.id)
        return len(containers)

    def remove_container(self, name_or_id: str) -> None:
        name = name_or_id
        try:
            container = self.client.containers.get(name_or_id)
            name = container.name or name_or_id
            container.remove(force=True, v=False)
        except docker.errors.NotFound:
            pass
        except ENGINE_FAILURES as exc:
            raise EngineError(f"cannot remove {name_or_id}: {exc}") from exc
        self._process_dirs.forget(name)
        if self.disks is not None:
            self.disks.remove(_container_disk(name))

    def pause_container(self, name_or_id: str) -> None:
        # The cgroup freezer gives up when a task stays in an uninterruptible wait (a
        # machine writing hard to its disk): "unable to freeze". It passes on a retry.
        for attempt in range(PAUSE_ATTEMPTS):
            try:
                self.api.pause(name_or_id)
                return
            except docker.errors.APIError as exc:
                if "already paused" in str(exc):
                    return  # another pause got there first: the machine is as asked
                if "unable to freeze" not in str(exc) or attempt == PAUSE_ATTEMPTS - 1:
                    raise EngineError(f"cannot pause {name_or_id}: {exc}") from exc
                log.info("pausing %s: the freezer gave up; again", name_or_id)
            except docker.errors.DockerException as exc:
                raise EngineError(f"cannot pause {name_or_id}: {exc}") from exc

    def unpause_container(self, name_or_id: str) -> None:
        with _engine_errors(f"resume {name_or_id}"):
            self.api.unpause(name_or_id)

    def exec(
        self,
        name_or_id: str,
        argv: list[str],
        *,
        user: str = "runner",
        workdir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> DockerExec:
        with _engine_errors(f"exec in {name_or_id}"):
            created = self.api.exec_create(
                name_or_id, argv, user=user, workdir=workdir, environment=env or None
            )
        return DockerExec(self.api, created["Id"])

    def connect_loopback(
        self, name_or_id: str, port: int, *, timeout_s: float
    ) -> socket.socket | None:
        if not self.local:  # the machine runs on another host
            return None
        try:
            with self._first_process_dir(name_or_id) as proc:
                if proc is None:
                    return None
                # A machine that just started may not listen yet (its sshd starts with it).
                started = proc.started_at
                just_started = started is not None and datetime.now(UTC) - started < JUST_STARTED
                wait_s = min(timeout_s, LISTENER_WAIT_S) if just_started else 0.0
                return connect_in_namespace(proc.path, port, timeout_s=timeout_s, wait_s=wait_s)
        except (docker.errors.DockerException, OSError, KeyError, ValueError) as exc:
            log.debug("no direct connection to %s:%d: %s", name_or_id, port, exc)
            return None

    def _first_process_dir(self, name_or_id: str) -> AbstractContextManager[ProcessDir | None]:
        """The /proc folder of the machine's first process (see procdirs.py); the engine is
        asked for its pid only when none is kept."""

        def ask_the_engine() -> FirstProcess:
            found = self.api.inspect_container(name_or_id)
            state = found["State"]
            pid = int(state["Pid"] or 0) if state.get("Running") else 0
            return FirstProcess(pid, str(found["Id"]), _parse_time(state.get("StartedAt")))

        return self._process_dirs.entered(name_or_id, ask_the_engine)

    def connect_unix(self, name_or_id: str, path: str, *, timeout_s: float) -> socket.socket | None:
        if not self.local or not path.startswith("/"):
            return None
        try:
            with self._first_process_dir(name_or_id) as proc:
                if proc is None:
                    return None
                # The machine's root as its processes see it: /proc/<pid>/root (root on the
                # host only; a folder of the machine's root that its user cannot enter).
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout_s)
                    sock.connect(f"{proc.path}/root{path}")
                except OSError:
                    sock.close()
                    raise
                return sock
        except (docker.errors.DockerException, OSError, KeyError, ValueError) as exc:
            log.debug("no connection to %s in %s: %s", path, name_or_id, exc)
            return None

    def open_stream(
        self,
        name_or_id: str,
        argv: list[str],
        *,
        user: str = "root",
        env: dict[str, str] | None = None,
    ) -> DemuxedStream:
        with _engine_errors(f"open a stream into {name_or_id}"):
            created = self.api.exec_create(
                name_or_id, argv, user=user, environment=env or None, stdin=True, tty=False
            )
            raw = self.api.exec_start(created["Id"], socket=True)
        return DemuxedStream(raw, getattr(raw, "_response", None))

    @staticmethod
    def _summary_info(summary: dict[str, Any]) -> ContainerInfo:
        ports = {
            int(p["PrivatePort"]): int(p["PublicPort"])
            for p in summary.get("Ports") or []
            if p.get("PublicPort")
        }
        names = summary.get("Names") or [""]
        return ContainerInfo(
            id=summary.get("Id", ""),
            name=names[0].lstrip("/"),
            labels=summary.get("Labels") or {},
            status=summary.get("State", "unknown"),
            created_at=datetime.fromtimestamp(summary.get("Created", 0), UTC),
            ports=ports,
        )

    @staticmethod
    def _info(container: Container) -> ContainerInfo:
        attrs = container.attrs
        ports: dict[int, int] = {}
        for key, bindings in (attrs.get("NetworkSettings", {}).get("Ports") or {}).items():
            if bindings:
                ports[int(key.split("/")[0])] = int(bindings[0]["HostPort"])
        return ContainerInfo(
            id=container.id or "",
            name=container.name or "",
            labels=attrs.get("Config", {}).get("Labels") or {},
            status=attrs.get("State", {}).get("Status", "unknown"),
            created_at=_parse_time(attrs.get("Created")) or datetime.now(UTC),
            ports=ports,
        )


@dataclass(frozen=True)
class EngineTLS:
    """Client TLS files of a ``tcp://`` engine (the engine's CA, our certificate and key)."""

    ca: str
    cert: str
    key: str


def _tls_config(tls: EngineTLS) -> TLSConfig:
    """The files are checked here: a missing or unreadable one is refused with its name."""
    for what, path in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
        if not Path(path).is_file():
            raise EngineError(f"TLS {what} file {path} does not exist or is not a file")
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise EngineError(f"cannot read TLS {what} file {path}: {exc}") from exc
    return TLSConfig(client_cert=(tls.cert, tls.key), ca_cert=tls.ca, verify=True)


@contextmanager
def _engine_errors(doing: str) -> Iterator[None]:
    """Turn any SDK error into :class:`EngineError` naming what we were doing."""
    try:
        yield
    except ENGINE_FAILURES as exc:
        # SSHException: ssh:// hosts; RequestException: an engine that stopped answering
        # (a timeout is the HTTP library's, not wrapped by the SDK).
        raise EngineError(f"cannot {doing}: {exc}") from exc
