"""Failure signatures: what failed in a stage attempt, as a stable hash and a class.

Pure logic (no database, no engine). A signature is the SHA-256 of the failure's class and
a normalized text: for a JUnit report the failed test ids with the failure's type and first
message line; without JUnit the last error lines of the attempt's log. Everything that
differs between two runs of the same failure is masked first: timestamps, durations, temp
paths (``/tmp/...``, ``pytest-of-*``), the machine's checkout (``/workspace/<repo>``), ids,
hex and numbers. So the same failure matches across runs and machines, and a different test,
type or message does not.

The class says whose fault it likely was: ``test`` (the code under test), ``setup`` (the
tests could not start: missing command, import error, fixture error, a bad repo config),
``timeout``, ``infra`` (the machine: engine error, OOM kill (exit 137), disk full, lost
machine, SSH down) and ``agent`` (the stage's agent itself raised).

:func:`quarantine_verdict` is the machine-health rule over recent attempts.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from evidence.junit import Case, Report
from evidence.logs import is_failure, strip_ansi

Kind = Literal["test", "setup", "timeout", "infra", "agent"]
KINDS: tuple[Kind, ...] = ("test", "setup", "timeout", "infra", "agent")
SAMPLE_CHARS = 1200
"""How much of the failure's own (unmasked) text a signature keeps as its sample."""
MAX_CASES = 20
"""Failed tests that make a JUnit signature (sorted ids; more are left out)."""
LOG_LINES = 5
"""Error lines from the end of a log that make a log signature."""

# ---------------------------------------------------------------- masking

_MASKS: list[tuple[re.Pattern[str], str]] = [
    # ISO and log timestamps, then clock times and durations
    (
        re.compile(
            r"\d{4}-\d{2}-\d{2}[T ]\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?"
        ),
        "<ts>",
    ),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<ts>"),
    (
        re.compile(
            r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun),? \d{1,2} \w{3} \d{4}\b|"
            r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) \w{3} +\d{1,2}\b"
        ),
        "<ts>",
    ),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s|sec|seconds|µs|us|ns|m|min)\b"), "<dur>"),
    # temp folders and the machine's own paths
    (re.compile(r"(?:/private)?/(?:var/)?tmp/[^\s'\":,)\]]*"), "<tmp>"),
    (re.compile(r"/var/folders/[^\s'\":,)\]]*"), "<tmp>"),
    (re.compile(r"pytest-of-[^\s/'\"]+(?:/pytest-\d+)?(?:/[^\s/'\"]+)?"), "<tmp>"),
    (re.compile(r"/workspace/[^\s/'\":,)\]]+"), "<ws>"),
    (re.compile(r"/home/[^\s/'\":,)\]]+|/root\b"), "<home>"),
    # ids: UUIDs, shopfloor ids (m-..., r-...), container ids and hashes, addresses
    (
        re.compile(
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
        ),
        "<id>",
    ),
    (re.compile(r"\b[a-z]{1,3}-[0-9a-f]{10,}\b"), "<id>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,}\b"), "<hex>"),
    # what is left: numbers
    (re.compile(r"(?<![\w])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"), "<n>"),
]
_SPACE = re.compile(r"\s+")


def mask(text: str) -> str:
    """``text`` with everything that differs between runs of the same failure masked."""
    plain = strip_ansi(text)
    for pattern, token in _MASKS:
        plain = pattern.sub(token, plain)
    return _SPACE.sub(" ", plain).strip()


# ---------------------------------------------------------------- what the driver knows


@dataclass(frozen=True)
class AttemptFacts:
    """A failed attempt as the driver saw it."""

    stage: str
    summary: str
    log: str = ""
    reports: Sequence[Report] = ()
    """The attempt's parsed JUnit reports (none: the log decides)."""
    machine_lost: bool = False
    timed_out: bool = False
    error_type: str | None = None
    """The type name of what the agent raised (None: the agent returned a failure)."""
    exit_codes: Sequence[int | None] = ()
    """Exit codes of the commands the agent ran, as it reported them; None: the command
    ended without a status (killed by a signal)."""


