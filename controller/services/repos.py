"""Repo and ref values: what we accept, and how a repo reaches a machine.

Both end up as arguments to git, so they are checked against hostile forms (``ext::``
transports, leading dashes that git would read as options, control characters) before
git ever sees them. Every repo, remote or local, is mirrored on the controller host by
the controller itself and the mirror is bind-mounted read-only: machines with network
``none`` clone remote repos too, and the machine's user never reads the operator's
folders (see :func:`sync_mirror`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from controller.errors import Forbidden, InvalidInput

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


def local_text(value: str) -> str | None:
    """The path a repo value names on the controller's host (``/x``, ``file:///x``), or
    None for a URL. Text only: the filesystem is not touched."""
    if value.startswith(_REMOTE_SCHEMES) or _SCP_LIKE.match(value):
        return None
    if "://" in value:
        return value.removeprefix("file://") if value.startswith("file://") else None
    return None if _TRANSPORT_PREFIX.match(value) else value


def same_repo(given: str, *known: str) -> bool:
    """Whether ``given`` names one of ``known`` (paths compared normalized, as text)."""

    def norm(value: str) -> str:
        path = local_text(value)
        return value if path is None else os.path.normpath(path)

    return norm(given) in {norm(value) for value in known}


def parse_repo(value: str, *, roots: list[Path]) -> RepoSource:
    """Validate a repo value: an http(s)/ssh/git URL, ``user@host:path``, or a local folder
    (under ``roots`` when there are any: 403 otherwise)."""
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
    resolved = path.resolve()  # symlinks followed: what git would read
    if roots and not any(within(resolved, r) for r in roots):
        raise Forbidden("local repo lies outside the allowed roots (SHOPFLOOR_REPO_ROOTS)")
    if not resolved.is_dir():
        raise InvalidInput(f"local repo {value} is not a directory the controller can read")
    if not ((resolved / ".git").exists() or (resolved / "HEAD").is_file()):
        raise InvalidInput(f"local repo {value} is not a git repository")
    return RepoSource(value=str(resolved), local_path=resolved, name=repo_name_from(str(resolved)))


def within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_not_within(source: RepoSource, forbidden: list[tuple[Path, str]]) -> None:
    """Refuse (403) a local repo in one of the ``forbidden`` folders (resolved paths, with
    what they are): the folder itself, its ``.git`` and the repository a ``.git`` file
    points to, symlinks resolved — what git would read."""
    if source.local_path is None:
        return
    for path in safe_directories(source.local_path):
        real = path.resolve()
        for root, what in forbidden:
            if within(real, root):
                raise Forbidden(
                    f"local repo {source.value} lies in {what} ({root}), which is never a "
                    "repo source: it holds machines' workspaces or the controller's own "
                    "files; name the repo where its owner keeps it, or a URL"
                )


def check_ref(ref: str) -> str:
    """Accept branch, tag and commit names; refuse what git could read as an option or range."""
    _check_text(ref, "ref", 255)
    if not _REF.match(ref) or ".." in ref or "@{" in ref or ref.endswith((".lock", "/", ".")):
        raise InvalidInput(
            "ref must be a branch, tag or commit name (letters, digits, '._/+-', no '..')"
        )
    return ref


def mirror_path(data_dir: Path, value: str) -> Path:
    """The one mirror of a repo (a URL, or a local repo's resolved path) on this host."""
    return data_dir / "mirrors" / (hashlib.sha256(value.encode()).hexdigest()[:20] + ".git")


def sync_mirror(data_dir: Path, source: RepoSource, *, timeout_s: float = 600) -> Path:
    """Bring the host-side bare mirror of ``source`` up to date and return its path.

    Machines clone from this mirror (mounted read-only), never from the repo itself:

    - a remote repo is cloned or fetched here, so machines with network ``none`` clone too;
    - a local repo is read by the controller, as the user it runs as: the machine's user
      could not read an operator's folder (0700 under /root or from ``mktemp -d``, files
      made under ``umask 077``, a repo of another uid). The mirror's HEAD follows the
      repo's HEAD, so the default ref is the branch (or detached commit) checked out
      there now. Only commits reach a machine: uncommitted changes in the operator's
      working tree are not part of a clone, as with any ``git clone``.

    Every machine of one repo shares its mirror: it is updated in place, under a lock
    (``<mirror>.lock``, held across processes), and made readable by every user (git runs
    with umask 022) since the machine's user is not the controller's.
    """
    path = mirror_path(data_dir, source.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        if source.local_path is None:
            _sync_remote(path, source.value, timeout_s)
        else:
            _sync_local(path, source.local_path, timeout_s)
    return path


def resolve_commit(
    data_dir: Path, source: RepoSource, ref: str, *, timeout_s: float = 600
) -> str | None:
    """The commit ``ref`` names in the repo now (its mirror brought up to date first);
    None when the repo has no such ref (the clone then says why)."""
    path = sync_mirror(data_dir, source, timeout_s=timeout_s)
    result = _git(
        [
            "--git-dir",
            str(path),
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            f"{ref}^{{commit}}",
        ],
        timeout_s,
    )
    return result.stdout.strip() or None if result.returncode == 0 else None


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # per open file: excludes other threads and processes
        yield
    finally:
        os.close(fd)


def _git(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *argv],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        env={**os.environ, **GIT_SAFE_ENV},
        umask=0o022,  # the mirror is read by the machine's user, whatever ours is
        check=False,
    )


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip()[-1000:]


def _sync_remote(path: Path, url: str, timeout_s: float) -> None:
    if (path / "HEAD").exists():
        argv = ["--git-dir", str(path), "fetch", "--prune", "--quiet", "--", "origin"]
    else:
        _remove(path)
        argv = ["clone", "--mirror", "--quiet", "--", url, str(path)]
    result = _git(argv, timeout_s)
    if result.returncode != 0:
        raise InvalidInput(f"git could not fetch {url}: {_tail(result)}")


def _sync_local(path: Path, repo: Path, timeout_s: float) -> None:
    upload_pack = upload_pack_command(repo)
    result = _git(
        ["ls-remote", "--symref", "--upload-pack", upload_pack, "--", str(repo), "HEAD"],
        timeout_s,
    )
    head = parse_head(result.stdout) if result.returncode == 0 else None
    if result.returncode == 0:
        # --no-local: through git's transport (upload-pack), never hard links to the
        # repo's files, which would keep their owner and mode (0600 under umask 077).
        if (path / "HEAD").exists():
            argv = ["--git-dir", str(path), "fetch", "--prune", "--quiet"]
            argv += ["--upload-pack", upload_pack, "--", "origin", "+refs/*:refs/*"]
            if head and not head.startswith("refs/"):
                argv.append("HEAD")  # a detached HEAD's commits may be on no branch
        else:
            _remove(path)
            argv = ["clone", "--mirror", "--no-local", "--quiet", "--upload-pack", upload_pack]
            argv += ["--", str(repo), str(path)]
        result = _git(argv, timeout_s)
    if result.returncode != 0:
        raise InvalidInput(f"the controller cannot read the repo {repo}: {_tail(result)}")
    if head is None:
        return  # no commit yet: nothing to point at
    if head.startswith("refs/"):
        argv = ["--git-dir", str(path), "symbolic-ref", "--", "HEAD", head]
    else:
        argv = ["--git-dir", str(path), "update-ref", "--no-deref", "--", "HEAD", head]
    result = _git(argv, timeout_s)
    if result.returncode != 0:
        raise InvalidInput(f"could not update the mirror of {repo}: {_tail(result)}")


def _remove(path: Path) -> None:
    """What an interrupted first clone left behind (we hold the lock)."""
    if path.exists():
        shutil.rmtree(path)


def safe_directories(repo: Path) -> list[Path]:
    """Every path git may name as ``repo``'s repository in its ownership check: the folder
    (a bare repo), its ``.git``, or the folder a ``.git`` file points to (a worktree)."""
    found = [repo, repo / ".git"]
    git_file = repo / ".git"
    if git_file.is_file():
        text = git_file.read_text(errors="replace").strip()
        if text.startswith("gitdir:"):
            found.append((repo / text.removeprefix("gitdir:").strip()).resolve())
    return found


def upload_pack_command(repo: Path) -> str:
    """``git upload-pack`` that accepts ``repo`` even when another uid owns it.

    ``-c safe.directory=...`` given to clone or fetch would not reach it: for a local
    repo, git starts upload-pack with the caller's ``-c`` settings cleared, and runs it
    through the shell, so each value is quoted. This trusts that one repo for that one
    read; git's global configuration is left alone.
    """
    options = " ".join(
        f"-c {shlex.quote(f'safe.directory={path}')}" for path in safe_directories(repo)
    )
    return f"git {options} upload-pack"


_HEX_OID = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def parse_head(ls_remote: str) -> str | None:
    """The HEAD of ``git ls-remote --symref <repo> HEAD`` output: the branch it points to
    (``refs/heads/...``), else its commit id (detached, or a branch name we would not
    accept as a ref), None when there is no commit yet."""
    symref = oid = None
    for line in ls_remote.splitlines():
        value, _, name = line.partition("\t")
        if name != "HEAD":
            continue
        if value.startswith("ref: "):
            branch = value.removeprefix("ref: refs/heads/")
            if branch != value and _REF.match(branch) and ".." not in branch:
                symref = value.removeprefix("ref: ")
        elif _HEX_OID.match(value):
            oid = value
    return symref or oid
