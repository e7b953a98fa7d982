"""What a running controller holds: settings, database, engine and its background workers."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from controller.providers.base import Provider
from controller.services.access import MachineAccess
from controller.services.auth import TokenCache
from controller.services.lease_runtime import LeaseRuntime
from controller.services.limits import Limits
from controller.services.tracing import Tracing
from controller.settings import Settings
from controller.store.db import reader
from controller.store.leases import LeaseLane

log = logging.getLogger(__name__)


def read_install_id(data_dir: Path) -> str:
    """A random id per data dir: the label that says which containers are ours."""
    path = data_dir / "install-id"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(8))
    return path.read_text().strip()


@dataclass
class DiskWatch:
    """Workspace disk use per machine, as reconcile last measured it (not per request)."""

    usage: dict[str, tuple[int, int]] = field(default_factory=dict)
    """machine id -> (used, limit) bytes."""
    near_full: set[str] = field(default_factory=set)
    """Machines past the near-full share (an event was written when they crossed it)."""


HANDOVER_WORKERS = 2


@dataclass
class Controller:
    settings: Settings
    db: Engine
    provider: Provider
    install_id: str
    default_image: str
    workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="shopfloor")
    )
    handovers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(
            max_workers=HANDOVER_WORKERS, thread_name_prefix="shopfloor-handover"
        )
    )
    """Machines coming back after a lease (``leases.return_machine``), a few at a time: a
    wave of releases must not turn into a wave of hand-overs beside the requests."""
    stopping: threading.Event = field(default_factory=threading.Event)
    loops: list[threading.Thread] = field(default_factory=list)
    limits: Limits = field(init=False)
    """Request rates per token, files in flight, refusals by limit (docs/SECURITY.md)."""
    access: MachineAccess = field(init=False)
    """Every live channel into the machines: SSH, sessions, SFTP, forwards, commands."""

    tokens: TokenCache = field(default_factory=TokenCache)
    disk_watch: DiskWatch = field(default_factory=DiskWatch)
    lease_runtime: LeaseRuntime = field(default_factory=LeaseRuntime)
    """Requests waiting for a machine, and machines being returned after a lease."""
    instance_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    )
    """This controller process: the holder of its leader lease and run claims."""
    lead_until: float = 0.0
    """Monotonic deadline until which this controller leads the loops (leadership.py)."""
    fence: int = 0
    """The leader lease's fence when this controller last took or kept it."""
    tracing: Tracing = field(default_factory=Tracing)
    """Runs' OpenTelemetry traces (``services/tracing.py``); off unless an OTLP endpoint is set."""
    on_close: list[Callable[[], object]] = field(default_factory=list)
    """Run first by :meth:`close` (the leader steps down)."""
    reader: Engine = field(init=False)
    """The same database for read-only transactions (no write lock on SQLite)."""
    lease_lane: LeaseLane = field(init=False)
    """The lease hot paths from the event loop (group commit on SQLite, one statement per
    round trip on PostgreSQL's loop connections)."""

    def __post_init__(self) -> None:
        self.reader = reader(self.db)
        self.lease_lane = LeaseLane(self.db)
        self.limits = Limits(self.settings)
        self.access = MachineAccess(
            db=self.db, provider=self.provider, settings=self.settings, limits=self.limits
        )

    def leads(self) -> bool:
        """Whether the loops that must run once run here now (``leadership.keep_lead``)."""
        return time.monotonic() < self.lead_until

    def every(self, interval_s: float, name: str, tick: Callable[[], object]) -> None:
        """Run ``tick`` now and then every ``interval_s`` until :meth:`close`; errors are logged."""

        def loop() -> None:
            while not self.stopping.is_set():
                try:
                    tick()
                except Exception:
                    log.exception("%s loop failed; retrying in %.1fs", name, interval_s)
                self.stopping.wait(interval_s)

        thread = threading.Thread(target=loop, name=f"shopfloor-{name}", daemon=True)
        thread.start()
        self.loops.append(thread)

    def close(self) -> None:
        self.stopping.set()
        for thread in self.loops:
            thread.join(timeout=10)
        for hook in self.on_close:
            try:
                hook()
            except Exception:
                log.exception("closing the controller")
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.handovers.shutdown(wait=False, cancel_futures=True)
        self.access.close()
        self.tracing.close()
        self.lease_lane.close()
        close_provider = getattr(self.provider, "close", None)  # the spare disks, the client
        if callable(close_provider):
            close_provider()
        self.db.dispose()
