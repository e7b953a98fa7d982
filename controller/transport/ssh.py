"""SSH into machines through the engine, one pooled connection per machine.

Machines usually have no network, so the controller never dials an address: it starts
``sshd -i`` (inetd mode) inside the container through the engine's exec, with stdin
attached, and runs paramiko over that stream. The same path serves every network policy.
Trust in the peer comes from the engine (we started that sshd in that container), so the
host key is not checked; the install's key authenticates us as ``runner``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko

from controller.errors import TransportError
from controller.providers.base import DuplexStream, Provider
from controller.transport.keys import KeyPair, load_or_create

log = logging.getLogger(__name__)

SSH_USER = "runner"

# Installs the key (atomically: a concurrent sshd never reads a half-written file), then
# waits for one line from us before sshd speaks. That line arrives after the engine's HTTP
# answer has been read, so no SSH byte can hide in the HTTP client's buffer.
_SSHD_SCRIPT = r"""
umask 022
tmp="/etc/shopfloor/.authorized_keys.$$"
printf '%s\n' "$SF_AUTHORIZED_KEY" > "$tmp" && mv -f "$tmp" /etc/shopfloor/authorized_keys \
  || { echo "cannot install the controller's key in /etc/shopfloor" >&2; exit 97; }
[ -x /usr/sbin/sshd ] || { echo "no /usr/sbin/sshd in this image" >&2; exit 98; }
IFS= read -r _ || exit 0
exec /usr/sbin/sshd -i -e -o MaxSessions=256
"""


@dataclass
class Connection:
    transport: paramiko.Transport
    stream: DuplexStream

    @property
    def alive(self) -> bool:
        return self.transport.is_active()

    def close(self) -> None:
        self.transport.close()
        self.stream.close()


def connect(provider: Provider, container: str, keys: KeyPair, *, timeout_s: float) -> Connection:
    """A fresh authenticated SSH connection to ``container`` through the engine."""
    stream = provider.open_stream(
        container,
        ["sh", "-c", _SSHD_SCRIPT],
        user="root",
        env={"SF_AUTHORIZED_KEY": keys.public_line},
    )
    transport: paramiko.Transport | None = None
    try:
        stream.send(b"go\n")
        transport = paramiko.Transport(stream)  # type: ignore[arg-type]
        transport.banner_timeout = timeout_s
        transport.start_client(timeout=timeout_s)
        transport.auth_publickey(SSH_USER, keys.private)
        return Connection(transport, stream)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if transport is not None:
            transport.close()
        stream.close()
        said = stream.stderr_tail().decode(errors="replace").strip()[-500:]
        raise TransportError(
            f"cannot open SSH into {container}: {exc or type(exc).__name__}"
            + (f" (machine said: {said})" if said else "")
            + "; sessions, files and ports need sshd as in the runner image"
        ) from exc


class SshPool:
    """One live connection per machine, opened on first use and reopened when it breaks."""

    def __init__(self, provider: Provider, key_dir: Path, *, timeout_s: float = 30) -> None:
        self.provider = provider
        self.key_dir = key_dir
        self._keys: KeyPair | None = None
        self.timeout_s = timeout_s
        self._conns: dict[str, Connection] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, container: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(container, threading.Lock())

    def keys(self) -> KeyPair:
        """Loaded (or made) on first use: a controller that never SSHes makes no key."""
        if self._keys is None:
            self._keys = load_or_create(self.key_dir)
        return self._keys

    def get(self, container: str) -> Connection:
        conn = self._conns.get(container)
        if conn is not None and conn.alive:
            return conn
        with self._lock_for(container):
            conn = self._conns.get(container)
            if conn is not None and conn.alive:
                return conn
            if conn is not None:
                conn.close()
            conn = connect(self.provider, container, self.keys(), timeout_s=self.timeout_s)
            self._conns[container] = conn
            log.debug("ssh connection to %s opened", container)
            return conn

    def transport(self, container: str) -> paramiko.Transport:
        return self.get(container).transport

    def drop(self, container: str) -> None:
        conn = self._conns.pop(container, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for container in list(self._conns):
            self.drop(container)
