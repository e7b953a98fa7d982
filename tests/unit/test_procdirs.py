"""The kept /proc folders: never a way into a process other than the one they were opened for."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.providers.procdirs import AskEngine, FirstProcess, ProcessDirs

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


CONTAINER_ID = "c" * 64


class Engine:
    """Stands for the engine's inspect: the pid of a container's first process, counted."""

    def __init__(self) -> None:
        self.pid = 0
        self.asked = 0

    def first_process(self) -> AskEngine:
        def ask() -> FirstProcess:
            self.asked += 1
            return FirstProcess(self.pid, CONTAINER_ID, None)

        return ask


class Cgroups:
    """Stands for the cgroup check (tests/integration/test_procdirs.py checks the real one)."""

    def __init__(self) -> None:
        self.answer = True

    def __call__(self, folder_fd: int, container_id: str) -> bool:
        assert os.readlink(f"/proc/self/fd/{folder_fd}").startswith("/proc/")
        return self.answer and container_id == CONTAINER_ID


@pytest.fixture
def cgroups() -> Cgroups:
    return Cgroups()


@pytest.fixture
def dirs(cgroups: Cgroups) -> Iterator[ProcessDirs]:
    kept = ProcessDirs(limit=2, belongs=cgroups)
    yield kept
    kept.close()


def sleeper(seconds: str = "60") -> subprocess.Popen[bytes]:
    """``sleep``, once it runs as itself (a child just forked shows no command line yet)."""
    process = subprocess.Popen(["sleep", seconds])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{process.pid}/cmdline").read_bytes() != f"sleep\0{seconds}\0".encode():
        assert time.monotonic() < deadline, "sleep did not start"
        time.sleep(0.001)
    return process


def cmdline_of(dirs: ProcessDirs, engine: Engine, container: str = "m") -> bytes | None:
    with dirs.entered(container, engine.first_process()) as proc:
        return None if proc is None else Path(f"{proc.path}/cmdline").read_bytes()


def test_the_folder_is_kept_while_its_process_lives(dirs: ProcessDirs) -> None:
    engine, process = Engine(), sleeper()
    try:
        engine.pid = process.pid
        assert cmdline_of(dirs, engine) == b"sleep\x0060\x00"
        assert cmdline_of(dirs, engine) == b"sleep\x0060\x00"
        assert engine.asked == 1
    finally:
        process.kill()
        process.wait()


def test_a_process_gone_makes_it_ask_again(dirs: ProcessDirs) -> None:
    engine, first = Engine(), sleeper()
    engine.pid = first.pid
    cmdline_of(dirs, engine)
    first.kill()
    first.wait()
    second = sleeper("61")
    try:
        engine.pid = second.pid
        assert cmdline_of(dirs, engine) == b"sleep\x0061\x00"
        assert engine.asked == 2
        engine.pid = 0  # the container stopped
        second.kill()
        second.wait()
        assert cmdline_of(dirs, engine) is None
    finally:
        second.kill()
        second.wait()


def test_a_reused_pid_never_leads_into_the_new_process(dirs: ProcessDirs) -> None:
    """The hazard a kept pid would have: the machine's process exits, another machine's
    process gets its number. Forced here with ``ns_last_pid`` (root, as the controller)."""
    engine, first = Engine(), sleeper()
    engine.pid = first.pid
    with dirs.entered("m", engine.first_process()) as held:
        assert held is not None
        first.kill()
        first.wait()
        reused = same_pid(first.pid)
        try:
            assert Path(f"/proc/{first.pid}/cmdline").read_bytes() == b"sleep\x0062\x00"
            with pytest.raises(ProcessLookupError):
                Path(f"{held.path}/cmdline").read_bytes()  # not the new process's
            with pytest.raises(ProcessLookupError):
                os.stat(f"{held.path}/root")
            assert not held.alive()
        finally:
            reused.kill()
            reused.wait()
    engine.pid = 0
    assert cmdline_of(dirs, engine) is None  # asked again, not the kept folder
    assert engine.asked == 2


def same_pid(pid: int) -> subprocess.Popen[bytes]:
    """A new process with ``pid`` (another process may take it first: a few tries)."""
    for _ in range(20):
        NS_LAST_PID.write_text(str(pid - 1))
        process = sleeper("62")
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
    raise AssertionError(f"could not have pid {pid} again")


def test_a_folder_in_use_stays_open_when_forgotten_and_the_oldest_go_past_the_limit(
    dirs: ProcessDirs,
) -> None:
    engine, processes = Engine(), [sleeper() for _ in range(3)]
    try:
        engine.pid = processes[0].pid
        with dirs.entered("a", engine.first_process()) as held:
            assert held is not None
            dirs.forget("a")  # the container removed while a connection is being made
            opened = os.open("/dev/null", os.O_RDONLY)  # cannot take the folder's number
            try:
                assert Path(f"{held.path}/cmdline").read_bytes() == b"sleep\x0060\x00"
            finally:
                os.close(opened)
        assert held.fd == -1  # closed once its user was done
        for name, process in zip("abc", processes, strict=True):
            engine.pid = process.pid
            cmdline_of(dirs, engine, name)
        asked = engine.asked
        engine.pid = processes[0].pid
        cmdline_of(dirs, engine, "a")  # the least recently used went past the limit of 2
        assert engine.asked == asked + 1
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_a_pid_that_is_not_the_containers_is_not_used_nor_kept(
    dirs: ProcessDirs, cgroups: Cgroups
) -> None:
    """The engine's pid may be late (another machine's process by now): refused, and the
    engine asked again next time."""
    engine, process = Engine(), sleeper()
    try:
        engine.pid, cgroups.answer = process.pid, False
        assert cmdline_of(dirs, engine) is None
        cgroups.answer = True
        assert cmdline_of(dirs, engine) == b"sleep\x0060\x00"
        assert engine.asked == 2
    finally:
        process.kill()
        process.wait()
