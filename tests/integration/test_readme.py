"""The README's shell examples, run in order as a user would type them, against a real
``shopfloor serve``.

Every command of every fenced ``sh`` block is run (one bash, so variables carry from line
to line), with these placeholders of the README replaced:

- ``/var/lib/shopfloor`` (the data dir) by the test controller's data dir;
- ``http://127.0.0.1:8080`` (the address ``serve`` listens on) by the test controller's;
- ``/srv/repos/app`` (the repo) by the ``sample_repo`` fixture, the sample app the README
  makes there with ``examples/make_repo.py``;
- ``.venv/bin/`` by the folder of the Python running the tests.

Excluded, by the rules of :data:`EXCLUDED` (the lines they leave out are listed in
:data:`NOT_RUN`, checked, and every rule must match a line, so none outlives its reason):

- ``git clone`` and ``make`` targets: they install packages, start the engine, build the
  image, run the demo or the whole suite; this test runs inside ``make test``;
- ``shopfloor image build``: the suite's ``runner_image`` fixture built it;
- ``shopfloor serve``: the test's :class:`ControllerProcess` is that server (same command,
  on a free port, with the suite's container labels).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ControllerProcess

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXCLUDED = {
    "installs, builds or runs the suite (make, git clone)": re.compile(r"^(git clone|make) "),
    "the runner_image fixture built the image": re.compile(r"shopfloor image build\b"),
    "the test's ControllerProcess is the server": re.compile(r"shopfloor serve\b"),
}
NOT_RUN = [  # what EXCLUDED leaves out of today's README, in order: listed, not silent
    "git clone <this repo> shopfloor && cd shopfloor",
    "make demo",
    "make test",
    ".venv/bin/shopfloor image build",
    ".venv/bin/shopfloor serve --host 127.0.0.1 --port 8080 &",
    "make setup",
    "make test",
    "make test-unit",
    "make lint",
    "make bench",
]
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_FENCES = {"sh", "bash", "shell", "console"}


def shell_blocks(text: str) -> Iterator[str]:
    block: list[str] | None = None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and block is None:
            block = [] if fence.group(1) in SHELL_FENCES else None
            if block is None:  # another language: skip to its closing fence
                block = ["\0skip"]
        elif line.startswith("```") and block is not None:
            if block[:1] != ["\0skip"]:
                yield "\n".join(block)
            block = None
        elif block is not None:
            block.append(line)


def commands(block: str) -> Iterator[str]:
    """One shell command per item: continued lines (``\\``) and open quotes joined."""
    pending = ""
    for line in block.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.rstrip().endswith("\\"):
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            yield pending
        pending = ""
    assert not pending, f"unfinished command in the README: {pending!r}"


def readme_commands() -> list[str]:
    return [cmd for block in shell_blocks(README.read_text()) for cmd in commands(block)]


def excluded_by(command: str) -> str | None:
    return next((why for why, rule in EXCLUDED.items() if rule.search(command)), None)


def test_every_shell_example_of_the_readme_runs(
    tmp_path: Path, runner_image: str, sample_repo: Path
) -> None:
    lines = readme_commands()
    assert any(line.lstrip().startswith("curl") for line in lines)
    excluded = {line: why for line in lines if (why := excluded_by(line))}
    not_run = [line.split("#")[0].strip() for line in excluded]
    assert not_run == NOT_RUN, f"the README's lines not run changed: {excluded}"
    assert set(excluded.values()) == set(EXCLUDED), "a rule that matches nothing: remove it"
    for line in lines:  # a user's curl should fail on an error status, not print it and go on
        assert re.search(r"\bcurl (?!-fsS )", line) is None, f"curl -fsS, please: {line}"

    controller = ControllerProcess(
        tmp_path / "data", runner_image, SHOPFLOOR_POOL_INTERVAL_S="0.5"
    ).start()
    bin_dir = f"{Path(sys.executable).parent}/"
    replacements = {
        "/var/lib/shopfloor": str(controller.data_dir),
        "http://127.0.0.1:8080": controller.url,
        "/srv/repos/app": str(sample_repo),
        ".venv/bin/": bin_dir,
    }
    to_run = [line for line in lines if line not in excluded]
    script = ["set -uo pipefail"]
    for index, line in enumerate(to_run):
        for placeholder, value in replacements.items():
            line = line.replace(placeholder, value)
        script += [
            f"echo '>>> {index}'",
            line,
            f"rc=$?; printf '\\n<<< {index} %s\\n' $rc; [ $rc -eq 0 ] || exit $rc",
        ]
    env = {k: v for k, v in controller.env.items() if not k.startswith("SHOPFLOOR_")}
    env["SHOPFLOOR_EXTRA_LABELS"] = controller.env["SHOPFLOOR_EXTRA_LABELS"]
    try:
        done = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    finally:
        controller.stop()
    finished = dict(re.findall(r"^<<< (\d+) (\d+)$", done.stdout, re.MULTILINE))
    for index, line in enumerate(to_run):
        assert finished.get(str(index)) == "0", (
            f"README line failed (exit {finished.get(str(index), 'not reached')}):\n{line}\n"
            f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("a \\\n  b\n# note\nc 'd\ne'", ["a \\\n  b", "c 'd\ne'"]),
        ("x=$(f | awk '{print $NF}')  # why", ["x=$(f | awk '{print $NF}')  # why"]),
    ],
)
def test_commands_are_split_as_the_shell_reads_them(block: str, expected: list[str]) -> None:
    assert list(commands(block)) == expected
