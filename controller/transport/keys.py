"""The install's SSH key pair: made once in the data dir, private half readable by us only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE = "ssh/id_ed25519"


@dataclass(frozen=True)
class KeyPair:
    private: paramiko.PKey
    public_line: str
    """``ssh-ed25519 AAAA... shopfloor`` as it goes into authorized_keys."""
    state_secret: bytes
    """Derived from the private key, never sent into a machine as such: the key that
    authenticates the state a session's shell keeps in a machine (``sessions.state_key``)."""


def load_or_create(data_dir: Path) -> KeyPair:
    """One ed25519 pair per install; created with mode 0600 before any byte is written."""
    path = data_dir / KEY_FILE
    if not path.exists():
        _create(path)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    private = paramiko.Ed25519Key.from_private_key_file(str(path))
    secret = hashlib.sha256(b"shopfloor session state\0" + path.read_bytes()).digest()
    return KeyPair(private, f"{private.get_name()} {private.get_base64()} shopfloor", secret)


def _create(path: Path) -> None:
    """Write a new key aside under a name of this call's own and link it into place only
    if no key is there yet: of several threads or processes making it at once, the first
    link wins and every caller then reads that one key (a shared ``.tmp`` name made the
    second rename fail, and a rename over the first key left its makers with a stale one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another maker won: its key stands
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
