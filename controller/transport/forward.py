"""Port forwards: a 127.0.0.1 listener on the controller host per (machine, port, fence).

Each accepted connection opens a ``direct-tcpip`` channel to 127.0.0.1:<port> inside the
machine over its pooled SSH connection, so forwards work with network ``none``. When
nothing listens there, the client gets an HTTP 502 that says so (most forwarded ports
serve HTTP; a raw TCP client sees the connection close).

A forward belongs to the lease it was opened under (``fence``): the next holder of the
machine gets a listener of its own, and closing a forward ends the connections relayed
through it too.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from dataclasses import dataclass, field

import paramiko

from controller.errors import ShopfloorError
from controller.transport.ssh import SshPool

log = logging.getLogger(__name__)

_BUFFER = 65536


def refusal(machine_id: str, port: int, why: str) -> bytes:
    body = f"shopfloor: cannot reach port {port} in machine {machine_id}: {why}\n".encode()
    head = (
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


@dataclass
class Forward:
    machine_id: str
    container: str
    port: int
    fence: int
    listener: socket.socket
    pool: SshPool
    closed: threading.Event = field(default_factory=threading.Event)
    _clients: set[socket.socket] = field(default_factory=set)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    @property
    def local_port(self) -> int:
        return int(self.listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    def serve(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._relay, args=(client,), name=f"fwd-{self.port}", daemon=True
            ).start()

    def open_channel(self) -> paramiko.Channel:
        """A channel to the port inside the machine; raises when nothing listens there."""
        transport = self.pool.transport(self.container)
        try:
            return transport.open_channel(
                "direct-tcpip", ("127.0.0.1", self.port), ("127.0.0.1", 0), timeout=30
            )
        except paramiko.ChannelException as exc:
            raise ShopfloorError(f"nothing listens on port {self.port} ({exc.text})") from exc

    def _relay(self, client: socket.socket) -> None:
        with self._guard:
            if self.closed.is_set():
                client.close()
                return
            self._clients.add(client)
        try:
            try:
                channel = self.open_channel()
            except ShopfloorError as exc:
                client.sendall(refusal(self.machine_id, self.port, exc.message))
                return
            with channel:
                _pump(client, channel)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("forward %s:%s ended: %s", self.machine_id, self.port, exc)
        finally:
            with self._guard:
                self._clients.discard(client)
            client.close()

    def close(self) -> None:
        """Stop listening and end every connection relayed through this forward."""
        with self._guard:
            self.closed.set()
            clients = list(self._clients)
        for sock in (self.listener, *clients):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.listener.close()


def _pump(client: socket.socket, channel: paramiko.Channel) -> None:
    """Copy both ways until either side closes (epoll, not select(): descriptors of a busy
    controller go past 1,024)."""
    with selectors.DefaultSelector() as waiting:
        waiting.register(client, selectors.EVENT_READ)
        waiting.register(channel, selectors.EVENT_READ)
        while True:
            readable = {key.fileobj for key, _ in waiting.select(60)}
            if client in readable:
                data = client.recv(_BUFFER)
                if not data:
                    channel.shutdown_write()
                    _drain(channel, client)
                    return
                channel.sendall(data)
            if channel in readable:
                data = channel.recv(_BUFFER)
                if not data:
                    return
                client.sendall(data)


def _drain(channel: paramiko.Channel, client: socket.socket) -> None:
    while data := channel.recv(_BUFFER):
        client.sendall(data)


class ForwardRegistry:
    """Forwards by (machine, port, fence); one listener each, reused while it lives."""

    def __init__(self, pool: SshPool) -> None:
        self.pool = pool
        self._forwards: dict[tuple[str, int, int], Forward] = {}
        self._guard = threading.Lock()

    def open(
        self, *, machine_id: str, container: str, port: int, fence: int, limit: int | None = None
    ) -> Forward | None:
        """The forward of (machine, port, fence): the one open already, else a new one,
        unless ``limit`` forwards of that machine and fence are open (then None)."""
        key = (machine_id, port, fence)
        with self._guard:
            existing = self._forwards.get(key)
            if existing is not None and not existing.closed.is_set():
                return existing
            if limit is not None and self._count(machine_id, fence) >= limit:
                return None
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            forward = Forward(machine_id, container, port, fence, listener, self.pool)
            self._forwards[key] = forward
        threading.Thread(target=forward.serve, name=f"fwd-{machine_id}-{port}", daemon=True).start()
        return forward

    def _count(self, machine_id: str, fence: int) -> int:
        return sum(
            1
            for (machine, _, opened_under), forward in self._forwards.items()
            if machine == machine_id and opened_under == fence and not forward.closed.is_set()
        )

    def open_count(self) -> int:
        with self._guard:
            return sum(1 for forward in self._forwards.values() if not forward.closed.is_set())

    def close_port(self, machine_id: str, port: int, fence: int) -> bool:
        with self._guard:
            forward = self._forwards.pop((machine_id, port, fence), None)
        if forward is not None:
            forward.close()
        return forward is not None

    def close_machine(self, machine_id: str, *, before_fence: int | None = None) -> int:
        """Close the machine's forwards (only those opened under a fence older than
        ``before_fence``, when given); answer how many."""
        with self._guard:
            keys = [
                key
                for key in self._forwards
                if key[0] == machine_id and (before_fence is None or key[2] < before_fence)
            ]
            closing = [self._forwards.pop(key) for key in keys]
        for forward in closing:
            forward.close()
        return len(closing)

    def close(self) -> None:
        with self._guard:
            closing, self._forwards = list(self._forwards.values()), {}
        for forward in closing:
            forward.close()
