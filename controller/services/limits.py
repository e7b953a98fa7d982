"""Limits on what one caller may take of a shared controller (docs/SECURITY.md).

One :class:`Limits` per controller process (``ctl.limits``): the token bucket of each API
token (requests per second), the files in flight per machine, and the count of refusals by
limit that ``/metrics`` serves. Sessions per machine and forwards per lease are counted
where those channels live (``access.MachineAccess``); request bodies are capped in the API
(``api/body_limits.py``). Every refusal is a :class:`LimitReached` (429) or ``TooLarge``
(413) whose message names the limit, its setting and how to free it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator

from controller.errors import LimitReached
from controller.settings import Settings

SESSIONS = "sessions_per_machine"
FORWARDS = "forwards_per_lease"
FILES = "files_in_flight"
BODY = "body_size"
RATE = "token_rate"
SNAPSHOTS = "snapshots_per_token"
SNAPSHOT_BYTES = "snapshot_bytes_per_token"
FORKS = "forks_per_token"
KNOWN = (SESSIONS, FORWARDS, FILES, BODY, RATE, SNAPSHOTS, SNAPSHOT_BYTES, FORKS)

_IDLE_S = 600.0
"""A bucket untouched this long is full again anyway: forgotten at the next sweep."""


class TokenBuckets:
    """A token bucket per API token: ``burst`` requests at once, then ``rate`` a second.

    Called from the event loop only (``deps.authenticate``), so it takes no lock; one
    :meth:`take` is a dict lookup and a little arithmetic (about a microsecond).
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self._buckets: dict[str, list[float]] = {}  # token id -> [level, last time]
        self._swept = time.monotonic()

    def take(self, token_id: str) -> float:
        """Take one request from the token's bucket: 0.0 when it may go, else the seconds
        until it may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        bucket = self._buckets.get(token_id)
        if bucket is None:
            if now - self._swept > _IDLE_S:
                self._sweep(now)
            self._buckets[token_id] = [self.burst - 1.0, now]
            return 0.0
        level = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if level >= 1.0:
            bucket[0] = level - 1.0
            return 0.0
        bucket[0] = level
        return (1.0 - level) / self.rate

    def _sweep(self, now: float) -> None:
        self._swept = now
        for token_id, (_, last) in list(self._buckets.items()):
            if now - last > _IDLE_S:
                del self._buckets[token_id]


class Limits:
    """The controller's limits and the count of what they refused."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.refused: Counter[str] = Counter()
        self.rates = TokenBuckets(settings.token_rate_per_s, settings.token_rate_burst)
        self._files: Counter[str] = Counter()
        self._files_guard = threading.Lock()

    def refuse(self, error: LimitReached) -> LimitReached:
        """Count ``error``'s limit as refused once; answer the error to raise."""
        self.refused[error.limit] += 1
        return error

    def count(self, limit: str) -> None:
        self.refused[limit] += 1

    # ------------------------------------------------------------ request rate

    def check_rate(self, token_id: str, token_name: str | None = None) -> None:
        wait_s = self.rates.take(token_id)
        if wait_s:
            rate, burst = self.settings.token_rate_per_s, self.settings.token_rate_burst
            who = f"API token {token_name!r}" if token_name else "this API token"
            raise self.refuse(
                LimitReached(
                    f"{who} made more than {rate:g} requests a second (burst {burst}; "
                    "SHOPFLOOR_TOKEN_RATE_PER_S, SHOPFLOOR_TOKEN_RATE_BURST): wait "
                    f"{wait_s:.2f} s (Retry-After) and send fewer, or give each agent its "
                    "own token",
                    limit=RATE,
                    retry_after_s=wait_s,
                )
            )

    # ------------------------------------------------------------ files in flight

    @contextlib.contextmanager
    def file_in_flight(self, machine_id: str) -> Iterator[None]:
        """Hold one of the machine's places for a file read or write, or refuse (429)."""
        cap = self.settings.files_in_flight
        with self._files_guard:
            if self._files[machine_id] >= cap:
                self.refused[FILES] += 1
                raise LimitReached(
                    f"machine {machine_id} already moves {cap} file"
                    f"{'' if cap == 1 else 's'} at once (SHOPFLOOR_FILES_IN_FLIGHT): wait for "
                    "one to finish and retry, or move fewer files at once (an archive)",
                    limit=FILES,
                    in_flight=cap,
                )
            self._files[machine_id] += 1
        try:
            yield
        finally:
            with self._files_guard:
                self._files[machine_id] -= 1
                if self._files[machine_id] <= 0:
                    del self._files[machine_id]

    def files_now(self) -> int:
        with self._files_guard:
            return sum(self._files.values())
