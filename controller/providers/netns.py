"""A TCP connection made from inside another process's network namespace.

A machine's sshd listens on the machine's own loopback. A socket created in the machine's
network namespace reaches it directly (network ``none`` included), without the engine's
exec stream in the path: a session command answers a third faster (see bench/exec.py).

Entering a namespace needs ``CAP_SYS_ADMIN`` and changes only the calling thread, so the
socket is made in a short-lived thread of its own: no other thread ever runs inside the
machine's namespace, and the socket stays bound to it after the thread is gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def connect_in_namespace(
    proc: str, port: int, *, timeout_s: float, wait_s: float = 0.0
) -> socket.socket:
    """Connect to 127.0.0.1:``port`` as seen by the process of the /proc folder ``proc``,
    waiting up to ``wait_s`` for a listener; raises OSError when the namespace cannot be
    entered or nothing listens there."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_connect() -> None:
        try:
            made.append(_connect_from_thread(proc, port, timeout_s, wait_s))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=enter_and_connect, name="netns", daemon=True)
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]


def _connect_from_thread(proc: str, port: int, timeout_s: float, wait_s: float) -> socket.socket:
    setns = getattr(_libc, "setns", None)
    if setns is None:
        raise OSError(errno.ENOSYS, "this system has no setns: not Linux")
    namespace = os.open(f"{proc}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if setns(namespace, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(
                code, f"cannot enter the network namespace of {proc}: {os.strerror(code)}"
            )
    finally:
        os.close(namespace)
    give_up = time.monotonic() + wait_s
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
            break
        except ConnectionRefusedError:
            if time.monotonic() >= give_up:
                raise
            time.sleep(0.02)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock
