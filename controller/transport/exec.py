"""One-shot commands in a machine through the engine's exec.

Lifecycle lives in ``fleet``; this module only runs commands. The command is wrapped in
coreutils ``timeout`` inside the machine, which runs it in its own process group and kills
the whole group when time is up, so nothing the command started outlives the deadline.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from controller.errors import InvalidInput
from controller.providers.base import ExecHandle
from controller.transport.output import HeadTail, incremental_decoder

KILL_GRACE_S = 2
TIMEOUT_EXIT_CODES = (124, 137)
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class Executor(Protocol):
    """What runs a command: a provider (engine exec) or the SSH transport (``sshexec``)."""

    def exec(
        self,
        name_or_id: str,
        argv: list[str],
        *,
        user: str = "runner",
        workdir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> ExecHandle: ...


@dataclass(frozen=True)
class ExecRequest:
    cmd: str
    cwd: str
    env: dict[str, str]
    timeout_s: float


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: float
    truncated: bool
    timed_out: bool


def check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not _ENV_KEY.match(key):
            raise InvalidInput(f"env name {key!r} is not a valid variable name")
        if "\x00" in value:
            raise InvalidInput(f"env value of {key} contains a NUL byte")
    return env


def check_cwd(cwd: str) -> str:
    if not cwd.startswith("/") or "\x00" in cwd or "\n" in cwd:
        raise InvalidInput("cwd must be an absolute path inside the machine")
    return cwd


def _argv(request: ExecRequest) -> list[str]:
    return [
        "timeout",
        "--kill-after",
        str(KILL_GRACE_S),
        f"{request.timeout_s:g}",
        "bash",
        "-c",
        request.cmd,
    ]


def run(provider: Executor, container: str, request: ExecRequest, *, cap: int) -> ExecResult:
    """Run to completion; each stream keeps at most ``cap`` bytes (head and tail)."""
    started = time.monotonic()
    handle = provider.exec(container, _argv(request), workdir=request.cwd, env=request.env)
    captured = {"stdout": HeadTail(cap), "stderr": HeadTail(cap)}
    for stream, chunk in handle:
        captured[stream].write(chunk)
    exit_code = handle.exit_code()
    elapsed = time.monotonic() - started
    timed_out = exit_code in TIMEOUT_EXIT_CODES and elapsed >= request.timeout_s
    stderr = captured["stderr"].text()
    if timed_out:
        stderr += f"\n[shopfloor: command timed out after {request.timeout_s:g}s and was killed]"
    return ExecResult(
        exit_code=exit_code,
        stdout=captured["stdout"].text(),
        stderr=stderr,
        duration_ms=round(elapsed * 1000, 2),
        truncated=captured["stdout"].truncated or captured["stderr"].truncated,
        timed_out=timed_out,
    )


def stream(provider: Executor, container: str, request: ExecRequest, *, cap: int) -> Iterator[str]:
    """NDJSON lines as output arrives; the last line carries the exit code."""
    started = time.monotonic()
    handle = provider.exec(container, _argv(request), workdir=request.cwd, env=request.env)
    decoders = {"stdout": incremental_decoder(), "stderr": incremental_decoder()}
    sent = {"stdout": 0, "stderr": 0}
    truncated = False
    for name, chunk in handle:
        room = cap - sent[name]
        if room <= 0:
            truncated = True
            continue
        if len(chunk) > room:
            chunk, truncated = chunk[:room], True
        sent[name] += len(chunk)
        text = decoders[name].decode(chunk)
        if text:
            yield json.dumps({"stream": name, "data": text}) + "\n"
    exit_code = handle.exit_code()
    elapsed = time.monotonic() - started
    yield (
        json.dumps(
            {
                "exit_code": exit_code,
                "duration_ms": round(elapsed * 1000, 2),
                "truncated": truncated,
                "timed_out": exit_code in TIMEOUT_EXIT_CODES and elapsed >= request.timeout_s,
            }
        )
        + "\n"
    )
