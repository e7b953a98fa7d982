"""Fixed-size disks for machines: an ext4 filesystem in a sparse file under the data dir.

The engine's own size limit (``--storage-opt size=``) needs overlay2 on xfs with project
quotas; these hosts run overlay2 on ext4 ("--storage-opt is supported only for overlay
over xfs with 'pquota' mount option"). So each limited area of a machine is a file
``<root>/<owner>/disk.img`` (sparse: it takes on the host only what was written), made with
``mkfs.ext4`` and mounted on the host with ``mount -o loop,discard`` at ``<owner>/mnt``. The
machine sees ``mnt/data`` (a bind, or the local volume driver's ``o=bind``). A write past
the size fails in the machine with ENOSPC; ``discard`` hands the blocks of removed files
back to the host; the loop device goes with the unmount (autoclear).

``mnt/data`` exists only inside the mounted filesystem: when the host lost its mounts (a
reboot), the engine cannot start the machine — it never falls back to the host's disk —
until :meth:`DiskStore.mount_all` (controller start-up, before a start) mounts them again.

Formatting and mounting cost ~20 ms a disk, which a machine's provisioning would pay twice.
So one formatted, mounted disk of each size is kept ready (``.spare-<size>``) and a new
machine's disk is that spare renamed (a mount follows its folder's rename); a background
thread makes the next spare once the machine has started (:meth:`DiskStore.refill_spares`,
which the provider calls): made beside the engine's create and start, the two spares'
``mkfs`` and mounts slowed the provisioning that took them by ~10 %.

Snapshots and forks copy a disk's image file. A plain copy grows with the workspace (1.1 s
for 168 MB here), so the disks live on a filesystem that shares blocks between copies
(reflink: ``cp --reflink=always`` takes ~20-60 ms whatever the size, and the copies diverge
block by block as they are written). These hosts keep their data on ext4, which cannot, so
the store makes its own: an XFS filesystem with ``reflink=1`` in a sparse file beside the
disks (``disks.xfs``, ``pool_bytes`` large; it takes on the host what the disks in it
hold), mounted at the disks' folder. Where XFS cannot be had (no ``mkfs.xfs``, an existing
store with disks in it), images are copied whole: snapshots work, slower, and
:attr:`DiskStore.reflink` says so. A snapshot's image is copied while its filesystem is
frozen (``fsfreeze``): every write the machine made is in the image, none half-done.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from controller.errors import EngineError, InsufficientStorage

log = logging.getLogger(__name__)

TOOLS = ("mount", "umount", "mkfs.ext4", "losetup")
_MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"]
_MOUNT_OPTIONS = "loop,discard,nosuid,nodev"
SPARE = ".spare-"
MAKING = ".making-"
SNAPSHOTS = ".snapshots"
"""Folder (in the store) of snapshot images: ``<name>.img``, never mounted."""
POOL_FILE = "disks.xfs"
_MKFS_POOL = ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-l", "size=64m"]
"""A fixed 64 MiB log: the default grows with the size (512 MiB written at 1 TiB)."""
_MIN_FREE_BYTES = 64 * 1024**2
"""A snapshot or fork refuses to start with less free in the store: the copies share their
blocks, but each still needs room for its metadata and the first writes that diverge."""


@dataclass(frozen=True)
class DiskDir:
    """A folder made at the top of a new disk: its name (``""``: the top itself), owner and
    mode."""

    name: str
    uid: int
    mode: int


def unusable_reason() -> str | None:
    """Why this process cannot make loop-mounted disks, or None when it can."""
    if os.geteuid() != 0:
        return "the controller does not run as root (loop devices and mounts need it)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (no loop devices on this host)"
    return None


class DiskStore:
    """The disks under ``root``, one folder per owner (a volume or a container name), and a
    formatted spare of each of ``spare_sizes`` made ahead."""

    def __init__(self, root: Path, spare_sizes: tuple[int, ...] = (), pool_bytes: int = 0) -> None:
        self.root = root
        self.spare_sizes = {size for size in spare_sizes if size > 0}
        self.pool_bytes = pool_bytes
        self.reflink = False
        """Whether copies of disk images share their blocks (snapshots and forks are then
        constant-time); False: they are copied whole."""
        self._guard = threading.Lock()
        self._filling: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def _dir(self, owner: str) -> Path:
        if not owner or "/" in owner or owner.startswith("."):
            raise EngineError(f"bad disk owner {owner!r}")
        return self.root / owner

    def data_path(self, owner: str) -> Path:
        return self._dir(owner) / "mnt" / "data"

    def exists(self, owner: str) -> bool:
        return (self._dir(owner) / "disk.img").exists()

    def create(self, owner: str, size_bytes: int, dirs: list[DiskDir]) -> Path:
        """A formatted, mounted disk of ``size_bytes`` (the spare when there is one); answer
        the folder to mount into the machine. The spare taken is made again by
        :meth:`refill_spares`, not here."""
        folder = self._dir(owner)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.exists():  # a leftover of a failed attempt with the same name
            self.remove(owner)
        try:
            if not self._take_spare(size_bytes, folder):
                self._make(folder, size_bytes)
            data = folder / "mnt" / "data"
            data.mkdir()
            for made in dirs:
                path = data / made.name if made.name else data
                path.mkdir(exist_ok=True)
                os.chown(path, made.uid, made.uid)
                path.chmod(made.mode)
        except BaseException:
            self.remove(owner)
            raise
        return data

    def _make(self, folder: Path, size_bytes: int) -> None:
        folder.mkdir(mode=0o700)
        image = folder / "disk.img"
        with image.open("wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.truncate(size_bytes)
        _run([*_MKFS, str(image)], f"format the disk {folder.name}")
        (folder / "mnt").mkdir(mode=0o755)
        self._mount(folder)
        (folder / "mnt" / "lost+found").chmod(0o700)

    def _take_spare(self, size_bytes: int, folder: Path) -> bool:
        spare = self.root / f"{SPARE}{size_bytes}"
        with self._guard:
            if not os.path.ismount(spare / "mnt"):
                return False
            spare.rename(folder)  # the mount moves with it
        os.utime(folder)  # its age is the owner's (see owners)
        return True

    def refill_spares(self) -> None:
        """Make every missing spare in the background: after the engine's work for the
        machine that took one, so that neither slows the other."""
        for size in sorted(self.spare_sizes):
            self.refill(size)

    def refill(self, size_bytes: int) -> None:
        """Make the spare of ``size_bytes`` in the background, unless it is there or coming."""
        with self._guard:
            spare = self.root / f"{SPARE}{size_bytes}"
            if self._closed or size_bytes in self._filling or spare.exists():
                return
            self._filling.add(size_bytes)
            thread = threading.Thread(
                target=self._fill, args=(size_bytes,), name=f"disk-spare-{size_bytes}", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _fill(self, size_bytes: int) -> None:
        making = self.root / f"{MAKING}{size_bytes}-{secrets.token_hex(4)}"
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._make(making, size_bytes)
            with self._guard:
                if not self._closed:
                    making.rename(self.root / f"{SPARE}{size_bytes}")
            if self._closed:  # the controller stopped meanwhile: leave nothing mounted
                self._remove_folder(making)
        except (OSError, EngineError) as exc:
            log.warning("could not make a spare disk: %s", exc)
            self._remove_folder(making)
        finally:
            with self._guard:
                self._filling.discard(size_bytes)

    def start(self) -> None:
        """At start-up: the shared-block pool mounted (made when the store is new), mount
        what lost its mount, drop half-made disks and spares of sizes no longer wanted, make
        the spares."""
        self._start_pool()
        self.reflink = self._probe_reflink()
        if not self.reflink:
            log.warning(
                "disk images under %s are copied whole by snapshots and forks "
                "(no filesystem sharing blocks: see SHOPFLOOR_DISK_POOL_BYTES)",
                self.root,
            )
        if self.root.is_dir():
            for entry in self.root.iterdir():
                name = entry.name
                unwanted = name.startswith(SPARE) and name[len(SPARE) :] not in {
                    str(size) for size in self.spare_sizes
                }
                if name.startswith(MAKING) or unwanted:
                    self._remove_folder(entry)
        self.mount_all()
        self.refill_spares()

    def _start_pool(self) -> None:
        """Mount the XFS pool at the store's folder, making it when the store is new."""
        pool = self.root.parent / POOL_FILE
        if os.path.ismount(self.root):
            return
        if pool.exists():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _run(["mount", "-o", "loop,discard", str(pool), str(self.root)], "mount the disk pool")
            return
        if not self.pool_bytes or shutil.which("mkfs.xfs") is None:
            return
        if self.root.is_dir() and any(
            (entry / "disk.img").exists() for entry in self.root.iterdir()
        ):
            return  # disks made before the pool stay where they are
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.root.iterdir():  # spares only (checked above)
            self._remove_folder(leftover)
        making = pool.with_suffix(".making")
        try:
            with making.open("wb") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.truncate(self.pool_bytes)
            _run([*_MKFS_POOL, str(making)], "format the disk pool")
            making.rename(pool)
        except (OSError, EngineError) as exc:
            making.unlink(missing_ok=True)
            log.warning("no shared-block disk pool: %s", exc)
            return
        _run(["mount", "-o", "loop,discard", str(pool), str(self.root)], "mount the disk pool")
        self.root.chmod(0o700)

    def _probe_reflink(self) -> bool:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = self.root / f"{MAKING}probe"
        try:
            probe.write_bytes(b"x")
            done = subprocess.run(
                ["cp", "--reflink=always", str(probe), f"{probe}.copy"],
                capture_output=True,
                check=False,
            )
            return done.returncode == 0
        finally:
            probe.unlink(missing_ok=True)
            Path(f"{probe}.copy").unlink(missing_ok=True)

    # ------------------------------------------------------------ snapshots

    def snapshot_path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise EngineError(f"bad snapshot name {name!r}")
        return self.root / SNAPSHOTS / f"{name}.img"

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def _check_room(self, doing: str) -> None:
        free = self.free_bytes()
        if free < _MIN_FREE_BYTES:
            raise InsufficientStorage(
                f"cannot {doing}: the disk store {self.root} has {free // 1024**2} MiB free, "
                f"less than the {_MIN_FREE_BYTES // 1024**2} MiB a copy needs; free space "
                "(delete snapshots or machines) and try again"
            )

    def flush(self, owner: str) -> None:
        """Write what the machine wrote down to the image's blocks, with the machine still
        running: a shared-block copy must first flush what the file holds in memory (~1 s
        per GB just written), which :meth:`snapshot` then need not do while it is paused."""
        folder = self._dir(owner)
        if not os.path.ismount(folder / "mnt"):
            return
        _run(["sync", "-f", str(folder / "mnt")], f"flush the disk {owner}")  # ext4 -> image
        fd = os.open(folder / "disk.img", os.O_RDONLY)
        try:
            os.fsync(fd)  # the image file onto the store's blocks
        finally:
            os.close(fd)

    def snapshot(self, owner: str, name: str) -> int:
        """Copy the owner's disk image to the snapshot ``name`` while its filesystem is
        frozen; answer the bytes it holds. Nothing is left behind on failure."""
        folder = self._dir(owner)
        target = self.snapshot_path(name)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        self._check_room(f"snapshot the disk {owner}")
        mnt = folder / "mnt"
        frozen = False
        try:
            if os.path.ismount(mnt):
                _run(["fsfreeze", "--freeze", str(mnt)], f"freeze the disk {owner}")
                frozen = True
            self._copy(folder / "disk.img", target, f"snapshot the disk {owner}")
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        finally:
            if frozen:
                _run(["fsfreeze", "--unfreeze", str(mnt)], f"thaw the disk {owner}")
        return _allocated(target)

    def create_from(self, owner: str, name: str) -> Path:
        """A disk for ``owner`` whose content is the snapshot ``name``, mounted; answer the
        folder to mount into the machine. Nothing is left behind on failure."""
        source = self.snapshot_path(name)
        if not source.exists():
            raise EngineError(f"the snapshot image {name} is missing from {source.parent}")
        folder = self._dir(owner)
        if folder.exists():
            self.remove(owner)
        self._check_room(f"make the disk {owner} from a snapshot")
        try:
            folder.mkdir(mode=0o700, parents=True)
            self._copy(source, folder / "disk.img", f"copy the snapshot into the disk {owner}")
            (folder / "mnt").mkdir(mode=0o755)
            self._mount(folder)
        except BaseException:
            self._remove_folder(folder)
            raise
        return folder / "mnt" / "data"

    def remove_snapshot(self, name: str) -> bool:
        path = self.snapshot_path(name)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def snapshots(self) -> list[tuple[str, float]]:
        """(name, mtime) of every snapshot image."""
        folder = self.root / SNAPSHOTS
        if not folder.is_dir():
            return []
        return sorted(
            (entry.name[: -len(".img")], entry.stat().st_mtime)
            for entry in folder.iterdir()
            if entry.name.endswith(".img")
        )

    def _copy(self, source: Path, target: Path, doing: str) -> None:
        if self.reflink:
            argv = ["cp", "--reflink=always", str(source), str(target)]
        else:  # a whole copy, holes kept
            argv = ["cp", "--reflink=never", "--sparse=always", str(source), str(target)]
        try:
            subprocess.run(argv, capture_output=True, check=True, timeout=3600)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or b"").decode(errors="replace").strip()[-500:]
            if "No space left" in detail:
                raise InsufficientStorage(
                    f"cannot {doing}: the disk store is full ({detail})"
                ) from exc
            raise EngineError(f"cannot {doing}: {detail or exc}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineError(f"cannot {doing}: {exc}") from exc

    def _mount(self, folder: Path) -> None:
        mnt = folder / "mnt"
        if not os.path.ismount(mnt):
            _run(
                ["mount", "-o", _MOUNT_OPTIONS, str(folder / "disk.img"), str(mnt)],
                f"mount the disk {folder.name}",
            )

    def mount(self, owner: str) -> None:
        if self.exists(owner):
            self._mount(self._dir(owner))

    def mount_all(self) -> None:
        """Mount every disk that lost its mount (after a host reboot); errors are logged."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            try:
                if (entry / "disk.img").exists() and not entry.name.startswith(MAKING):
                    self._mount(entry)
            except EngineError as exc:
                log.warning("%s", exc.message)

    def remove(self, owner: str) -> bool:
        """Unmount (lazily when still busy) and delete the disk; answer whether it existed."""
        return self._remove_folder(self._dir(owner))

    def close(self) -> None:
        """Remove the spares (a controller that stops gives their loop devices back)."""
        with self._guard:
            self._closed = True
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=30)
        for size in self.spare_sizes:
            self._remove_folder(self.root / f"{SPARE}{size}")
        if (self.root.parent / POOL_FILE).exists() and os.path.ismount(self.root):
            # Given back when no machine's disk is mounted in it (else busy: they live on,
            # and the next start finds it mounted); snapshots stay in its file.
            subprocess.run(["umount", str(self.root)], capture_output=True, check=False)

    @staticmethod
    def _remove_folder(folder: Path) -> bool:
        if not folder.exists():
            return False
        mnt = folder / "mnt"
        if os.path.ismount(mnt):
            done = subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
            if done.returncode != 0:
                _run(["umount", "-l", str(mnt)], f"unmount the disk {folder.name}")
        shutil.rmtree(folder, ignore_errors=True)
        return True

    def usage(self, owner: str) -> tuple[int, int] | None:
        """(used, size) in bytes as the filesystem counts them; None when not mounted."""
        mnt = self._dir(owner) / "mnt"
        if not os.path.ismount(mnt):
            return None
        stat = os.statvfs(mnt)
        size = stat.f_blocks * stat.f_frsize
        return size - stat.f_bfree * stat.f_frsize, size

    def owners(self, older_than_s: float = 0.0) -> list[str]:
        if not self.root.is_dir():
            return []
        now = time.time()
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir()
            and not entry.name.startswith(".")
            and now - entry.stat().st_mtime >= older_than_s
        )


def unmount_under(folder: Path) -> None:
    """Unmount every machine disk left mounted below ``folder`` (a data dir a test or bench
    controller used, whose machines are gone), then the disk pools; their loop devices go
    with the mounts."""
    prefix = f"{folder.resolve()}/"
    targets = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    ours = [t for t in targets if t.startswith(prefix) and ("/disks/" in t or t.endswith("/disks"))]
    for target in sorted(ours, key=len, reverse=True):  # disks before the pool they are in
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _run(argv: list[str], doing: str) -> None:
    try:
        subprocess.run(argv, capture_output=True, check=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip()[-500:]
        raise EngineError(f"cannot {doing}: {detail or exc}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"cannot {doing}: {exc}") from exc
