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

    [verify]                        # when a change counts as finished (see VerifyPolicy)
    required_stages = ["plan", "implement", "test", "review", "qa"]
    approvals = 1
    max_changed_pixels = 0.02
    console_errors = "fail"
    flaky = "quarantine"

    [owners]                        # who answers for a stage: stage = "owner"
    test = "qa-team"
"""

from __future__ import annotations

import re
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
    """Command template of an external coding agent: ``{task}``, ``{handoff_dir}``, ``{plan}``,
    ``{workdir}``, ``{lessons}`` (the path of ``lessons.md``: what earlier runs of the repo
    taught — recurring failures, their fixes, flaky tests)."""
    ready_timeout_s: float = 30.0
    """How long QA waits for the app to listen on ``port``."""
    page_timeout_s: float = 20.0
    """How long one page may take to load before QA records it as not loading."""


@dataclass(frozen=True)
class VerifyPolicy:
    """When a run counts as finished: each field is one criterion of its checklist."""

    required_stages: list[str] | None = None
    """Stages that must have passed; None: every stage the run has (unless its ``with`` says
    ``required: false``)."""
    approvals: int = 1
    """Reviewer approvals needed."""
    max_changed_pixels: float | None = None
    """Largest share of a page's pixels that may differ from its baseline; None: no limit."""
    console_errors: str = "warn"
    """``fail``: a page that logged console errors fails the criterion; ``warn``: shown only."""
    flaky: str = "fail"
    """``quarantine``: failures of quarantined tests do not fail the test stage."""


@dataclass(frozen=True)
class RepoPolicy:
    """What a repo's ``.shopfloor.toml`` says about the factory: ``[verify]`` and ``[owners]``."""

    verify: VerifyPolicy = field(default_factory=VerifyPolicy)
    owners: dict[str, str] = field(default_factory=dict)
    """Stage name -> owner (a team or person's handle)."""


SECTIONS = {"verify", "owners"}
_CHOICES = {"console_errors": ("fail", "warn"), "flaky": ("fail", "quarantine")}
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
_STAGE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
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
    known = KNOWN | SECTIONS
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(
            f"{CONFIG_FILE}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def policy(data: dict[str, Any]) -> RepoPolicy:
    """The ``[verify]`` and ``[owners]`` tables, checked key by key (the message names it)."""
    return RepoPolicy(
        verify=_verify(_table(data, "verify")), owners=_owners(_table(data, "owners"))
    )


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise InvalidInput(f"{CONFIG_FILE}: [{name}] must be a table")
    return table


def _verify(table: dict[str, Any]) -> VerifyPolicy:
    known = {f.name for f in fields(VerifyPolicy)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise InvalidInput(
            f"{CONFIG_FILE} [verify]: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{CONFIG_FILE} [verify] {key}"
        if key == "required_stages":
            if not isinstance(value, list) or not all(
                isinstance(v, str) and _STAGE.match(v) for v in value
            ):
                raise InvalidInput(f"{where} must be a list of stage names")
        elif key == "approvals":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
                raise InvalidInput(f"{where} must be a whole number from 0 to 10")
        elif key == "max_changed_pixels":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise InvalidInput(f"{where} must be a share from 0 to 1")
            value = float(value)
        elif value not in _CHOICES[key]:
            raise InvalidInput(f"{where} must be one of {', '.join(_CHOICES[key])}")
        values[key] = value
    return VerifyPolicy(**values)


def _owners(table: dict[str, Any]) -> dict[str, str]:
    for stage, owner in table.items():
        if not _STAGE.match(stage):
            raise InvalidInput(f"{CONFIG_FILE} [owners]: {stage!r} is not a stage name")
        if not isinstance(owner, str) or not _OWNER.match(owner):
            raise InvalidInput(
                f"{CONFIG_FILE} [owners] {stage} must be an owner's name "
                "(letters, digits, '.', '_', '@', '-')"
            )
    return dict(table)


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


def read_file(read: Any, workdir: str) -> dict[str, Any]:
    """The repo's file as a checked table ({} when there is none); ``read`` is the handle's
    read_file."""
    try:
        text = read(f"{workdir}/{CONFIG_FILE}").decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - no file is the common case: defaults apply
        text = ""
    data = parse(text) if text else {}
    check_file(data)
    return data


def load(read: Any, workdir: str, params: dict[str, Any]) -> RepoConfig:
    """The repo's file (if any) under the stage's ``with``."""
    return build(read_file(read, workdir), params)


def load_policy(read: Any, workdir: str) -> RepoPolicy:
    """The repo's ``[verify]`` and ``[owners]`` (defaults when the file says nothing)."""
    return policy(read_file(read, workdir))