@dataclass(frozen=True)
class Signature:
    signature: str
    kind: Kind
    normalized: str
    """The masked text that was hashed (with the class)."""
    sample: str
    """The failure's own text, unmasked and short: what a person reads."""


INFRA_ERRORS = frozenset(
    {
        "EngineError",
        "TransportError",
        "SessionLost",
        "StorageFull",
        "InsufficientStorage",
        "DatabaseUnavailable",
        "ConnectionError",
        "ConnectionResetError",
        "ConnectionRefusedError",
        "BrokenPipeError",
        "SSHException",
        "NoValidConnectionsError",
        "MemoryError",
        "APIError",
    }
)
"""Exceptions that mean the machine or its channel failed, not the agent's logic."""
TIMEOUT_ERRORS = frozenset({"TimeoutError", "WaitTimeout", "socket.timeout"})
OOM_EXIT = 137
"""128 + SIGKILL: the kernel's OOM killer (a timeout's KILL is told apart by ``timed_out``)."""
SETUP_EXITS = frozenset({126, 127})
"""Not executable, not found."""
_INFRA_TEXT = re.compile(
    r"No space left on device|ENOSPC|disk (?:is )?full|Out of memory|OOM[- ]?kill|"
    r"Cannot allocate memory|session lost|machine (?:was )?lost|machine unreachable|"
    r"Connection (?:reset|refused) by peer|ssh: connect to host|kex_exchange_identification|"
    r"the container engine|Error response from daemon|evidence could not be stored|"
    r"could not write run\.json",
    re.IGNORECASE,
)
_TIMEOUT_TEXT = re.compile(r"\btimed out\b|\bTimeout(?:Error)?\b|deadline exceeded", re.IGNORECASE)
_SETUP_TEXT = re.compile(
    r"command not found|ModuleNotFoundError|ImportError|Cannot find module|"
    r"No module named|errors? during collection|failed on setup|error in fixture|"
    r"\.shopfloor\.toml|needs 'cmd' or 'commands'|needs a command template|is not installed",
    re.IGNORECASE,
)


def classify(facts: AttemptFacts) -> Kind:
    """The failure's class; the first that fits of infra, timeout, agent, setup, test."""
    text = f"{facts.summary}\n{_tail(facts.log, 40)}"
    if facts.machine_lost or (facts.error_type in INFRA_ERRORS):
        return "infra"
    if facts.timed_out or facts.error_type in TIMEOUT_ERRORS or _TIMEOUT_TEXT.search(facts.summary):
        return "timeout"
    if _killed(facts) or _INFRA_TEXT.search(text):
        return "infra"
    if facts.error_type is not None:
        return "agent"
    problems = [case for report in facts.reports for case in report.problems]
    if problems:
        setup = all(case.status == "error" or _SETUP_TEXT.search(case.message) for case in problems)
        return "setup" if setup else "test"
    if SETUP_EXITS & {c for c in facts.exit_codes if c is not None} or _SETUP_TEXT.search(text):
        return "setup"
    return "test"


def _killed(facts: AttemptFacts) -> bool:
    """A command SIGKILLed (the OOM killer): exit 137, or no exit status at all (over SSH a
    command killed by a signal reports the signal, not a status) — timeouts are told apart
    before this."""
    return OOM_EXIT in facts.exit_codes or None in facts.exit_codes


def signature_of(facts: AttemptFacts) -> Signature:
    """The attempt's class, normalized text, hash and sample."""
    kind = classify(facts)
    problems = sorted(
        {_case_key(case): case for r in facts.reports for case in r.problems}.items()
    )[:MAX_CASES]
    if problems and kind in ("test", "setup"):
        normalized = "\n".join(key for key, _ in problems)
        sample = "\n\n".join(_case_sample(case) for _, case in problems[:3])
    else:
        if kind in ("infra", "timeout", "agent"):
            lines = [*_cause_lines(facts, kind), *_error_lines(facts.log, only_errors=True)]
        else:
            lines = _error_lines(facts.log) or _cause_lines(facts, kind)
        normalized = "\n".join(mask(line) for line in lines)
        sample = "\n".join([facts.summary, *lines[-LOG_LINES:]])
    digest = hashlib.sha256(f"{kind}\n{normalized}".encode()).hexdigest()[:24]
    return Signature(
        signature=digest, kind=kind, normalized=normalized, sample=sample[:SAMPLE_CHARS]
    )


