"""Files in and out of a machine over SFTP, confined to /workspace.

Two checks: the path as written (no ``..``, nothing outside /workspace, no control
characters) and the path as the machine resolves it (``realpath`` on the server), so a
symlink inside the workspace that points out is refused too.
"""

from __future__ import annotations

import posixpath
import stat

import paramiko

from controller.errors import InvalidInput, NotFound, TooLarge

WORKSPACE = "/workspace"
MAX_PATH = 4096


def confine(path: str) -> str:
    """The absolute path inside /workspace that ``path`` names, or InvalidInput saying why."""
    if not path or not path.strip():
        raise InvalidInput("path is empty: give a path inside /workspace, e.g. repo/README.md")
    if len(path) > MAX_PATH or any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise InvalidInput("path has control characters or is too long")
    if path.startswith("/"):
        if path != WORKSPACE and not path.startswith(WORKSPACE + "/"):
            raise InvalidInput(f"path {path!r} is outside /workspace: files live under /workspace")
        relative = path[len(WORKSPACE) :].lstrip("/")
    else:
        relative = path
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"path {path!r} contains '..': name the file inside /workspace directly")
    return posixpath.join(WORKSPACE, *parts) if parts else WORKSPACE


def _inside(resolved: str) -> bool:
    return resolved == WORKSPACE or resolved.startswith(WORKSPACE + "/")


def _resolve(sftp: paramiko.SFTPClient, path: str, shown: str) -> str:
    resolved = sftp.normalize(path)
    if not _inside(resolved):
        raise InvalidInput(f"path {shown!r} resolves to {resolved}, outside /workspace (symlink)")
    return resolved


def read(sftp: paramiko.SFTPClient, path: str, *, cap: int) -> bytes:
    target = confine(path)
    try:
        info = sftp.stat(target)  # first: realpath of a missing path may not fail
        resolved = _resolve(sftp, target, path)
    except FileNotFoundError as exc:
        raise NotFound(f"no file {target} in the machine") from exc
    if stat.S_ISDIR(info.st_mode or 0):
        raise InvalidInput(f"{target} is a directory; name a file")
    if (info.st_size or 0) > cap:
        raise TooLarge(f"{target} is {info.st_size} bytes; the files API moves at most {cap}")
    with sftp.open(resolved, "rb") as fh:
        fh.prefetch(info.st_size)
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise TooLarge(f"{target} grew past {cap} bytes while it was read")
    return bytes(data)


def write(sftp: paramiko.SFTPClient, path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` (parents made as needed); returns the absolute path."""
    target = confine(path)
    if target == WORKSPACE:
        raise InvalidInput("path names /workspace itself; name a file inside it")
    parent = _existing_parent(sftp, posixpath.dirname(target), path)
    for missing in _missing_dirs(parent, posixpath.dirname(target)):
        sftp.mkdir(missing)
    try:
        link = stat.S_ISLNK(sftp.lstat(target).st_mode or 0)
    except FileNotFoundError:
        link = False
    if link:
        try:
            sftp.stat(target)
        except FileNotFoundError as exc:
            raise InvalidInput(
                f"path {path!r} is a dangling symlink; refusing to follow it"
            ) from exc
        _resolve(sftp, target, path)
    with sftp.open(target, "wb") as fh:
        fh.set_pipelined(True)
        fh.write(data)
    return target


def _existing_parent(sftp: paramiko.SFTPClient, directory: str, shown: str) -> str:
    """The deepest existing ancestor of ``directory``, resolved and checked to be inside."""
    probe = directory
    while True:
        try:
            info = sftp.stat(probe)
        except FileNotFoundError:
            probe = posixpath.dirname(probe)
            continue
        _resolve(sftp, probe, shown)
        if not stat.S_ISDIR(info.st_mode or 0):
            raise InvalidInput(f"{probe} is a file, so {directory} cannot be a directory")
        return probe


def _missing_dirs(existing: str, directory: str) -> list[str]:
    rest = directory[len(existing) :].strip("/")
    made, out = existing, []
    for part in rest.split("/") if rest else []:
        made = posixpath.join(made, part)
        out.append(made)
    return out
