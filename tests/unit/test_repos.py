from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from controller.errors import InvalidInput
from controller.services.repos import check_ref, parse_repo, repo_name_from


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
    with pytest.raises(InvalidInput, match="outside the allowed roots"):
        parse_repo(str(git_repo), roots=[tmp_path.resolve() / "elsewhere"])


def test_symlink_out_of_roots_is_refused(git_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(git_repo)
    with pytest.raises(InvalidInput, match="outside"):
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
