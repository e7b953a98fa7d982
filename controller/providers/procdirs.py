"""The /proc folders of machines' first processes, kept open: a way into a machine's
namespaces without asking the engine for its pid each time.

Every hand-over and every new SSH connection to a machine on this host goes through its
first process's /proc folder: the hand-over helper's socket under the machine's root, the
network namespace where its sshd listens. Asking the engine for that pid (an inspect) took
~1.5 ms and 40 % of a hand-over's Python. A pid alone cannot be kept: once the machine's
process exits, its number may go to another machine's process, and a connection meant for
one machine would reach the other. A folder opened as /proc/<pid> stays bound to the
process it was opened for (the kernel's process, not its number): once that process exits,
every path under it fails with ESRCH, even when the number has been given again. So the
folder is kept open, paths go through ``/proc/self/fd/<fd>/``, and a folder whose process
is gone (the machine restarted, was recreated or removed) is closed and the engine asked
again.

The engine's answer may itself be late: it learns that a machine's process died only from
the exit event, and meanwhile the pid it gives may already be another machine's process. So
a folder is kept only once the process it holds shows the container's id in its cgroups;
otherwise the engine's answer is not used at all (the caller takes the engine's way in).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

LIMIT = max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
"""Folders kept at most: one file descriptor each, a quarter of what this process may open
(the channels need the rest); the least recently used goes first."""


@dataclass
class ProcessDir:
    """An open /proc/<pid> folder: ``path`` leads into it, whatever the pid became since."""

    fd: int
    started_at: datetime | None
    users: int = 0
    dropped: bool = False
    """Out of the kept ones (its process gone, its machine removed, past the limit):
    closed when its last user is done."""

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def alive(self) -> bool:
        try:
            os.stat("stat", dir_fd=self.fd)
            return True
        except OSError:
            return False


@dataclass(frozen=True)
class FirstProcess:
    """A container's first process as the engine sees it."""

    pid: int
    """0: the container runs nothing."""
    container_id: str
    started_at: datetime | None


AskEngine = Callable[[], FirstProcess]
Belongs = Callable[[int, str], bool]
"""Whether the process of a /proc folder (its descriptor) is the container's (its id)."""


class ProcessDirs:
    """Open /proc folders by container name, made on first use and checked at each.

    A folder in use is closed only once its users are done, so its number can never be
    taken meanwhile by another open file (another machine's folder, say)."""

    def __init__(self, limit: int = LIMIT, belongs: Belongs | None = None) -> None:
        self._limit = limit
        self._belongs = belongs or in_cgroup_of
        self._kept: OrderedDict[str, ProcessDir] = OrderedDict()
        self._guard = threading.Lock()
        self._closed = False

    @contextmanager
    def entered(self, container: str, ask_engine: AskEngine) -> Iterator[ProcessDir | None]:
        """The container's first process's folder while the block runs: the one kept while
        its process lives, else one opened for the pid the engine answers and checked to be
        the container's; None when the container runs nothing or that check fails."""
        held = self._hold(container) or self._hold_new(container, ask_engine())
        try:
            yield held
        finally:
            if held is not None:
                with self._guard:
                    held.users -= 1
                    self._close_if_done(held)

    def _hold(self, container: str) -> ProcessDir | None:
        with self._guard:
            kept = self._kept.get(container)
            if kept is None:
                return None
            if not kept.alive():  # restarted, recreated or removed: ask the engine again
                self._drop(container)
                return None
            self._kept.move_to_end(container)
            kept.users += 1
            return kept

    def _hold_new(self, container: str, first: FirstProcess) -> ProcessDir | None:
        if not first.pid:
            return None
        opened = os.open(f"/proc/{first.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if not self._belongs(opened, first.container_id):
            os.close(opened)
            log.debug("pid %d is not (or no longer) %s's: no direct way in", first.pid, container)
            return None
        fresh = ProcessDir(opened, first.started_at, users=1)
        with self._guard:
            self._drop(container)
            self._kept[container] = fresh
            while len(self._kept) > self._limit or (self._closed and self._kept):
                self._drop(next(iter(self._kept)))
        return fresh

    def forget(self, container: str) -> None:
        """The container is removed: its folder goes."""
        with self._guard:
            self._drop(container)

    def close(self) -> None:
        with self._guard:
            self._closed = True
            for container in list(self._kept):
                self._drop(container)

    def _drop(self, container: str) -> None:
        gone = self._kept.pop(container, None)
        if gone is not None:
            gone.dropped = True
            self._close_if_done(gone)

    @staticmethod
    def _close_if_done(folder: ProcessDir) -> None:
        if folder.dropped and folder.users == 0:
            os.close(folder.fd)
            folder.fd = -1


def in_cgroup_of(folder_fd: int, container_id: str) -> bool:
    """Whether the process of the /proc folder ``folder_fd`` runs in the container's cgroups
    (their paths name the container's full id, with the cgroupfs and systemd drivers alike)."""
    if len(container_id) < 64:
        return False
    try:
        return container_id in Path(f"/proc/self/fd/{folder_fd}/cgroup").read_text()
    except OSError:
        return False
