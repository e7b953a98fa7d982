"""`shopfloor serve` with learning's own work timed (bench/factory.py starts it).

    python bench/_timed_serve.py serve --port N

Wraps, before the app starts, the calls that are learning's cost to a run: the driver's
``learning.observe_attempt`` (signatures, fixes, machine health) and ``_write_lessons``
(gathering the lessons and writing them into the machine), plus the flaky-test tracker's
``flaky.known_flaky`` (read before each attempt) and ``test_history.record`` (each JUnit
report saved). Each call appends ``name seconds`` to the file ``SHOPFLOOR_BENCH_TIMINGS``
names; the append is outside the timed part.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from controller import cli
from controller.services import driver, flaky, learning
from evidence import test_history

_OUT = os.environ["SHOPFLOOR_BENCH_TIMINGS"]
_LOCK = threading.Lock()


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - started
            with _LOCK, open(_OUT, "a") as out:
                out.write(f"{name} {spent:.6f}\n")

    return wrapper


learning.observe_attempt = _timed("observe_attempt", learning.observe_attempt)
driver.RunDriver._write_lessons = _timed("write_lessons", driver.RunDriver._write_lessons)  # type: ignore[method-assign]
flaky.known_flaky = _timed("known_flaky", flaky.known_flaky)
test_history.record = _timed("test_history", test_history.record)

if __name__ == "__main__":
    cli.app()
