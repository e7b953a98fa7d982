"""A controller with more than 1,024 descriptors open keeps serving every channel.

``select()`` cannot watch a descriptor numbered 1,024 or more: once a flood of forwards (a
listener and a thread each) pushed the controller past that, every exec over SSH and
every forwarded connection failed. Here the test process (which is the controller) holds
~1,100 descriptors, so every new socket gets a number above 1,024.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.integration.test_ports import SERVE

HELD = 1100


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HELD + 512:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, HELD + 4096), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(HELD)]
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_exec_sessions_and_forwards_work_past_1024_descriptors(
    module_client: TestClient, module_machine: str, many_descriptors: None
) -> None:
    base = f"/api/v1/machines/{module_machine}"
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    assert probe > 1024  # new descriptors are out of select()'s range
    # close pooled connections opened earlier so the new ones get high numbers
    module_client.post(f"{base}/stop")
    assert module_client.post(f"{base}/start").json()["state"] == "ready"
    for _ in range(3):
        ran = module_client.post(f"{base}/exec", json={"cmd": "echo hi; echo err >&2"})
        assert ran.status_code == 200, ran.text
        assert ran.json()["stdout"] == "hi\n"
        assert ran.json()["exit_code"] == 0
    sid = module_client.post(f"{base}/sessions").json()["id"]
    done = module_client.post(f"{base}/sessions/{sid}/run", json={"cmd": "cd /tmp && pwd"})
    assert done.status_code == 200, done.text
    assert done.json()["output"] == "/tmp\n"
    started = module_client.post(f"{base}/exec", json={"cmd": SERVE.format(port=8124)})
    assert started.json()["exit_code"] == 0, started.text
    answer = module_client.post(f"{base}/ports", json={"port": 8124}).json()
    page = httpx.get(f"{answer['url']}/index.html", timeout=10)
    assert page.status_code == 200
    assert page.text == "hello from the machine\n"
