"""``.shopfloor.toml``: what a repo says about itself (test, serve, port, pages, setup).

A stage's ``with`` block overrides the file key by key. Unknown keys and wrong types are
refused with a message naming the key, so a typo does not silently do nothing.

    setup = ["pip install -e ."]
    test = "python3 run_tests.py"
    junit = ["test-results/*.xml"]
    serve = "python3 app.py"
    port = 8000
    pages = ["/", "/about"]
    lint = "python3 -m pyflakes ."
    agent = "claude -p {task}"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from controller.errors import InvalidInput

CONFIG_FILE = ".shopfloor.toml"


@dataclass(frozen=True)
class RepoConfig:
    setup: list[str] = field(default_factory=list)
    """Commands that prepare the checkout (machines run them at provisioning)."""
    test: str | None = None
    """The test command, run in the checkout."""
    junit: list[str] = field(default_factory=list)
    """Globs (relative to the checkout) of the JUnit XML files the test command writes."""
    serve: str | None = None
    """Starts the app in the foreground; it gets ``$PORT``."""
    port: int | None = None
    pages: list[str] = field(default_factory=list)
    """Paths the QA stage screenshots, e.g. ``/`` and ``/about``."""
    lint: str | None = None
    agent: str | None = None
    """Command template of an external coding agent: ``{task}``, ``{handoff_dir}``, ``{plan}``."""
    ready_timeout_s: float = 30.0
    """How long QA waits for the app to listen on ``port``."""
    page_timeout_s: float = 20.0
    """How long one page may take to load before QA records it as not loading."""


_LISTS = {"setup", "junit", "pages"}
_STRINGS = {"test", "serve", "lint", "agent"}
_NUMBERS = {"ready_timeout_s", "page_timeout_s"}
KNOWN = {f.name for f in fields(RepoConfig)}


def parse(text: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{CONFIG_FILE} is not valid TOML: {exc}") from exc
    return data


def build(*layers: dict[str, Any]) -> RepoConfig:
    """Later layers win key by key (file first, then the stage's ``with``)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k in KNOWN})
    return RepoConfig(**{key: _check(key, value) for key, value in merged.items()})


def check_file(data: dict[str, Any]) -> None:
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise InvalidInput(
            f"{CONFIG_FILE}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN))}"
        )


def _check(key: str, value: Any) -> Any:
    if key in _LISTS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInput(f"{key} must be a string or a list of strings")
        if key == "pages":
            bad = [p for p in value if not p.startswith("/")]
            if bad:
                raise InvalidInput(f"pages must be paths starting with '/', got {bad[0]!r}")
        return list(value)
    if key in _STRINGS:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidInput(f"{key} must be a non-empty command string")
        return value
    if key == "port":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535
        ):
            raise InvalidInput(f"port must be a TCP port number (1-65535), got {value!r}")
        return value
    if key in _NUMBERS:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise InvalidInput(f"{key} must be a positive number of seconds")
        return float(value)
    return value


def load(read: Any, workdir: str, params: dict[str, Any]) -> RepoConfig:
    """The repo's file (if any) under the stage's ``with``; ``read`` is the handle's read_file."""
    try:
        text = read(f"{workdir}/{CONFIG_FILE}").decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - no file is the common case: defaults apply
        text = ""
    data = parse(text) if text else {}
    check_file(data)
    return build(data, params)
