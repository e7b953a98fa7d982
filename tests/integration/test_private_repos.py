"""Local repos the machine's user could not read itself: the controller reads them.

An operator's repo usually sits where only the operator can read it: under /root, in a
``mktemp -d`` folder (0700), made with ``umask 077``, or owned by another uid. The
controller keeps a host-side mirror of it, readable by the machine's user, and mounts that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from make_repo import make_sample_repo

from controller.providers.docker import DockerProvider
from controller.settings import Settings
from tests.integration.test_bad_input import engine_objects, install_id
from tests.integration.test_machines import create, run
from tests.integration.test_runs import cmd, create_run, wait_run

OTHER_UID = 12345
GIT = ["git", "-c", "user.name=Op", "-c", "user.email=op@example.invalid"]


def _lock_down(root: Path, uid: int | None = None) -> None:
    """What ``umask 077`` (and, with ``uid``, a ``chown -R``) would have made."""
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            path.chmod(0o700 if path.is_dir() else 0o600)
            if uid is not None:
                os.chown(path, uid, uid)
    root.chmod(0o700)
    if uid is not None:
        os.chown(root, uid, uid)


@pytest.fixture
def private_folder() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="sf-private-"))  # 0700, like `mktemp -d`
    assert folder.stat().st_mode & 0o777 == 0o700
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def private_repo(private_folder: Path) -> Path:
    repo = make_sample_repo(private_folder / "sample-app")
    _lock_down(repo)
    return repo


@pytest.fixture
def foreign_repo(private_folder: Path) -> Path:
    repo = make_sample_repo(private_folder / "sample-app")
    _lock_down(repo, uid=OTHER_UID)
    return repo


def _commit(repo: Path, *args: str) -> None:
    git = [*GIT, "-c", f"safe.directory={repo}", "-C", str(repo)]
    for step in args:
        subprocess.run([*git, *step.split()], check=True, capture_output=True)


def test_private_repo_provisions_and_follows_new_commits(
    client: TestClient, settings: Settings, private_repo: Path
) -> None:
    machine = create(client, repo=str(private_repo))
    assert machine["state"] == "ready", machine
    result = run(client, str(machine["id"]), "ls; git log --oneline | wc -l; whoami")
    assert result["exit_code"] == 0, result
    out = str(result["stdout"]).split()
    assert "app.py" in out, out
    assert out[-2:] == ["1", "runner"], out

    # New commits and a switched branch show up in the next machine (the mirror refreshes).
    (private_repo / "NEW.md").write_text("new\n")
    _commit(private_repo, "checkout -q -b feature", "add NEW.md", "commit -q -m new")
    again = create(client, repo=str(private_repo))
    assert again["state"] == "ready", again
    assert again["commit"] != machine["commit"]
    result = run(client, str(again["id"]), "cat NEW.md; git log --oneline | wc -l; git branch")
    assert str(result["stdout"]).split() == ["new", "2", "*", "feature"], result

    # A detached HEAD with a commit on no branch: the machine gets that commit.
    _commit(private_repo, "checkout -q --detach", "commit -q --allow-empty -m loose")
    loose = create(client, repo=str(private_repo))
    assert loose["state"] == "ready", loose
    result = run(client, str(loose["id"]), "git log -1 --format=%s; git branch --show-current")
    assert result["stdout"] == "loose\n", result

    main = create(client, repo=str(private_repo), ref="main")
    assert main["state"] == "ready", main
    assert main["commit"] == machine["commit"]

    # One mirror for the repo, however many machines; readable by the machine's user.
    mirrors = [p for p in (settings.data_dir / "mirrors").iterdir() if p.suffix == ".git"]
    assert len(mirrors) == 1, mirrors
    assert mirrors[0].stat().st_mode & 0o005 == 0o005


def test_repo_of_another_uid_provisions(client: TestClient, foreign_repo: Path) -> None:
    assert foreign_repo.stat().st_uid == OTHER_UID
    machine = create(client, repo=str(foreign_repo), ref="main")
    assert machine["state"] == "ready", machine
    result = run(client, str(machine["id"]), "cat README.md >/dev/null && git status --short")
    assert result["exit_code"] == 0, result
    assert result["stdout"] == ""


def test_unknown_ref_of_a_private_repo_still_fails_with_gits_reason(
    client: TestClient, private_repo: Path
) -> None:
    machine = create(client, repo=str(private_repo), ref="no-such-branch")
    assert machine["state"] == "failed"
    assert "unknown ref 'no-such-branch'" in str(machine["reason"])


def test_repo_the_controller_cannot_read_fails_with_that_reason(
    client: TestClient, provider: DockerProvider, private_folder: Path
) -> None:
    broken = private_folder / "broken"
    (broken / ".git").mkdir(parents=True)  # looks like a repo; git cannot read it
    (broken / ".git" / "HEAD").write_text("not a ref\n")
    machine = create(client, repo=str(broken))
    assert machine["state"] == "failed"
    assert "the controller cannot read the repo" in str(machine["reason"]), machine
    assert engine_objects(provider, install_id(client)) == (0, 0)


def test_run_without_pool_on_a_private_repo(live_client: TestClient, private_repo: Path) -> None:
    run_ = create_run(
        live_client,
        task="private repo",
        repo=str(private_repo),
        stages=[cmd("test", "test -f app.py && git rev-parse --abbrev-ref HEAD")],
    )
    ended = wait_run(live_client, run_["id"])
    assert ended["status"] == "passed", ended
    assert "main" in ended["stages"][0]["history"][0]["log_tail"]
