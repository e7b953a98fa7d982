"""The SQLite writer queue: reentrant, first come first served, no barging."""

from __future__ import annotations

import threading
import time

from controller.store.db import WriterQueue


def _wait_until(condition: object, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_reentrant_for_its_owner() -> None:
    queue = WriterQueue()
    with queue, queue:
        assert queue.acquire(blocking=False)
        queue.release()
    assert queue.acquire(blocking=False)
    queue.release()


def test_waiters_are_served_in_arrival_order_and_nobody_barges() -> None:
    queue = WriterQueue()
    served: list[int] = []
    queue.acquire()
    threads = []
    for i in range(5):
        thread = threading.Thread(
            target=lambda i=i: (queue.acquire(), served.append(i), queue.release())
        )
        thread.start()
        threads.append(thread)
        _wait_until(lambda n=i + 1: len(queue._waiting) == n)
    # While threads wait, a non-blocking attempt from elsewhere must not jump the queue.
    attempt: list[bool] = []
    other = threading.Thread(target=lambda: attempt.append(queue.acquire(blocking=False)))
    other.start()
    other.join()
    assert attempt == [False]
    queue.release()
    for thread in threads:
        thread.join(timeout=5)
    assert served == [0, 1, 2, 3, 4]
    assert queue.acquire(blocking=False)  # free again once the queue drained
    queue.release()
