"""The session shell's kept state, with the shell run here (bash and /usr/bin/python3, no
machine): written whole or not at all, removed before a closed shell ends, and a state
that is not the one its shell signed is refused."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
from pathlib import Path

import pytest

from controller.transport.sessions import _QUIT, _SHELL

pytestmark = pytest.mark.skipif(
    not os.access("/usr/bin/python3", os.X_OK), reason="the shell signs with /usr/bin/python3"
)
KEY = "k" * 64


def start(tmp_path: Path, *, restore: bool = False) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SF_WORKDIR": str(tmp_path),
        "SF_STATE": str(tmp_path / "state" / ".shopfloor-session-s-1"),
        "SF_FENCE": "7",
    }
    if restore:
        env["SF_RESTORE"] = "1"
    shell = subprocess.Popen(
        ["bash", "--noprofile", "--norc", "-c", _SHELL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert shell.stdin is not None
    shell.stdin.write(KEY.encode() + b"\n")
    shell.stdin.flush()
    return shell


def banner(shell: subprocess.Popen[bytes]) -> str:
    assert shell.stdout is not None
    return shell.stdout.readline().decode().split()[0]


def run(shell: subprocess.Popen[bytes], cmd: str) -> bytes:
    assert shell.stdin is not None
    assert shell.stdout is not None
    shell.stdin.write(cmd.encode() + b"\0__sf_m__\n")
    shell.stdin.flush()
    output = b""
    while b"__sf_m__ " not in output:
        output += shell.stdout.readline()
    return output.partition(b"__sf_m__ ")[0]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    (tmp_path / "state").mkdir()
    (tmp_path / "sub dir").mkdir()
    return tmp_path / "state" / ".shopfloor-session-s-1"


def keep(tmp_path: Path, cmd: str = "cd 'sub dir' && export KEPT=yes", **how: bool) -> None:
    """A shell that runs a command, then loses its input (a dropped connection)."""
    shell = start(tmp_path, **how)
    assert banner(shell) == "ready"
    run(shell, cmd)
    shell.communicate(timeout=30)


def test_a_dropped_shell_keeps_one_whole_signed_file_and_the_next_loads_it(
    tmp_path: Path, state: Path
) -> None:
    keep(tmp_path)
    assert os.listdir(state.parent) == [state.name]  # renamed into place: no temporary left
    mac, _, body = state.read_bytes().partition(b"\n")
    assert mac == hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest().encode()
    assert oct(state.stat().st_mode & 0o777) == "0o600"

    shell = start(tmp_path, restore=True)
    assert banner(shell) == "ready"
    assert run(shell, 'pwd; echo "$KEPT"') == f"{tmp_path}/sub dir\nyes\n".encode()
    shell.communicate(timeout=30)


def test_a_new_kept_state_replaces_the_old_file_and_never_rewrites_it(
    tmp_path: Path, state: Path
) -> None:
    """A shell restoring while another keeps its state reads the old file or the new one,
    each whole: the new one is written aside and renamed over the old."""
    keep(tmp_path)
    os.link(state, tmp_path / "opened by a reader")
    before = state.read_bytes()
    keep(tmp_path, "export MORE=1", restore=True)
    assert (tmp_path / "opened by a reader").read_bytes() == before
    assert b"MORE" in state.read_bytes()
    assert os.listdir(state.parent) == [state.name]


def test_a_closed_shell_removes_its_kept_state_before_it_ends(tmp_path: Path, state: Path) -> None:
    """The controller answers a delete once the shell ended: by then nothing is kept."""
    keep(tmp_path)
    shell = start(tmp_path, restore=True)
    assert banner(shell) == "ready"
    assert state.exists()
    shell.communicate(_QUIT, timeout=30)
    assert shell.returncode == 0
    assert not state.exists()
    assert banner(start(tmp_path, restore=True)) == "gone"


@pytest.mark.parametrize("change", ["appended", "cut short", "last byte gone"])
def test_a_partial_or_rewritten_state_is_refused_and_removed(
    tmp_path: Path, state: Path, change: str
) -> None:
    keep(tmp_path)
    data = state.read_bytes()
    changed = {"appended": data + b"\ntouch injected\n", "cut short": data[:10]}
    state.write_bytes(changed.get(change, data[:-1]))
    assert banner(start(tmp_path, restore=True)) == "forged"
    assert not state.exists()
    assert not (tmp_path / "sub dir" / "injected").exists()
