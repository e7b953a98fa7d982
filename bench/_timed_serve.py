"""`shopfloor serve` with learning's own work timed (bench/factory.py starts it).

    python bench/_timed_serve.py serve --port N

Wraps, before the app starts, the calls that are learning's cost to a run: the driver's
``learning.observe_attempt`` (signatures, fixes, machine health) and ``_lessons_due``
(gathering and rendering the lessons), the flaky-test tracker's ``flaky.known_flaky`` (the
known flaky tests, read when a run starts and after a failed attempt) and
``test_history.record`` (each JUnit report saved), and the lessons files' own writes (in
the SFTP session that writes run.json); the handle's ``write_files`` is timed too, named by
what it wrote (run.json alone or with the lessons, a stage's notes). Each call appends a line to the file ``SHOPFLOOR_BENCH_TIMINGS`` names;
the append is outside the timed part.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from controller import cli
from controller.services import driver, flaky, handles, learning
from evidence import test_history

_OUT = os.environ["SHOPFLOOR_BENCH_TIMINGS"]
_LOCK = threading.Lock()
_INSIDE = threading.local()


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Each call appends ``name depth seconds``: depth 0 is an outermost timed call (the
    figures add those), deeper ones are parts of it (``known_flaky`` gathering the lessons)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_INSIDE, "depth", 0)
        _INSIDE.depth = depth + 1
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - started
            _INSIDE.depth = depth
            with _LOCK, open(_OUT, "a") as out:
                out.write(f"{name} {depth} {spent:.6f}\n")

    return wrapper


def _timed_writes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``write_files`` named by what it wrote: run.json (alone or with the lessons) or a
    stage's notes."""

    @functools.wraps(fn)
    def wrapper(self: Any, files: dict[str, bytes]) -> Any:
        names = {path.rsplit("/", 1)[-1] for path in files}
        kind = "notes" if "run.json" not in names else "run.json"
        kind += "+lessons" if learning.LESSONS_JSON in names else ""
        return _timed(f"write {kind}", fn)(self, files)

    return wrapper


def _timed_lessons_files(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The lessons files' own writes inside the session that writes run.json: what writing
    them costs a run (the session, the connection and the folder are run.json's)."""
    timed = _timed("lessons write", fn)

    @functools.wraps(fn)
    def wrapper(self: Any, sftp: Any, target: str, data: bytes, made: set[str]) -> Any:
        lessons = target.rsplit("/", 1)[-1] in (learning.LESSONS_JSON, learning.LESSONS_MD)
        return (timed if lessons else fn)(self, sftp, target, data, made)

    return wrapper


learning.observe_attempt = _timed("observe_attempt", learning.observe_attempt)
learning._record_pass = _timed("observe a pass", learning._record_pass)
learning._record_failure = _timed("observe a failure", learning._record_failure)
driver.RunDriver._lessons_due = _timed("lessons", driver.RunDriver._lessons_due)  # type: ignore[method-assign]
flaky.known_flaky = _timed("known_flaky", flaky.known_flaky)
test_history.record = _timed("test_history", test_history.record)
handles.SshMachineHandle.write_files = _timed_writes(handles.SshMachineHandle.write_files)  # type: ignore[method-assign]
handles.SshMachineHandle._write_in = _timed_lessons_files(handles.SshMachineHandle._write_in)  # type: ignore[method-assign]

if __name__ == "__main__":
    cli.app()
