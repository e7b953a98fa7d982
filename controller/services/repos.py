"""Repo and ref values: what we accept, and how a repo reaches a machine.

Both end up as arguments to git, so they are checked against hostile forms (``ext::``
transports, leading dashes that git would read as options, control characters) before
git ever sees them. Remote repos are mirrored on the controller host and bind-mounted
read-only, so machines with network ``none`` can clone them too.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from controller.errors import InvalidInput

_REMOTE_SCHEMES = ("https://", "http://", "ssh://", "git://")
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!//)[^\s]+$")
_TRANSPORT_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]{0,254}$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
GIT_SAFE_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ALLOW_PROTOCOL": "http:https:ssh:git:file",
    "GIT_CONFIG_NOSYSTEM": "1",
}


@dataclass(frozen=True)
class RepoSource:
    """A validated repo value: either a local folder or a remote URL."""

    value: str
    local_path: Path | None
    name: str

    @property
    def is_remote(self) -> bool:
        return self.local_path is None


def _check_text(value: str, what: str, max_len: int) -> None:
    if not value or len(value) > max_len:
        raise InvalidInput(f"{what} must be 1 to {max_len} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidInput(f"{what} must not contain control characters (newlines, NUL, ...)")
    if value.startswith("-"):
        raise InvalidInput(f"{what} must not start with '-'")


def repo_name_from(value: str) -> str:
    tail = value.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    tail = tail.removesuffix(".git")
    name = _NAME_CHARS.sub("-", tail).lstrip(".-") or "repo"
    return name[:64]


def parse_repo(value: str, *, roots: list[Path]) -> RepoSource:
    """Validate a repo value: an http(s)/ssh/git URL, ``user@host:path``, or a local folder."""
    _check_text(value, "repo", 2048)
    if _TRANSPORT_PREFIX.match(value):
        raise InvalidInput(
            "repo uses a git remote-helper transport (like 'ext::'), which is refused"
        )
    if value.startswith(_REMOTE_SCHEMES) or _SCP_LIKE.match(value):
        if " " in value:
            raise InvalidInput("repo URL must not contain spaces")
        return RepoSource(value=value, local_path=None, name=repo_name_from(value))
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if scheme != "file":
            raise InvalidInput(
                f"repo scheme '{scheme}' is not supported: use https, ssh, git or a path"
            )
        value = value.removeprefix("file://")
    path = Path(value)
    if not path.is_absolute():
        raise InvalidInput("a local repo must be an absolute path")
    resolved = path.resolve()
    if roots and not any(resolved == r or r in resolved.parents for r in roots):
        raise InvalidInput("local repo lies outside the allowed roots (SHOPFLOOR_REPO_ROOTS)")
    if not resolved.is_dir():
        raise InvalidInput(f"local repo {value} is not a directory the controller can read")
    if not ((resolved / ".git").exists() or (resolved / "HEAD").is_file()):
        raise InvalidInput(f"local repo {value} is not a git repository")
    return RepoSource(value=str(resolved), local_path=resolved, name=repo_name_from(str(resolved)))


def check_ref(ref: str) -> str:
    """Accept branch, tag and commit names; refuse what git could read as an option or range."""
    _check_text(ref, "ref", 255)
    if not _REF.match(ref) or ".." in ref or "@{" in ref or ref.endswith((".lock", "/", ".")):
        raise InvalidInput(
            "ref must be a branch, tag or commit name (letters, digits, '._/+-', no '..')"
        )
    return ref


def mirror_path(data_dir: Path, url: str) -> Path:
    return data_dir / "mirrors" / (hashlib.sha256(url.encode()).hexdigest()[:20] + ".git")


def sync_mirror(data_dir: Path, url: str, *, timeout_s: float = 600) -> Path:
    """Clone or fetch a bare mirror of a remote repo on the controller host."""
    path = mirror_path(data_dir, url)
    path.parent.mkdir(parents=True, exist_ok=True)
    if (path / "HEAD").exists():
        argv = ["git", "--git-dir", str(path), "fetch", "--prune", "--quiet", "origin"]
    else:
        argv = ["git", "clone", "--mirror", "--quiet", "--", url, str(path)]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        env={**os.environ, **GIT_SAFE_ENV},
        check=False,
    )
    if result.returncode != 0:
        raise InvalidInput(f"git could not fetch {url}: {result.stderr.strip()[-1000:]}")
    return path
