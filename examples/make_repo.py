"""Turn a folder of examples/ into a git repository at a destination (demo and tests use it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent

SAMPLE_CHANGE_STAGES: list[dict[str, Any]] = [
    {"name": "plan", "agent": "planner"},
    {
        "name": "implement",
        "agent": "external",
        "with": {"command": "sed -i 's/Served from the/Built by the/' app.py"},
    },
    {"name": "test", "agent": "tester"},
    {"name": "review", "agent": "reviewer"},
    {"name": "qa", "agent": "qa"},
]
"""The change the demo and the end-to-end test put the sample app through, with the
built-in agents (the `implement` stage's "coding agent" is a sed command)."""


def make_sample_repo(dest: Path, name: str = "sample-app") -> Path:
    """Copy ``examples/<name>`` to ``dest`` and commit it on ``main``; returns ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(EXAMPLES / name, dest, ignore=shutil.ignore_patterns("__pycache__"))
    git = [
        "git",
        "-C",
        str(dest),
        "-c",
        "user.name=Shopfloor",
        "-c",
        "user.email=demo@shopfloor.local",
    ]
    subprocess.run([*git, "init", "--quiet", "--initial-branch=main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "sample app"], check=True)
    return dest


if __name__ == "__main__":
    print(make_sample_repo(Path(sys.argv[1])))  # noqa: T201
