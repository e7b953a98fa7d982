"""In-process lease state of one controller: the first-come-first-served wait queue and
the machines being returned. It lives on the :class:`~controller.services.runtime.Controller`,
so it starts and ends with it."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    seq: int
    key: str
    wake: Callable[[], None]
    waiting: bool = False
    """Set once the request found nothing or had to queue: later arrivals queue behind it,
    and a machine coming back wakes it."""


@dataclass
class LeaseRuntime:
    """Per-controller, in-process state: the wait queue and the machines being reset."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    waiters: list[_Waiter] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    returning: set[str] = field(default_factory=set)
    """Machines whose lease ended and that are being cleaned or recreated right now."""
    generation: int = 0
    """Counts :meth:`notify` calls: a request that saw it change while it looked looks again
    instead of sleeping, so a wake-up is never lost between a miss and the sleep."""

    def join(self, key: str, wake: Callable[[], None]) -> _Waiter:
        with self.lock:
            waiter = _Waiter(next(self.counter), key, wake)
            self.waiters.append(waiter)
            return waiter

    def leave(self, waiter: _Waiter) -> None:
        with self.lock:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
        if waiter.waiting:  # others may have queued behind it
            self.notify()

    def is_first(self, waiter: _Waiter) -> bool:
        """No request for the same target has been waiting longer (fresh ones don't block)."""
        with self.lock:
            for other in self.waiters:
                if other is waiter:
                    return True
                if other.key == waiter.key and other.waiting:
                    return False
            return True

    def waiting_for(self, key: str) -> int:
        """How many requests for this target have found nothing and wait."""
        with self.lock:
            return sum(1 for w in self.waiters if w.key == key and w.waiting)

    def notify(self) -> None:
        """A machine may have become free: every waiting request looks again."""
        with self.lock:
            self.generation += 1
            wakers = [w.wake for w in self.waiters if w.waiting]
        for wake in wakers:
            wake()