def _case_key(case: Case) -> str:
    first = _first_line(case.message) or _first_error_line(case.text)
    failure_type = case.type or _type_of(first) or case.status
    return f"{case.classname}::{case.name} | {failure_type} | {mask(first)}"


def _case_sample(case: Case) -> str:
    head = f"{case.classname}::{case.name} ({case.type or case.status})"
    return f"{head}: {_first_line(case.message)}\n{_tail(case.text, 8)}".strip()


def _type_of(line: str) -> str:
    match = re.match(r"\s*((?:[A-Za-z_][\w.]*)?(?:Error|Exception|Failure))\b", line)
    return match.group(1) if match else ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _first_error_line(text: str) -> str:
    """A report without a message: the first line that names an error, else the first."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if _type_of(line) or is_failure(line)), _first_line(text))


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


_NOISE = re.compile(r"^\s*(?:\$ |\[shopfloor:|=+ .* =+$|-+$)")


def _error_lines(log: str, *, only_errors: bool = False) -> list[str]:
    """The last error lines of a log (or its last lines, when none looks like an error)."""
    plain = [strip_ansi(line).strip() for line in log.splitlines()]
    kept = [line for line in plain if line and not _NOISE.match(line)]
    errors = [line for line in kept if is_failure(line)]
    return (errors if errors or only_errors else kept)[-LOG_LINES:]


def _cause_lines(facts: AttemptFacts, kind: Kind) -> list[str]:
    """What the driver knows about a failure that is not the code's: its cause, masked."""
    if facts.machine_lost:
        return ["machine lost"]
    if facts.error_type:
        return [f"raised {facts.error_type}", _first_line(facts.summary)]
    if kind == "infra" and _killed(facts):
        return ["killed (SIGKILL: exit 137 or no exit status)"]
    return [_first_line(facts.summary)]


# ---------------------------------------------------------------- machine health


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt, as the quarantine rule sees it."""

    machine_id: str
    stage: str
    passed: bool
    at: datetime
    kind: str | None = None
    signature: str | None = None


@dataclass(frozen=True)
class Quarantine:
    machine_id: str
    signature: str
    count: int
    """Infra failures of the machine in the window."""
    stages: tuple[str, ...]
    passed_elsewhere: tuple[str, ...]
    """Other machines on which the same stages passed in the window."""
    reason: str = field(default="")


def quarantine_verdict(
    attempts: Iterable[AttemptRecord],
    *,
    machine_id: str,
    now: datetime,
    threshold: int,
    window: timedelta,
) -> Quarantine | None:
    """Quarantine ``machine_id`` when, in ``window`` before ``now``, its stages failed with
    infra signatures at least ``threshold`` times while the same stages passed on another
    machine (a stage that fails everywhere is the code's or the template's fault, not the
    machine's)."""
    since = now - window
    recent = [a for a in attempts if since <= a.at <= now]
    infra = [a for a in recent if a.machine_id == machine_id and not a.passed and a.kind == "infra"]
    if threshold < 1 or len(infra) < threshold:
        return None
    stages = sorted({a.stage for a in infra})
    elsewhere = sorted(
        {
            a.machine_id
            for a in recent
            if a.passed and a.machine_id != machine_id and a.stage in stages
        }
    )
    if not elsewhere:
        return None
    top, _ = Counter(a.signature or "" for a in infra).most_common(1)[0]
    reason = (
        f"quarantined: {len(infra)} infra failures in {_span(window)} "
        f"(signature {top[:12]}, stage {', '.join(stages)}) while the same stage passed on "
        f"{', '.join(elsewhere[:3])}"
    )
    return Quarantine(
        machine_id=machine_id,
        signature=top,
        count=len(infra),
        stages=tuple(stages),
        passed_elsewhere=tuple(elsewhere),
        reason=reason,
    )


def _span(window: timedelta) -> str:
    seconds = window.total_seconds()
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
