"""SSH into machines, one pooled connection per machine.

Two ways in, the direct one first:

- **Direct**: the machine's sshd listens on its own loopback; a socket made inside the
  machine's network namespace reaches it with no engine in the path (a session command
  answers a third faster). Works with network ``none``; needs a local engine and a
  controller allowed to enter namespaces (root). The peer must present the host key that
  an engine exec, as root in that machine, read from its /etc/ssh: a process of the
  machine's own user that took the port cannot.
- **Through the engine**: ``sshd -i`` (inetd mode) started by the engine's exec with
  stdin attached, and paramiko over that stream. Every machine with an sshd binary, any
  engine. Trust in the peer comes from the engine (we started that sshd in that machine).

Either way the install's key, written into the machine first, authenticates us as
``runner``.
"""

from __future__ import annotations

import base64
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paramiko

from controller.errors import TransportError
from controller.providers.base import Provider
from controller.transport.keys import KeyPair, load_or_create

log = logging.getLogger(__name__)

SSH_USER = "runner"
SSH_PORT = 22
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"

# Installs the key atomically: a concurrent sshd never reads a half-written file.
_INSTALL_KEY = r"""
umask 022
tmp="/etc/shopfloor/.authorized_keys.$$"
printf '%s\n' "$SF_AUTHORIZED_KEY" > "$tmp" && mv -f "$tmp" /etc/shopfloor/authorized_keys \
  || { echo "cannot install the controller's key in /etc/shopfloor" >&2; exit 97; }
"""
# For the direct way: the key, then the host key the listening sshd must present.
_INSTALL_KEY_AND_SHOW_HOST_KEY = _INSTALL_KEY + f"exec cat {HOST_KEY}\n"
# Through the engine: the key, then wait for one line from us before sshd speaks. That
# line arrives after the engine's HTTP answer has been read, so no SSH byte can hide in
# the HTTP client's buffer.
_SSHD_SCRIPT = (
    _INSTALL_KEY
    + r"""[ -x /usr/sbin/sshd ] || { echo "no /usr/sbin/sshd in this image" >&2; exit 98; }
IFS= read -r _ || exit 0
exec /usr/sbin/sshd -i -e -o MaxSessions=256
"""
)


class _Closable(Protocol):
    def close(self) -> None: ...


@dataclass
class Connection:
    transport: paramiko.Transport
    stream: _Closable
    direct: bool

    @property
    def alive(self) -> bool:
        return self.transport.is_active()

    def close(self) -> None:
        self.transport.close()
        self.stream.close()


def connect(provider: Provider, container: str, keys: KeyPair, *, timeout_s: float) -> Connection:
    """A fresh authenticated SSH connection to ``container``: direct when it can be."""
    return _connect_direct(provider, container, keys, timeout_s) or _connect_through_engine(
        provider, container, keys, timeout_s
    )


def _connect_direct(
    provider: Provider, container: str, keys: KeyPair, timeout_s: float
) -> Connection | None:
    """None when the direct way is closed; the engine's way then says what is wrong."""
    sock = provider.connect_loopback(container, SSH_PORT, timeout_s=timeout_s)
    if sock is None:  # first: a controller that cannot go direct pays no extra exec
        return None
    host_key = _install_key_and_read_host_key(provider, container, keys)
    if host_key is None:
        sock.close()
        return None
    transport = paramiko.Transport(sock)
    transport.get_security_options().key_types = (host_key.get_name(),)
    try:
        transport.start_client(timeout=timeout_s)
        presented = transport.get_remote_server_key()
        if presented.asbytes() != host_key.asbytes():
            raise paramiko.SSHException(
                f"the listener on port {SSH_PORT} is not the machine's sshd (wrong host key)"
            )
        transport.auth_publickey(SSH_USER, keys.private)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        transport.close()
        sock.close()
        log.warning("direct SSH into %s refused (%s); going through the engine", container, exc)
        return None
    return Connection(transport, sock, direct=True)


def _install_key_and_read_host_key(
    provider: Provider, container: str, keys: KeyPair
) -> paramiko.PKey | None:
    run = provider.exec(
        container,
        ["sh", "-c", _INSTALL_KEY_AND_SHOW_HOST_KEY],
        user="root",
        env={"SF_AUTHORIZED_KEY": keys.public_line},
    )
    out = b"".join(data for stream, data in run if stream == "stdout")
    if run.exit_code() != 0:
        return None
    kind, _, rest = out.decode(errors="replace").strip().partition(" ")
    try:
        return paramiko.PKey.from_type_string(kind, base64.b64decode(rest.split(" ")[0]))
    except (ValueError, paramiko.SSHException):
        return None


def _connect_through_engine(
    provider: Provider, container: str, keys: KeyPair, timeout_s: float
) -> Connection:
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
        return Connection(transport, stream, direct=False)
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
            with self._guard:
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
