"""Forwards belong to the fence they were opened under."""

from __future__ import annotations

import socket
from typing import cast

from controller.transport.forward import ForwardRegistry
from controller.transport.ssh import SshPool


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_each_fence_gets_its_own_listener_and_older_fences_close() -> None:
    registry = ForwardRegistry(cast(SshPool, None))  # no relay happens here
    first = registry.open(machine_id="m-1", container="c", port=80, fence=3)
    assert registry.open(machine_id="m-1", container="c", port=80, fence=3) is first
    second = registry.open(machine_id="m-1", container="c", port=80, fence=4)
    other = registry.open(machine_id="m-2", container="c2", port=80, fence=1)
    first_port = first.local_port
    assert second.local_port != first_port

    assert registry.close_machine("m-1", before_fence=4) == 1
    assert first.closed.is_set()
    assert refused(first_port)
    assert not second.closed.is_set()
    assert not other.closed.is_set()
    assert not registry.close_port("m-1", 80, 3)

    assert registry.close_machine("m-1") == 1
    assert second.closed.is_set()
    registry.close()
    assert other.closed.is_set()
