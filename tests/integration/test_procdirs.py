"""The check that keeps a machine's /proc folder: the process must be the container's."""

from __future__ import annotations

import os
from collections.abc import Iterator

import docker
import pytest
from docker.models.containers import Container

from controller.providers.docker import DockerProvider
from controller.providers.procdirs import FirstProcess, ProcessDirs, in_cgroup_of
from tests.conftest import TEST_LABEL, TEST_RUN_ID


@pytest.fixture
def two_containers(provider: DockerProvider, runner_image: str) -> Iterator[list[Container]]:
    engine = docker.from_env()
    made: list[Container] = []
    try:
        for _ in range(2):
            made.append(
                engine.containers.run(
                    runner_image,
                    ["sleep", "300"],
                    detach=True,
                    network_mode="none",
                    labels={TEST_LABEL: TEST_RUN_ID},
                )
            )
        for container in made:
            container.reload()
        yield made
    finally:
        for container in made:
            container.remove(force=True)


def pid_of(container: Container) -> int:
    return int(container.attrs["State"]["Pid"])


def test_a_process_belongs_to_its_container_only(two_containers: list[Container]) -> None:
    a, b = two_containers
    folder = os.open(f"/proc/{pid_of(a)}", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert in_cgroup_of(folder, str(a.id))
        assert not in_cgroup_of(folder, str(b.id))  # the engine's late answer for b
        assert not in_cgroup_of(folder, str(a.id)[:12])  # a short id proves nothing
    finally:
        os.close(folder)


def test_another_containers_pid_is_refused_and_the_right_one_kept(
    two_containers: list[Container],
) -> None:
    a, b = two_containers
    dirs = ProcessDirs()
    try:
        late = FirstProcess(pid_of(b), str(a.id), None)  # b's process, said to be a's
        with dirs.entered("a", lambda: late) as proc:
            assert proc is None
        right = FirstProcess(pid_of(a), str(a.id), None)
        with dirs.entered("a", lambda: right) as proc:
            assert proc is not None
            assert os.readlink(f"{proc.path}/ns/net") == os.readlink(f"/proc/{pid_of(a)}/ns/net")
        with dirs.entered("a", lambda: late) as proc:  # kept: the engine is not asked
            assert proc is not None
            assert os.readlink(f"{proc.path}/ns/net") == os.readlink(f"/proc/{pid_of(a)}/ns/net")
    finally:
        dirs.close()


def test_a_restarted_container_is_reached_through_its_new_process(
    provider: DockerProvider, two_containers: list[Container]
) -> None:
    a, _ = two_containers
    name = str(a.name)
    before = provider.connect_unix(name, "/proc/1/cmdline", timeout_s=5)  # not a socket
    assert before is None
    dirs = provider._process_dirs
    with dirs.entered(name, lambda: pytest.fail("the folder was not kept")) as proc:
        assert proc is not None
        first = os.readlink(f"{proc.path}/ns/net")
    a.restart(timeout=0)
    a.reload()
    with provider._first_process_dir(name) as proc:
        assert proc is not None
        assert os.readlink(f"{proc.path}/ns/net") != first
        assert os.readlink(f"{proc.path}/ns/net") == os.readlink(f"/proc/{pid_of(a)}/ns/net")
