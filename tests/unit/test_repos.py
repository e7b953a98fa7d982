from __future__ import annotations

import os
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from controller.errors import Forbidden, InvalidInput
from controller.services.repos import (
    RepoSource,
    check_ref,
    mirror_path,
    parse_head,
    parse_repo,
    repo_name_from,
    safe_directories,
    sync_mirror,
    upload_pack_command,
)


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "proj"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    return repo


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a/b.git",
        "http://h/x",
        "ssh://git@h/x.git",
        "git://h/x",
        "git@github.com:o/r.git",
    ],
)
def test_remote_forms_are_accepted(url: str) -> None:
    source = parse_repo(url, roots=[])
    assert source.is_remote
    assert source.name in {"b", "x", "r"}


@pytest.mark.parametrize(
    "value",
    [
        "ext::sh -c id",
        "fd::3",
        "-uhttps://x",
        "--upload-pack=id",
        "a\nb",
        "a\x00b",
        "",
        "x" * 3000,
        "ftp://h/x",
        "relative",
        "https://h/has space",
    ],
)
def test_hostile_or_malformed_repos_are_refused(value: str) -> None:
    with pytest.raises(InvalidInput):
        parse_repo(value, roots=[])


def test_local_repo_and_roots(git_repo: Path, tmp_path: Path) -> None:
    assert parse_repo(str(git_repo), roots=[]).local_path == git_repo.resolve()
    assert parse_repo(f"file://{git_repo}", roots=[]).name == "proj"
    assert parse_repo(str(git_repo), roots=[tmp_path.resolve()]).local_path == git_repo.resolve()
    with pytest.raises(Forbidden, match="outside the allowed roots"):
        parse_repo(str(git_repo), roots=[tmp_path.resolve() / "elsewhere"])


def test_symlink_out_of_roots_is_refused(git_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(git_repo)
    with pytest.raises(Forbidden, match="outside"):
        parse_repo(str(root / "link"), roots=[root.resolve()])


def test_a_plain_folder_is_not_a_repo(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a git repository"):
        parse_repo(str(tmp_path), roots=[])


@pytest.mark.parametrize("ref", ["main", "v1.2.3", "feature/x-y", "0123abcd", "HEAD", "release+1"])
def test_good_refs(ref: str) -> None:
    assert check_ref(ref) == ref


@pytest.mark.parametrize(
    "ref", ["-x", "--orphan", "a..b", "x@{1}", "a b", "x.lock", "dir/", ".hidden", "a\n"]
)
def test_bad_refs(ref: str) -> None:
    with pytest.raises(InvalidInput):
        check_ref(ref)


def test_repo_names_are_safe_folder_names() -> None:
    assert repo_name_from("https://h/o/My Repo.git") == "My-Repo"
    assert repo_name_from("/srv/../.hidden") == "hidden"
    assert repo_name_from("git@h:o/r.git") == "r"


# --- host-side mirrors of local repos ----------------------------------------------------

GIT = ["git", "-c", "user.name=Op", "-c", "user.email=op@example.invalid"]


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        [*GIT, "-c", f"safe.directory={repo}", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


@pytest.fixture
def private_repo(tmp_path: Path) -> Path:
    """A repo made under ``umask 077``: nobody but its owner can read a byte of it."""
    repo = tmp_path / "private"
    repo.mkdir(mode=0o700)
    _git(repo, "init", "-q", "--initial-branch=main")
    (repo / "a.txt").write_text("a\n")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "first")
    for path in [repo, *repo.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    return repo


def _mirror_git(mirror: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(mirror), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_parse_head() -> None:
    sha = "a" * 40
    assert parse_head(f"ref: refs/heads/main\tHEAD\n{sha}\tHEAD\n") == "refs/heads/main"
    assert parse_head(f"{sha}\tHEAD\n") == sha
    assert parse_head("") is None
    # a pattern HEAD also matches refs/remotes/origin/HEAD: only HEAD itself counts
    assert parse_head(f"ref: refs/heads/x\trefs/remotes/origin/HEAD\n{sha}\tHEAD\n") == sha
    assert parse_head("ref: refs/heads/-x\tHEAD\n") is None
    assert parse_head("ref: refs/tags/v1\tHEAD\n") is None
    assert parse_head("--upload-pack=x\tHEAD\n") is None


def test_safe_directories_name_the_git_dir(tmp_path: Path) -> None:
    assert safe_directories(tmp_path) == [tmp_path, tmp_path / ".git"]
    (tmp_path / ".git").write_text("gitdir: ../elsewhere/.git/worktrees/w\n")
    assert safe_directories(tmp_path)[2] == (tmp_path.parent / "elsewhere/.git/worktrees/w")


def test_upload_pack_command_quotes_the_path() -> None:
    repo = Path("/srv/it's a $(repo)")
    argv = shlex.split(upload_pack_command(repo))
    assert argv == [
        "git",
        "-c",
        f"safe.directory={repo}",
        "-c",
        f"safe.directory={repo}/.git",
        "upload-pack",
    ]


def test_mirror_of_a_private_repo_is_readable_and_follows_it(
    private_repo: Path, tmp_path: Path
) -> None:
    source = parse_repo(str(private_repo), roots=[])
    mirror = sync_mirror(tmp_path / "data", source)
    assert mirror == mirror_path(tmp_path / "data", str(private_repo.resolve()))
    first = _git(private_repo, "rev-parse", "HEAD")
    assert _mirror_git(mirror, "rev-parse", "HEAD") == first
    for path in [mirror, *mirror.rglob("*")]:  # the machine's user reads all of it
        assert path.stat().st_mode & 0o004, path
        assert not path.is_dir() or path.stat().st_mode & 0o001, path

    _git(private_repo, "checkout", "-q", "-b", "feature")
    _git(private_repo, "commit", "-q", "--allow-empty", "-m", "second")
    _git(private_repo, "branch", "-q", "-D", "main")
    (private_repo / "dirty.txt").write_text("uncommitted\n")
    assert sync_mirror(tmp_path / "data", source) == mirror  # updated in place
    assert _mirror_git(mirror, "symbolic-ref", "HEAD") == "refs/heads/feature"
    assert _mirror_git(mirror, "for-each-ref", "--format=%(refname)") == "refs/heads/feature"
    assert _mirror_git(mirror, "ls-tree", "--name-only", "HEAD") == "a.txt"

    _git(private_repo, "checkout", "-q", "--detach")
    _git(private_repo, "commit", "-q", "--allow-empty", "-m", "on no branch")
    sync_mirror(tmp_path / "data", source)
    assert _mirror_git(mirror, "rev-parse", "HEAD") == _git(private_repo, "rev-parse", "HEAD")
    assert _mirror_git(mirror, "log", "-1", "--format=%s", "HEAD") == "on no branch"
    assert [p.name for p in mirror.parent.iterdir() if p.suffix == ".git"] == [mirror.name]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_mirror_of_a_repo_of_another_uid(private_repo: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(private_repo), str(bare)], check=True)
    for repo in (private_repo, bare):
        for path in [repo, *repo.rglob("*")]:
            os.chown(path, 12345, 12345)
        mirror = sync_mirror(tmp_path / "data", parse_repo(str(repo), roots=[]))
        assert _mirror_git(mirror, "log", "-1", "--format=%s") == "first"


def test_a_repo_the_controller_cannot_read_says_so(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / ".git").mkdir(parents=True)
    source = parse_repo(str(broken), roots=[])
    with pytest.raises(InvalidInput, match="the controller cannot read the repo"):
        sync_mirror(tmp_path / "data", source)


def test_concurrent_syncs_of_one_repo_share_one_mirror(private_repo: Path, tmp_path: Path) -> None:
    source = parse_repo(str(private_repo), roots=[])
    with ThreadPoolExecutor(6) as pool:
        paths = set(pool.map(lambda _: sync_mirror(tmp_path / "data", source), range(6)))
    assert len(paths) == 1
    (mirror,) = paths
    assert _mirror_git(mirror, "log", "-1", "--format=%s") == "first"
    assert sorted(p.name for p in mirror.parent.iterdir()) == [mirror.name, f"{mirror.stem}.lock"]


def test_remote_mirror_clones_then_fetches_in_place(private_repo: Path, tmp_path: Path) -> None:
    url = f"file://{private_repo}"  # parse_repo would call it local; the remote path is the same
    source = RepoSource(value=url, local_path=None, name="private")
    mirror = sync_mirror(tmp_path / "data", source)
    _git(private_repo, "commit", "-q", "--allow-empty", "-m", "second")
    assert sync_mirror(tmp_path / "data", source) == mirror
    assert _mirror_git(mirror, "log", "-1", "--format=%s", "main") == "second"
