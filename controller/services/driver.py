"""The run driver: one thread per run takes it from its first unfinished stage to an end.

A run leases one machine for its whole life (holder ``run:<id>``) and drives its stages on
it in order, so each stage finds the workspace and the notes of the one before in
``/workspace/.shopfloor/`` (``run.json`` plus ``<stage>/result.json`` and ``<stage>/log.txt``).
Each attempt runs the stage's agent in a thread while the driver renews the lease, watches
for cancellation and enforces the stage timeout (the exec transport already kills commands
with SIGTERM, a grace and SIGKILL; the driver kills whatever is left in the machine).

The driver is restartable: after a controller crash a ``running`` run is picked up again,
the interrupted attempt is recorded as failed with the reason, the run's lease is adopted
if it is still valid (same machine, same workspace) and otherwise a fresh machine is
leased, which counts as a context re-creation.
"""

from __future__ import annotations

import contextvars
import copy
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from opentelemetry.trace import INVALID_SPAN, Span
from sqlmodel import Session, col, select

from agents import config, registry
from agents.base import (
    HANDOFF_DIR,
    Assignment,
    KnownTests,
    MachineHandle,
    RemoteReport,
    StageResult,
)
from controller.domain import CaseHealth, LeasePublic, MachineTemplate
from controller.errors import Conflict, InvalidInput, ShopfloorError
from controller.services import (
    access,
    flaky,
    learning,
    leases,
    machines,
    owners,
    pools,
    remote_stages,
    runs,
    snapshots,
    tracing,
)
from controller.services.handles import handle_for
from controller.services.runtime import Controller
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.models import (
    ALIVE_STATES,
    FINISHED_RUN_STATUSES,
    Lease,
    LeaseState,
    Machine,
    MachineState,
    Run,
    RunStatus,
    Snapshot,
    Stage,
    StageStatus,
    utcnow,
)
from controller.transport.exec import KILL_GRACE_S
from evidence.signatures import AttemptFacts

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 4000
NOTE_FILE_CAP_BYTES = 64 * 1024
"""Artifacts up to this size are also copied into the handoff folder (argv-safe)."""


@dataclass
class _Drivers:
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: dict[str, threading.Thread] = field(default_factory=dict)


_DRIVERS: dict[int, _Drivers] = {}


def drivers(ctl: Controller) -> _Drivers:
    return _DRIVERS.setdefault(id(ctl), _Drivers())


def drive_tick(*, ctl: Controller) -> list[str]:
    """Start a driver thread for each queued or orphaned running run; say which started."""
    now = utcnow()
    with unit_of_work(ctl.reader) as tx:
        waiting = tx.exec(
            select(Run.id)
            .where(
                col(Run.status).in_([RunStatus.queued, RunStatus.running]),
                col(Run.driver).is_(None)
                | (col(Run.driver) == ctl.instance_id)
                | (col(Run.driver_expires_at) < now),
            )
            .order_by(col(Run.created_at))
        ).all()
    state = drivers(ctl)
    started: list[str] = []
    with state.lock:
        for run_id in waiting:
            if run_id in state.threads or ctl.stopping.is_set():
                continue
            thread = threading.Thread(
                target=_drive_guarded, args=(ctl, run_id), name=f"run-{run_id}", daemon=True
            )
            state.threads[run_id] = thread
            thread.start()
            started.append(run_id)
    return started


def _drive_guarded(ctl: Controller, run_id: str) -> None:
    driver = RunDriver(ctl, run_id)
    try:
        driver.drive()
    except _Stopping:
        log.info("controller stopping; run %s will resume on restart", run_id)
        _quietly(runs.drop_claim, ctl=ctl, run_id=run_id, driver=ctl.instance_id)
    except runs.ClaimLost as exc:
        log.warning("run %s: %s; this driver stops", run_id, exc.message)
    except Exception as exc:  # noqa: BLE001 - a run must always end in a definite state
        log.exception("driver of run %s failed", run_id)
        reason = exc.message if isinstance(exc, ShopfloorError) else f"{type(exc).__name__}: {exc}"
        _quietly(
            runs.finish_run,
            ctl=ctl,
            run_id=run_id,
            status=RunStatus.failed,
            reason=f"driver error: {reason}",
            driver=ctl.instance_id,
        )
    finally:
        driver.heartbeat_stop.set()
        with drivers(ctl).lock:
            drivers(ctl).threads.pop(run_id, None)


def _quietly(work: Any, **kwargs: Any) -> None:
    try:
        work(**kwargs)
    except Exception:  # noqa: BLE001 - logged; the run is picked up again by its next driver
        log.exception("%s failed", getattr(work, "__name__", work))


class _Stopping(Exception):
    """The controller is shutting down: leave the run as it is for the next start."""


@dataclass
class _Outcome:
    status: str
    summary: str
    outputs: dict[str, Any] = field(default_factory=dict)
    machine_lost: bool = False
    cancelled: bool = False
    agent_log: str = ""
    """The tail of the agent's own log artifacts, kept in the attempt's history."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Small artifacts, copied into the stage's folder for the next stages."""
    timed_out: bool = False
    error_type: str | None = None
    """The type of what the agent raised, when it raised."""
    quarantined: str | None = None
    """Why learning quarantined the machine after this attempt (the run moves, like a loss)."""
    signature: str | None = None
    """The failure signature learning gave this attempt, and its class."""
    kind: str | None = None

    @property
    def moves(self) -> bool:
        return self.machine_lost or self.quarantined is not None


class RunDriver:
    """Drives one run from its first unfinished stage to a definite end."""

    def __init__(self, ctl: Controller, run_id: str) -> None:
        self.ctl = ctl
        self.run_id = run_id
        self.lease: LeasePublic | None = None
        self.machine: Machine | None = None
        self.handle: MachineHandle | None = None
        self.renewed_at = 0.0
        self.me = ctl.instance_id
        self.claim_ttl_s = ctl.settings.run_claim_ttl_s
        self.claim_lost = threading.Event()
        """Set by the heartbeat when the claim could not be kept: write nothing more."""
        self.heartbeat_stop = threading.Event()
        self.known: list[CaseHealth] | None = None
        """The repo's known flaky tests as this run last read them, for the tester and the
        lessons (read again after a failed attempt: its results may have taught something)."""
        self.lessons: dict[str, Any] | None = None
        self.lessons_on: str | None = None
        """The machine whose handoff folder has this run's lessons."""
        self.resumed = False
        """Another driver ran this run before (a restart, a takeover): ``run.resume`` span."""
        self.facts: dict[str, str | None] = {}
        """The run's repo and ref, for its trace."""
        self.span: Span = INVALID_SPAN
        """This driver's span of the run (``services/tracing.py``); a no-op when off."""
        self.fork_meta: dict[str, Any] = {}
        """On a fork of a forking stage: which fork, added to the meta of its evidence."""
        self.fork_decided: threading.Event | None = None
        """On a fork of a ``select: "first"`` stage: set once a fork passed; the others stop."""

    # ------------------------------------------------------------ the whole run

    def drive(self) -> None:
        if not self._start():
            return
        with self.ctl.tracing.run_span(
            self.run_id, resumed=self.resumed, attributes=self.facts
        ) as span:
            self.span = span
            try:
                self._drive()
            except _Stopping:
                span.set_attribute("status", "stopped")  # resumed by the next start
                raise
            except runs.ClaimLost:
                span.set_attribute("status", "claim_lost")
                raise
            except Exception as exc:
                span.set_attribute("status", RunStatus.failed.value)
                span.record_exception(exc)
                tracing.failed(span, f"driver error: {type(exc).__name__}")
                raise

    def _drive(self) -> None:
        threading.Thread(
            target=self._heartbeat, name=f"run-{self.run_id}-claim", daemon=True
        ).start()
        try:
            self._take_machine()
            with unit_of_work(self.ctl.db) as tx:
                stage_ids = [s.id for s in runs.stages_of(tx, self.run_id)]
            self._read_policy(stage_ids[0])
            for stage_id in stage_ids:
                ended = self._drive_stage(stage_id)
                if ended:
                    return
            self._finish(RunStatus.passed, None)
        except _RunEnded as end:
            self._finish(end.status, end.reason)
        except runs.ClaimLost:
            self.claim_lost.set()  # the run, its lease and machine are another driver's now
            raise
        finally:
            if not self.ctl.stopping.is_set() and not self.claim_lost.is_set():
                self._give_back()

    def _finish(self, status: RunStatus, reason: str | None) -> None:
        runs.finish_run(
            ctl=self.ctl, run_id=self.run_id, status=status, reason=reason, driver=self.me
        )
        self.span.set_attribute("status", status.value)
        if status == RunStatus.failed:
            tracing.failed(self.span, reason or "failed")

    def _start(self) -> bool:
        """Claim the run (one driver per run) and start or resume it."""
        with unit_of_work(self.ctl.db) as tx:
            run = runs.get_run(tx, self.run_id)
            if run.status in FINISHED_RUN_STATUSES:
                return False
            try:
                previous = runs.claim_in(tx, run, driver=self.me, ttl_s=self.claim_ttl_s)
            except runs.ClaimLost:
                return False  # another driver holds it; nothing was written
            if run.cancel_requested:
                runs.end_run(tx, run, RunStatus.cancelled, "cancelled before it started")
                return False
            self.facts = {"repo": run.repo, "ref": run.ref}
            self.resumed = run.status != RunStatus.queued
            if run.status == RunStatus.queued:
                run.status, run.started_at = RunStatus.running, utcnow()
                tx.add(run)
                events.record(tx, "run.started", run.id, driver=self.me)
            else:
                why = f"its driver {previous} stopped" if previous else "controller restarted"
                events.record(tx, "run.resumed", run.id, reason=why, driver=self.me)
        return True

    def _heartbeat(self) -> None:
        """Keep the claim alive every third of its TTL. A claim that could not be kept for
        most of its TTL (the database gone) is given up before another driver may take it."""
        kept = time.monotonic()
        while not self.heartbeat_stop.wait(self.claim_ttl_s / 3):
            try:
                with unit_of_work(self.ctl.db) as tx:
                    runs.hold_claim(tx, self.run_id, driver=self.me, ttl_s=self.claim_ttl_s)
                kept = time.monotonic()
            except runs.ClaimLost:
                self.claim_lost.set()
                return
            except Exception as exc:  # noqa: BLE001 - the database may come back in time
                log.warning("run %s: claim heartbeat failed: %s", self.run_id, exc)
                if time.monotonic() - kept > self.claim_ttl_s * 0.75:
                    self.claim_lost.set()
                    return

    def _read_policy(self, first_stage_id: str) -> None:
        """The repo's ``[verify]`` and ``[owners]``, read once per run from its checkout; a
        section that is wrong fails the run's first stage with the message naming the key."""
        assert self.handle is not None
        assert self.machine is not None
        with unit_of_work(self.ctl.reader) as tx:
            if runs.get_run(tx, self.run_id).policy is not None:
                return
        try:
            found = config.load_policy(self.handle.read_file, self.machine.workdir)
        except InvalidInput as exc:
            runs.fail_stage(
                ctl=self.ctl, stage_id=first_stage_id, summary=exc.message, driver=self.me
            )
            raise _RunEnded(RunStatus.failed, exc.message) from exc
        runs.set_policy(ctl=self.ctl, run_id=self.run_id, policy=asdict(found), driver=self.me)

    def _check_claim(self) -> None:
        if self.claim_lost.is_set():
            raise runs.ClaimLost(f"run {self.run_id}: this driver lost its claim")

    # ------------------------------------------------------------ the machine

    def _take_machine(self) -> None:
        """Adopt the run's lease if it is still valid, else lease a (fresh) machine."""
        with unit_of_work(self.ctl.db) as tx:
            run = runs.get_run(tx, self.run_id)
            found = tx.get(Lease, run.lease_id) if run.lease_id else None
            lease = LeasePublic.model_validate(found, from_attributes=True) if found else None
            had_machine = run.machine_id is not None
        if lease is not None and self._adopt(lease):
            return
        if had_machine:
            self._record_recreation("the run's machine or lease was lost")
        self.lease = self._acquire()
        with unit_of_work(self.ctl.db) as tx:
            run = runs.get_run(tx, self.run_id)
            run.lease_id, run.machine_id = self.lease.id, self.lease.machine_id
            tx.add(run)
            self.machine = machines.get_machine(tx, self.lease.machine_id)
            events.record(
                tx, "run.machine", run.id, machine_id=self.machine.id, lease_id=self.lease.id
            )
        self.handle = handle_for(self.ctl, self.machine)
        self.renewed_at = time.monotonic()
        self._trace_machine()

    def _trace_machine(self) -> None:
        if self.machine is not None and self.span.is_recording():
            self.span.set_attribute("machine.id", self.machine.id)
            if self.machine.commit:
                self.span.set_attribute("commit", self.machine.commit)

    def _adopt(self, lease: LeasePublic) -> bool:
        if lease.state != LeaseState.active:
            return False
        try:
            leases.renew(db=self.ctl.db, lease_id=lease.id, caller=None)
            machine = access.machine_for_command(
                db=self.ctl.db,
                machine_id=lease.machine_id,
                key=access.Key.internal(lease.fence),
            )
        except ShopfloorError as exc:
            log.info("run %s cannot adopt lease %s: %s", self.run_id, lease.id, exc.message)
            return False
        if machine.state == MachineState.quarantined:
            return False
        self.lease, self.machine = lease, machine
        self.handle = handle_for(self.ctl, machine)
        self.renewed_at = time.monotonic()
        self._trace_machine()
        return True

    def _acquire(self) -> LeasePublic:
        with unit_of_work(self.ctl.db) as tx:
            run = runs.get_run(tx, self.run_id)
        target = leases.Target(pool=run.pool) if run.pool else self._private_machine(run)
        request = leases.LeaseRequest(
            target=target,
            holder=f"run:{self.run_id}",
            ttl_s=self.ctl.settings.run_lease_ttl_s,
            wait_s=self.ctl.settings.run_machine_wait_s,
        )
        wait = {"run.id": self.run_id, "pool": run.pool, "machine.id": target.machine_id}
        try:
            with self.ctl.tracing.span("lease.wait", wait) as span:
                granted = leases.acquire_blocking(
                    ctl=self.ctl, request=request, give_up=self._give_up
                )
                span.set_attribute("machine.id", granted.machine_id)
                span.set_attribute("lease.id", granted.id)
                return granted
        except ShopfloorError as exc:
            if self.ctl.stopping.is_set():
                raise _Stopping() from exc
            if self._cancel_requested():
                raise _RunEnded(
                    RunStatus.cancelled, "cancelled while waiting for a machine"
                ) from exc
            raise _RunEnded(RunStatus.failed, f"no machine for the run: {exc.message}") from exc

    def _give_up(self) -> str | None:
        if self._cancel_requested():
            return "cancelled"
        with unit_of_work(self.ctl.db) as tx:
            run = runs.get_run(tx, self.run_id)
            if run.pool:
                reason = pools.failing_reason(tx=tx, name=run.pool)
                return f"pool {run.pool} cannot provide machines: {reason}" if reason else None
        return None

    def _private_machine(self, run: Run) -> leases.Target:
        """A run without a pool gets its own machine of the run's repo and ref."""
        spec = machines.make_spec(
            ctl=self.ctl,
            template=MachineTemplate(repo=run.repo, ref=run.ref, labels={"run": run.id}),
        )
        machine = machines.submit(ctl=self.ctl, spec=spec, wait=True)
        if machine.state != MachineState.ready:
            raise _RunEnded(
                RunStatus.failed, f"the run's machine could not be provisioned: {machine.reason}"
            )
        return leases.Target(machine_id=machine.id)

    def _record_recreation(self, why: str) -> None:
        with unit_of_work(self.ctl.db) as tx:
            run = runs.get_run(tx, self.run_id)
            run.context_recreations += 1
            tx.add(run)
            events.record(
                tx,
                "run.context_recreated",
                run.id,
                previous_machine=run.machine_id,
                reason=why,
                count=run.context_recreations,
            )

    def _move_to_fresh_machine(self, why: str) -> None:
        lost = self.machine
        if lost is not None:
            with unit_of_work(self.ctl.db) as tx:
                machine = tx.get(Machine, lost.id)
                if machine is not None and machine.state in (
                    MachineState.leased,
                    MachineState.ready,
                ):
                    machines.set_state(tx, machine, MachineState.lost, why)
            self.ctl.access.close_machine(machine=lost, why=f"the machine was lost: {why}")
        self._end_lease()
        self._record_recreation(why)
        self.lease = self._acquire()
        with unit_of_work(self.ctl.db) as tx:
            run = runs.get_run(tx, self.run_id)
            run.lease_id, run.machine_id = self.lease.id, self.lease.machine_id
            tx.add(run)
            self.machine = machines.get_machine(tx, self.lease.machine_id)
        self.handle = handle_for(self.ctl, self.machine)
        self._trace_machine()

    def _end_lease(self) -> None:
        if self.lease is None:
            return
        try:
            leases.release(ctl=self.ctl, lease_id=self.lease.id, caller=None)
        except Conflict:
            pass  # expired or released already
        self.lease = None

    def _give_back(self) -> None:
        """A pool's machine goes back to its pool (the lease's end hands it over); a run's
        private machine is destroyed first, so no hand-over races its removal."""
        with unit_of_work(self.ctl.reader) as tx:
            private = runs.get_run(tx, self.run_id).pool is None
        if self.machine is not None and self.machine.pool is None:
            private = True  # a fork the run continued on belongs to no pool
        if private and self.machine is not None:
            _destroy_quietly(self.ctl, self.machine.id)
        self._end_lease()

    def _renew_if_due(self) -> None:
        if self.lease is None:
            return
        if time.monotonic() - self.renewed_at < self.ctl.settings.run_lease_ttl_s / 3:
            return
        try:
            self.lease = leases.renew(db=self.ctl.db, lease_id=self.lease.id, caller=None)
            self.renewed_at = time.monotonic()
        except ShopfloorError as exc:
            log.warning("run %s could not renew its lease: %s", self.run_id, exc.message)

    def _still_ours(self, *, suspicious: bool = False) -> bool:
        """Fencing for the driver itself: results count only if the lease is still current.

        After a failed attempt (``suspicious``) the container is watched a little longer: a
        container being removed kills its commands a moment before the engine says so.
        """
        if self.lease is None:
            return False
        try:
            access.machine_for_command(
                db=self.ctl.db,
                machine_id=self.lease.machine_id,
                key=access.Key.internal(self.lease.fence),
            )
        except ShopfloorError:
            return False
        for _ in range(4 if suspicious else 1):
            if not self._container_alive():
                return False
            if suspicious:
                time.sleep(0.5)
        return True

    def _container_alive(self) -> bool:
        if self.machine is None:
            return False
        try:
            info = self.ctl.provider.inspect_container(self.machine.container_name)
        except ShopfloorError:
            return True  # the engine is unreachable; that is not proof the machine is gone
        return info is not None and info.running

    def _cancel_requested(self) -> bool:
        with unit_of_work(self.ctl.db) as tx:
            return runs.get_run(tx, self.run_id).cancel_requested

    # ------------------------------------------------------------ stages

    def _drive_stage(self, stage_id: str) -> bool:
        """Run a stage's attempts; True when the run ended here (failed or cancelled)."""
        self._recover_interrupted(stage_id)
        while True:
            with unit_of_work(self.ctl.db) as tx:
                stage = tx.get(Stage, stage_id)
                assert stage is not None
            if stage.status == StageStatus.passed:
                return False
            if self._cancel_requested():
                raise _RunEnded(RunStatus.cancelled, f"cancelled before stage {stage.name}")
            if stage.attempts > stage.retries:
                raise _RunEnded(
                    RunStatus.failed,
                    f"stage {stage.name} failed after {stage.attempts} attempt(s): {stage.summary}",
                )
            outcome = self._fork_attempt(stage) if stage.fork else self._attempt(stage)
            if outcome.cancelled:
                raise _RunEnded(RunStatus.cancelled, f"cancelled during stage {stage.name}")
            if outcome.machine_lost:
                self._move_to_fresh_machine(
                    f"machine {stage.machine_id} was lost during stage {stage.name}"
                )
            elif outcome.quarantined:
                self._move_to_fresh_machine(
                    f"machine {self.machine and self.machine.id} was {outcome.quarantined}"
                )

    def _recover_interrupted(self, stage_id: str) -> None:
        """A stage left ``running`` by a dead controller: its attempt failed; clean the machine."""
        self._clean_forks(stage_id)
        with unit_of_work(self.ctl.db) as tx:
            runs.hold_claim(tx, self.run_id, driver=self.me, ttl_s=self.claim_ttl_s)
            stage = tx.get(Stage, stage_id)
            assert stage is not None
            if stage.status != StageStatus.running:
                return
            reason = f"controller restarted during attempt {stage.attempts}"
            stage.history = [
                *stage.history,
                _history_entry(stage.attempts, "failed", reason, stage.machine_id, None, None),
            ]
            stage.status, stage.summary = StageStatus.pending, reason
            stage.retries += 1  # the controller died, not the stage: one more try
            tx.add(stage)
            events.record(tx, "stage.interrupted", stage.id, run_id=self.run_id, reason=reason)
        self._kill_leftovers()

    def _attempt(self, stage: Stage) -> _Outcome:
        assert self.machine is not None
        attempt = stage.attempts + 1
        attributes = {
            "run.id": self.run_id,
            "stage.name": stage.name,
            "stage.attempt": attempt,
            "stage.agent": stage.agent,
            "machine.id": self.machine.id,
            "commit": self.machine.commit,
            **self.facts,
        }
        with self.ctl.tracing.span(f"stage {stage.name}", attributes) as span:
            outcome = self._attempt_traced(stage, attempt)
            if span.is_recording():
                for key, value in (
                    ("status", outcome.status),
                    ("failure.signature", outcome.signature),
                    ("failure.kind", outcome.kind),
                    ("machine.lost", outcome.machine_lost or None),
                    ("machine.quarantined", outcome.quarantined),
                    ("stage.timed_out", outcome.timed_out or None),
                ):
                    if value is not None:
                        span.set_attribute(key, value)
                if outcome.status not in ("passed", "cancelled"):
                    tracing.failed(span, outcome.summary)
            return outcome

    def _assignment(
        self, run: Run, stage: Stage, attempt: int, lines: list[str], *, reports: bool = True
    ) -> Assignment:
        """What the stage's agent is given, on this driver's machine; ``reports``: a remote
        agent's report is read for this stage (not for a fork's select check)."""
        assert self.handle is not None

        def report() -> RemoteReport | None:
            return remote_stages.reported(self.ctl.reader, stage.id, attempt) if reports else None

        return Assignment(
            run_id=run.id,
            task=run.task,
            repo=run.repo,
            ref=run.ref,
            stage=stage.name,
            attempt=attempt,
            params=dict(stage.params),
            machine=self.handle,
            timeout_s=stage.timeout_s,
            log=lines.append,
            remote_report=report,
            known_tests=self._known_tests(run),
        )

    def _mark_started(self, stage: Stage, attempt: int, **extra: Any) -> datetime:
        """The stage is running this attempt on the run's machine (kept by this driver's
        claim); answers when it started."""
        assert self.machine is not None
        started = utcnow()
        self._check_claim()
        with unit_of_work(self.ctl.db) as tx:
            runs.hold_claim(tx, self.run_id, driver=self.me, ttl_s=self.claim_ttl_s)
            current = tx.get(Stage, stage.id)
            assert current is not None
            current.status, current.attempts = StageStatus.running, attempt
            current.started_at = current.started_at or started
            current.machine_id = self.machine.id
            tx.add(current)
            events.record(
                tx,
                "stage.started",
                stage.id,
                run_id=self.run_id,
                stage=stage.name,
                attempt=attempt,
                machine_id=self.machine.id,
                **extra,
            )
        return started

    def _attempt_traced(self, stage: Stage, attempt: int) -> _Outcome:
        assert self.machine is not None
        assert self.handle is not None
        started = self._mark_started(stage, attempt)
        lines: list[str] = []
        outcome = self._run_agent(stage, attempt, lines)
        if not outcome.cancelled and not self._still_ours(suspicious=outcome.status != "passed"):
            outcome = _Outcome(
                "failed", "the machine was lost during the attempt", machine_lost=True
            )
        finished = utcnow()
        if not outcome.machine_lost:
            self._write_stage_notes(stage, attempt, outcome, lines)
        self._learn(stage, attempt, outcome, lines)
        if outcome.status != "passed":
            self.known = None
        self._record_attempt(stage, attempt, outcome, started, finished, lines)
        return outcome

    def _run_agent(self, stage: Stage, attempt: int, lines: list[str]) -> _Outcome:
        assert self.machine is not None
        assert self.handle is not None
        with unit_of_work(self.ctl.db) as tx:
            run = runs.get_run(tx, self.run_id)
        try:
            self._write_run_json(run, stage, attempt)
        except ShopfloorError as exc:
            if not self._container_alive():
                return _Outcome("failed", f"machine unreachable: {exc.message}", machine_lost=True)
            return _Outcome("failed", f"could not write run.json: {exc.message}")
        work = self._assignment(run, stage, attempt, lines)
        box: dict[str, Any] = {}

        def run_agent() -> None:
            try:
                box["result"] = registry.get_agent(stage.agent).run(work)
            except BaseException as exc:  # noqa: BLE001 - reported as the attempt's failure
                box["error"] = exc

        worker = threading.Thread(  # in this thread's context: the agent's spans are the stage's
            target=contextvars.copy_context().run,
            args=(run_agent,),
            name=f"stage-{stage.id}",
            daemon=True,
        )
        worker.start()
        deadline = time.monotonic() + stage.timeout_s + KILL_GRACE_S + 10
        while worker.is_alive():
            worker.join(timeout=0.5)
            self._renew_if_due()
            if self.ctl.stopping.is_set():
                raise _Stopping()
            self._check_claim()
            if self._cancel_requested():
                self._kill_leftovers()
                return _Outcome("cancelled", "cancelled during the attempt", cancelled=True)
            if self.fork_decided is not None and self.fork_decided.is_set():
                self._kill_leftovers(graceful=False)  # a losing fork's machine goes anyway
                return _Outcome("failed", "stopped: another fork passed first")
            if time.monotonic() > deadline:
                self._kill_leftovers()
                return _Outcome(
                    "failed", f"timed out after {stage.timeout_s:g}s and was killed", timed_out=True
                )
        if "error" in box:
            error = box["error"]
            text = (
                error.message
                if isinstance(error, ShopfloorError)
                else f"{type(error).__name__}: {error}"
            )
            lines.append(f"[shopfloor: agent raised {text}]")
            return _Outcome(
                "failed", f"agent {stage.agent} raised: {text}", error_type=type(error).__name__
            )
        result: StageResult = box["result"]
        try:
            self._store_artifacts(stage, attempt, result)
        except ShopfloorError as exc:
            return _Outcome("failed", f"the stage's evidence could not be stored: {exc.message}")
        agent_log = "\n".join(
            a.data.decode(errors="replace") for a in result.artifacts if a.kind == "log"
        )
        return _Outcome(
            result.status,
            result.summary,
            dict(result.outputs),
            agent_log=agent_log[-LOG_TAIL_CHARS:],
            files={a.name: a.data for a in result.artifacts if len(a.data) <= NOTE_FILE_CAP_BYTES},
        )

    # ------------------------------------------------------------ forking stages

    def _fork_attempt(self, stage: Stage) -> _Outcome:
        """One attempt of a forking stage: the run's machine is snapshotted and started
        ``count`` times, the agent runs once on each fork in parallel (own history entry,
        log and evidence), the stage's select rule picks the winner and the run continues
        on the winner's machine (same workspace and handoff folder: no context re-creation).
        The others are destroyed once their evidence is kept."""
        assert self.machine is not None
        assert self.lease is not None
        attempt = stage.attempts + 1
        count = int(stage.fork["count"])
        select: Any = stage.fork.get("select", "tests")
        started = self._mark_started(stage, attempt, fork=count)
        with unit_of_work(self.ctl.reader) as tx:
            run = runs.get_run(tx, self.run_id)
        try:  # with the lessons, before the snapshot: every fork finds them
            self._write_run_json(run, stage, attempt)
        except ShopfloorError as exc:
            failed = _Outcome("failed", f"could not write run.json: {exc.message}")
            self._record_attempt(stage, attempt, failed, started, utcnow(), [])
            return failed
        try:
            forks = self._make_forks(stage, count)
        except ShopfloorError as exc:
            failed = _Outcome(
                "failed", f"could not fork machine {self.machine.id} {count} ways: {exc.message}"
            )
            self._record_attempt(stage, attempt, failed, started, utcnow(), [])
            return failed
        results = self._run_forks(stage, attempt, select, forks)
        cancelled = any(r.outcome.cancelled for r in results)
        winners = sorted(
            (r for r in results if r.won and not cancelled), key=lambda r: r.finished_mono
        )
        winner = winners[0] if winners else None
        outcome = self._record_forks(stage, attempt, count, select, results, winner, started)
        self._settle_forks(results, winner)
        return outcome

    def _make_forks(self, stage: Stage, count: int) -> list[tuple[Machine, LeasePublic]]:
        """Snapshot the run's machine, start the forks and lease each to the run (so no other
        caller can take one); all or none."""
        assert self.machine is not None
        labels = {FORK_STAGE_LABEL: stage.id, "run": self.run_id}
        began = time.monotonic()
        snap = snapshots.take(
            ctl=self.ctl,
            machine_id=self.machine.id,
            key=None,
            name=f"stage {stage.name} of run {self.run_id}",
            labels=labels,
        )
        made: list[Machine] = []
        got: list[tuple[Machine, LeasePublic]] = []
        lease: LeasePublic
        try:
            made = snapshots.start_machines(
                ctl=self.ctl,
                snapshot_id=snap.id,
                count=count,
                labels={**self.machine.labels, **labels},
                forked_from=self.machine.id,
            )
            with ThreadPoolExecutor(max_workers=count, thread_name_prefix="fork-lease") as pool:
                granted = [pool.submit(self._lease_fork, machine) for machine in made]
                wait(granted)
            got = [(m, f.result()) for m, f in zip(made, granted, strict=True) if not f.exception()]
            failed = next((f.exception() for f in granted if f.exception()), None)
            if failed is not None:
                raise failed
        except Exception:
            for machine in made:
                _destroy_quietly(self.ctl, machine.id)
            for _, lease in got:
                _release_quietly(self.ctl, lease.id)
            _delete_snapshot_quietly(self.ctl, snap.id)
            raise
        log.info(
            "run %s: stage %s forked %d ways in %.2fs (snapshot %.2fs)",
            self.run_id,
            stage.name,
            count,
            time.monotonic() - began,
            snap.took_ms / 1000,
        )
        with unit_of_work(self.ctl.db) as tx:
            events.record(
                tx,
                "stage.forked",
                stage.id,
                run_id=self.run_id,
                stage=stage.name,
                source=self.machine.id,
                snapshot=snap.id,
                forks=[m.id for m in made],
                took_ms=round((time.monotonic() - began) * 1000, 1),
                snapshot_ms=snap.took_ms,
            )
        return got

    def _lease_fork(self, machine: Machine) -> LeasePublic:
        return leases.acquire_blocking(
            ctl=self.ctl,
            request=leases.LeaseRequest(
                target=leases.Target(machine_id=machine.id),
                holder=f"run:{self.run_id}",
                ttl_s=self.ctl.settings.run_lease_ttl_s,
                wait_s=10,
            ),
        )

    def _run_forks(
        self, stage: Stage, attempt: int, select: Any, forks: list[tuple[Machine, LeasePublic]]
    ) -> list[_ForkResult]:
        """Each fork's agent and select check in its own thread; this one keeps the run's
        own lease alive meanwhile. With ``select: "first"`` the others stop once one passed."""
        decided = threading.Event() if select == "first" else None
        with ThreadPoolExecutor(max_workers=len(forks), thread_name_prefix="fork-stage") as pool:
            futures: list[Future[_ForkResult]] = [
                pool.submit(
                    contextvars.copy_context().run,
                    self._one_fork,
                    stage,
                    attempt,
                    select,
                    index,
                    machine,
                    lease,
                    decided,
                )
                for index, (machine, lease) in enumerate(forks, start=1)
            ]
            while wait(futures, timeout=0.5).not_done:
                self._renew_if_due()
        results: list[_ForkResult] = []
        stopping: BaseException | None = None
        for index, (future, (machine, lease)) in enumerate(zip(futures, forks, strict=True), 1):
            error = future.exception()
            if isinstance(error, _Stopping | runs.ClaimLost):
                stopping = error
                continue
            if error is not None:
                text = f"{type(error).__name__}: {error}"
                results.append(
                    _ForkResult(
                        index,
                        machine,
                        lease,
                        _Outcome("failed", f"the fork's driver failed: {text}"),
                        False,
                        None,
                        time.monotonic(),
                        utcnow(),
                        [],
                    )
                )
                continue
            results.append(future.result())
        if stopping is not None:  # the forks are cleaned by the next start
            raise stopping
        return results

    def _one_fork(
        self,
        stage: Stage,
        attempt: int,
        select: Any,
        index: int,
        machine: Machine,
        lease: LeasePublic,
        decided: threading.Event | None = None,
    ) -> _ForkResult:
        fork = copy.copy(self)  # the same run, with the fork's machine, lease and handle
        fork.fork_decided = decided
        fork.machine, fork.lease = machine, lease
        fork.handle = handle_for(self.ctl, machine)
        fork.renewed_at = time.monotonic()
        fork.lessons_on = machine.id  # copied from the run's machine with the workspace
        fork.fork_meta = {"fork": index, "fork_machine": machine.id}
        started = utcnow()
        lines: list[str] = [f"[shopfloor: fork {index} on machine {machine.id}]"]
        outcome = fork._run_agent(stage, attempt, lines)
        check: str | None = None
        won = outcome.status == "passed"
        if won and select != "first":
            won, check = fork._select_check(stage, attempt, select, lines)
            lines.append(f"[shopfloor: select {'passed' if won else 'failed'}: {check}]")
        finished_mono, finished = time.monotonic(), utcnow()
        if won and decided is not None:
            decided.set()
        if not outcome.cancelled:
            fork._write_stage_notes(stage, attempt, outcome, lines)
        fork._save_log(stage, attempt, lines, name=f"{stage.name}-attempt{attempt}-fork{index}.log")
        return _ForkResult(
            index, machine, lease, outcome, won, check, finished_mono, finished, lines, started
        )

    def _select_check(
        self, stage: Stage, attempt: int, select: Any, lines: list[str]
    ) -> tuple[bool, str]:
        """Whether this fork's result is good: a command's exit code, or the next stage's
        tester run on the fork (its evidence kept with the fork's)."""
        assert self.handle is not None
        if isinstance(select, dict):
            try:
                ran = self.handle.run(
                    str(select["command"]), timeout_s=float(select.get("timeout_s", 600))
                )
            except Exception as exc:  # noqa: BLE001 - a failed check is a lost fork
                return False, f"the select command could not run: {exc}"
            lines.extend((ran.stdout + ran.stderr).splitlines()[-50:])
            return ran.exit_code == 0, f"the select command exited {ran.exit_code}"
        with unit_of_work(self.ctl.reader) as tx:
            run = runs.get_run(tx, self.run_id)
            following = next(
                (s for s in runs.stages_of(tx, self.run_id) if s.position == stage.position + 1),
                None,
            )
        if following is None:
            return True, "no next stage to test with"
        work = self._assignment(run, following, attempt, lines, reports=False)
        try:
            result = registry.get_agent(following.agent).run(work)
        except Exception as exc:  # noqa: BLE001 - a failed check is a lost fork
            return False, f"{following.name} ({following.agent}) raised: {exc}"
        saved = self.fork_meta
        self.fork_meta = {**saved, "select": following.name}
        try:
            self._store_artifacts(stage, attempt, result)
        except ShopfloorError as exc:
            log.warning("evidence of the select check not stored: %s", exc.message)
        finally:
            self.fork_meta = saved
        return result.status == "passed", f"{following.name} on the fork: {result.summary}"

    def _save_log(self, stage: Stage, attempt: int, lines: list[str], *, name: str) -> None:
        if not lines or self.machine is None:
            return
        try:
            runs.save_artifact(
                ctl=self.ctl,
                run_id=self.run_id,
                stage=stage.name,
                attempt=attempt,
                machine=self.machine,
                kind="log",
                name=name,
                data="\n".join(lines).encode(),
                content_type="text/plain; charset=utf-8",
                meta={"source": "driver", **self.fork_meta},
            )
        except ShopfloorError as exc:
            log.warning("stage log of %s not stored: %s", stage.name, exc.message)

    def _record_forks(
        self,
        stage: Stage,
        attempt: int,
        count: int,
        select: Any,
        results: list[_ForkResult],
        winner: _ForkResult | None,
        started: Any,
    ) -> _Outcome:
        """Every fork's attempt in the stage's history and, with a winner, the run moved to
        its machine and lease — in one transaction, so a restart finds one or the other."""
        cancelled = any(r.outcome.cancelled for r in results)
        if winner is not None:
            outcome = _Outcome(
                "passed",
                f"fork {winner.index} of {count} won: {winner.outcome.summary}",
                {
                    **winner.outcome.outputs,
                    "fork": {"count": count, "winner": winner.index, "machine": winner.machine.id},
                },
            )
        elif cancelled:
            outcome = _Outcome("cancelled", "cancelled during the forks", cancelled=True)
        else:
            why = "; ".join(
                f"fork {r.index}: {r.check or r.outcome.summary}"[:300] for r in results
            )
            outcome = _Outcome("failed", f"all {count} forks failed: {why}")
        finished = utcnow()
        self._check_claim()
        with unit_of_work(self.ctl.db) as tx:
            runs.hold_claim(tx, self.run_id, driver=self.me, ttl_s=self.claim_ttl_s)
            current = tx.get(Stage, stage.id)
            assert current is not None
            last_try = attempt > current.retries
            current.status = (
                StageStatus.passed
                if winner is not None
                else StageStatus.cancelled
                if cancelled
                else StageStatus.failed
                if last_try
                else StageStatus.pending
            )
            current.summary, current.outputs = outcome.summary, outcome.outputs
            if winner is not None or last_try or cancelled:
                current.finished_at = finished
            entries = []
            for r in results:
                entry = _history_entry(
                    attempt,
                    r.outcome.status if r.won or r.outcome.status != "passed" else "failed",
                    r.outcome.summary + (f" ({r.check})" if r.check else ""),
                    r.machine.id,
                    r.started or started,
                    r.finished,
                    log_tail=("\n".join(r.lines) + "\n" + r.outcome.agent_log)[-LOG_TAIL_CHARS:],
                )
                entry.update(
                    fork=r.index, forks=count, winner=r is winner, select=_select_name(select)
                )
                entries.append(entry)
            current.history = [*current.history, *entries]
            if winner is not None:
                current.machine_id = winner.machine.id
                run = runs.get_run(tx, self.run_id)
                run.lease_id, run.machine_id = winner.lease.id, winner.machine.id
                tx.add(run)
                events.record(
                    tx,
                    "run.machine",
                    run.id,
                    machine_id=winner.machine.id,
                    lease_id=winner.lease.id,
                    fork_of=self.machine.id if self.machine else None,
                    stage=stage.name,
                )
            tx.add(current)
            events.record(
                tx,
                "stage.attempt",
                stage.id,
                run_id=self.run_id,
                stage=stage.name,
                attempt=attempt,
                status=outcome.status,
                summary=outcome.summary[:500],
                forks=count,
                winner=winner.index if winner else None,
            )
            if current.status == StageStatus.failed:
                owners.stage_failed_in(tx, run=runs.get_run(tx, self.run_id), stage=current)
        return outcome

    def _settle_forks(self, results: list[_ForkResult], winner: _ForkResult | None) -> None:
        """The losers (and, with a winner, the run's previous machine) go; their evidence is
        stored already. The winner's snapshot stays until retention finds it unused."""
        for r in results:
            if r is not winner:
                _destroy_quietly(self.ctl, r.machine.id)
                _release_quietly(self.ctl, r.lease.id)
        if winner is None:
            with unit_of_work(self.ctl.reader) as tx:
                snap_id = tx.exec(
                    select(Machine.snapshot_id).where(
                        col(Machine.id).in_([r.machine.id for r in results])
                    )
                ).first()
            if snap_id:
                _delete_snapshot_quietly(self.ctl, snap_id)
            return
        old_machine, old_lease = self.machine, self.lease
        self.machine, self.lease = winner.machine, winner.lease
        self.handle = handle_for(self.ctl, winner.machine)
        self.renewed_at = time.monotonic()
        self.lessons_on = winner.machine.id
        self._trace_machine()
        with unit_of_work(self.ctl.reader) as tx:
            pooled = runs.get_run(tx, self.run_id).pool is not None
        if old_machine is not None and (not pooled or old_machine.pool is None):
            _destroy_quietly(self.ctl, old_machine.id)
        if old_lease is not None:
            _release_quietly(self.ctl, old_lease.id)

    def _clean_forks(self, stage_id: str) -> None:
        """After a restart: forks of this stage that are not the run's machine, and leases
        the run holds besides its own (a machine it left mid-switch), are removed."""
        with unit_of_work(self.ctl.reader) as tx:
            run = runs.get_run(tx, self.run_id)
            stage = tx.get(Stage, stage_id)
            if stage is None or not stage.fork:
                return
            alive = [
                m
                for m in tx.exec(select(Machine).where(col(Machine.state).in_(ALIVE_STATES)))
                if m.labels.get(FORK_STAGE_LABEL) == stage_id and m.id != run.machine_id
            ]
            stray = list(
                tx.exec(
                    select(Lease).where(
                        Lease.holder == f"run:{self.run_id}",
                        Lease.state == LeaseState.active,
                        Lease.id != (run.lease_id or ""),
                    )
                )
            )
            strays = {lease.id: tx.get(Machine, lease.machine_id) for lease in stray}
            snaps = [
                s.id
                for s in tx.exec(select(Snapshot))
                if s.labels.get(FORK_STAGE_LABEL) == stage_id
            ]
        for machine in alive:
            _destroy_quietly(self.ctl, machine.id)
        for lease_id, left in strays.items():
            if left is not None and (run.pool is None or left.pool is None):
                _destroy_quietly(self.ctl, left.id)
            _release_quietly(self.ctl, lease_id)
        for snap_id in snaps:
            _delete_snapshot_quietly(self.ctl, snap_id)
        if alive or strays:
            with unit_of_work(self.ctl.db) as tx:
                events.record(
                    tx,
                    "stage.forks_cleaned",
                    stage_id,
                    run_id=self.run_id,
                    machines=[m.id for m in alive],
                    leases=list(strays),
                )

    def _known_tests(self, run: Run) -> KnownTests:
        """The repo's known flaky tests, quarantined ones only where the run's policy says
        ``flaky = "quarantine"``; nothing when learning is off (the tester then neither
        reruns nor lets a failure through) or the history cannot be read (not worth a
        failed stage)."""
        known = self._known_cases(run)
        if not known:
            return KnownTests()
        return KnownTests(
            flaky=frozenset(t.test for t in known),
            quarantined=frozenset(t.test for t in known if t.state == "quarantined"),
        )

    def _known_cases(self, run: Run) -> list[CaseHealth] | None:
        """The repo's flaky and quarantined tests under the run's policy, read once and again
        after a failed attempt; None when learning is off or they could not be read."""
        if not self.ctl.settings.learning:
            return None
        if self.known is None:
            quarantine = flaky.policy_quarantines(run.policy)
            try:
                self.known = flaky.known_flaky(ctl=self.ctl, repo=run.repo, quarantine=quarantine)
            except Exception as exc:  # noqa: BLE001 - learning must not stop the line
                log.warning("run %s: known flaky tests not read: %s", self.run_id, exc)
                return None
        return self.known

    def _kill_leftovers(self, *, graceful: bool = True) -> None:
        """SIGTERM, a grace, then SIGKILL to every process the stage left in the machine."""
        if self.handle is None:
            return
        for signal in ("TERM", "KILL") if graceful else ("KILL",):
            try:
                self.handle.run(f"kill -{signal} -1 2>/dev/null; true", timeout_s=10)
            except Exception as exc:  # noqa: BLE001 - the kill may take the transport down too
                log.info("kill -%s in %s: %s", signal, self.handle.machine_id, exc)
            if signal == "TERM":
                time.sleep(self.ctl.settings.stage_kill_grace_s)

    # ------------------------------------------------------------ notes and records

    def _write_run_json(self, run: Run, stage: Stage, attempt: int) -> None:
        """``run.json``, with the lessons in the same SFTP session when this machine has none
        yet (a lessons file that cannot be written is logged, never the run's failure)."""
        assert self.handle is not None
        assert self.machine is not None
        with unit_of_work(self.ctl.db) as tx:
            stages = runs.stages_of(tx, run.id)
        lessons = self._lessons_due(run)
        doc = {
            "run_id": run.id,
            "task": run.task,
            "repo": run.repo,
            "ref": run.ref,
            "current": {
                "stage": stage.name,
                "attempt": attempt,
                **({"fork": self.fork_meta["fork"]} if self.fork_meta else {}),
            },
            "context_recreations": run.context_recreations,
            "lessons": f"{HANDOFF_DIR}/{learning.LESSONS_MD}" if self.lessons else None,
            "stages": [
                {
                    "name": s.name,
                    "agent": s.agent,
                    "status": s.status.value,
                    "attempts": s.attempts,
                    "summary": s.summary,
                    "outputs": s.outputs,
                    "dir": f"{HANDOFF_DIR}/{s.name}",
                }
                for s in stages
            ],
        }
        files = {f"{HANDOFF_DIR}/run.json": json.dumps(doc, indent=2).encode()}
        if lessons:
            try:
                self.handle.write_files({**files, **lessons})
                self.lessons_on = self.machine.id
                return
            except ShopfloorError as exc:  # lessons are a courtesy: run.json alone
                log.warning("run %s: lessons not written: %s", self.run_id, exc.message)
        self.handle.write_files(files)

    def _lessons_due(self, run: Run) -> dict[str, bytes]:
        """The repo's lessons (gathered once, at the run's start) for the handoff folder of
        each machine the run uses, until they are written there; none when learning is off."""
        if self.machine is None or self.lessons_on == self.machine.id:
            return {}
        if self.lessons is None:
            known = self._known_cases(run)
            self.lessons = learning.lessons_for(ctl=self.ctl, repo=run.repo, known=known) or {}
        if not self.lessons:
            return {}
        found = learning.lessons_files(self.lessons)
        return {f"{HANDOFF_DIR}/{name}": text.encode() for name, text in found.items()}

    def _learn(self, stage: Stage, attempt: int, outcome: _Outcome, lines: list[str]) -> None:
        """Hand the finished attempt to learning; a quarantined machine moves the run."""
        if outcome.cancelled:
            return
        passed = outcome.status == "passed"
        facts = AttemptFacts(
            stage=stage.name,
            summary=outcome.summary,
            log="\n".join(lines) + "\n" + outcome.agent_log,
            machine_lost=outcome.machine_lost,
            timed_out=outcome.timed_out,
            error_type=outcome.error_type,
            exit_codes=learning.exit_codes(outcome.outputs),
        )
        learned = learning.observe_attempt(
            ctl=self.ctl,
            run_id=self.run_id,
            stage=stage.name,
            attempt=attempt,
            machine_id=self.machine.id if self.machine else None,
            passed=passed,
            facts=None if passed else facts,
            repo=self.facts.get("repo"),
        )
        if learned.quarantined is not None and not outcome.machine_lost:
            outcome.quarantined = learned.quarantined.reason
        if learned.signature is not None:
            outcome.signature = learned.signature.signature
            outcome.kind = learned.signature.kind

    def _write_stage_notes(
        self, stage: Stage, attempt: int, outcome: _Outcome, lines: list[str]
    ) -> None:
        assert self.handle is not None
        folder = f"{HANDOFF_DIR}/{stage.name}"
        note = {
            "stage": stage.name,
            "attempt": attempt,
            "status": outcome.status,
            "summary": outcome.summary,
            "outputs": outcome.outputs,
        }
        try:
            self.handle.write_files(
                {
                    f"{folder}/result.json": json.dumps(note, indent=2).encode(),
                    f"{folder}/log.txt": "\n".join(lines).encode(),
                    **{f"{folder}/{name}": data for name, data in outcome.files.items()},
                }
            )
        except Exception as exc:  # noqa: BLE001 - notes are a courtesy; the record is in the DB
            log.warning("could not write notes of %s: %s", stage.name, exc)

    def _store_artifacts(self, stage: Stage, attempt: int, result: StageResult) -> None:
        assert self.machine is not None
        for artifact in result.artifacts:
            runs.save_artifact(
                ctl=self.ctl,
                run_id=self.run_id,
                stage=stage.name,
                attempt=attempt,
                machine=self.machine,
                kind=artifact.kind,
                name=artifact.name,
                data=artifact.data,
                content_type=artifact.content_type,
                meta={**artifact.meta, **self.fork_meta},
            )

    def _record_attempt(
        self,
        stage: Stage,
        attempt: int,
        outcome: _Outcome,
        started: Any,
        finished: Any,
        lines: list[str],
    ) -> None:
        log_text = "\n".join(lines)
        if lines and self.machine is not None:
            try:
                runs.save_artifact(
                    ctl=self.ctl,
                    run_id=self.run_id,
                    stage=stage.name,
                    attempt=attempt,
                    machine=self.machine,
                    kind="log",
                    name=f"{stage.name}-attempt{attempt}.log",
                    data=log_text.encode(),
                    content_type="text/plain; charset=utf-8",
                    meta={"source": "driver"},
                )
            except ShopfloorError as exc:
                log.warning("stage log of %s not stored: %s", stage.name, exc.message)
        self._check_claim()
        with unit_of_work(self.ctl.db) as tx:
            runs.hold_claim(tx, self.run_id, driver=self.me, ttl_s=self.claim_ttl_s)
            current = tx.get(Stage, stage.id)
            assert current is not None
            passed = outcome.status == "passed"
            last_try = attempt > current.retries and not outcome.moves
            current.status = (
                StageStatus.passed
                if passed
                else StageStatus.cancelled
                if outcome.cancelled
                else StageStatus.failed
                if last_try
                else StageStatus.pending
            )
            current.summary, current.outputs = outcome.summary, outcome.outputs
            if passed or last_try or outcome.cancelled:
                current.finished_at = finished
            if outcome.moves:
                current.retries += 1  # a lost or benched machine is not the stage's fault
            current.history = [
                *current.history,
                _history_entry(
                    attempt,
                    outcome.status,
                    outcome.summary,
                    current.machine_id,
                    started,
                    finished,
                    log_tail=(log_text + "\n" + outcome.agent_log)[-LOG_TAIL_CHARS:],
                ),
            ]
            tx.add(current)
            events.record(
                tx,
                "stage.attempt",
                stage.id,
                run_id=self.run_id,
                stage=stage.name,
                attempt=attempt,
                status=outcome.status,
                summary=outcome.summary[:500],
                machine_lost=outcome.machine_lost,
                quarantined=outcome.quarantined,
            )
            if current.status == StageStatus.failed:
                owners.stage_failed_in(tx, run=runs.get_run(tx, self.run_id), stage=current)


def _history_entry(
    attempt: int,
    status: str,
    summary: str,
    machine_id: str | None,
    started: Any,
    finished: Any,
    log_tail: str = "",
) -> dict[str, Any]:
    duration = (finished - started).total_seconds() * 1000 if started and finished else None
    return {
        "attempt": attempt,
        "status": status,
        "summary": summary,
        "machine_id": machine_id,
        "started_at": started.isoformat() if started else None,
        "finished_at": finished.isoformat() if finished else None,
        "duration_ms": round(duration, 1) if duration is not None else None,
        "log_tail": log_tail,
    }


FORK_STAGE_LABEL = "fork-stage"
"""The label on a forking stage's forks and snapshot: the stage's id (found again after a
restart)."""


@dataclass
class _ForkResult:
    index: int
    machine: Machine
    lease: LeasePublic
    outcome: _Outcome
    won: bool
    """The agent passed and the select rule accepted the result."""
    check: str | None
    finished_mono: float
    finished: Any
    lines: list[str]
    started: Any = None


def _select_name(select: Any) -> str:
    return "command" if isinstance(select, dict) else str(select)


def _release_quietly(ctl: Controller, lease_id: str) -> None:
    try:
        leases.release(ctl=ctl, lease_id=lease_id, caller=None)
    except ShopfloorError:
        pass  # ended already


def _delete_snapshot_quietly(ctl: Controller, snapshot_id: str) -> None:
    try:
        snapshots.delete_snapshot(ctl=ctl, snapshot_id=snapshot_id)
    except ShopfloorError as exc:  # still used (the winner) or gone: retention decides
        log.info("snapshot %s kept: %s", snapshot_id, exc.message)


class _RunEnded(Exception):
    def __init__(self, status: RunStatus, reason: str | None) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _finish(ctl: Controller, run_id: str, status: RunStatus, reason: str | None) -> None:
    with unit_of_work(ctl.db) as tx:
        run = runs.get_run(tx, run_id)
        if run.status not in FINISHED_RUN_STATUSES:
            runs.end_run(tx, run, status, reason)


def _destroy_quietly(ctl: Controller, machine_id: str) -> None:
    try:
        machines.destroy_machine(  # its lease just ended: no hand-over needed, it goes
            db=ctl.db,
            provider=ctl.provider,
            access=ctl.access,
            machine_id=machine_id,
            even_if_leased=True,
        )
    except ShopfloorError as exc:
        log.warning("could not destroy the run's machine %s: %s", machine_id, exc.message)


def stale_run_leases(*, tx: Session, older_than_s: float) -> list[str]:
    """Runs that ended but whose lease is still active (a crash between the two steps)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    rows = tx.exec(
        select(Run.lease_id)
        .join(Lease, col(Lease.id) == col(Run.lease_id))
        .where(
            col(Run.status).in_(list(FINISHED_RUN_STATUSES)),
            Lease.state == LeaseState.active,
            col(Run.finished_at) < cutoff,
        )
    )
    return [r for r in rows if r]


def release_stale_run_leases(*, ctl: Controller) -> None:
    with unit_of_work(ctl.reader) as tx:
        stale = stale_run_leases(tx=tx, older_than_s=5)
    for lease_id in stale:
        try:
            leases.release(ctl=ctl, lease_id=lease_id, caller=None)
        except Conflict:
            pass


def driver_tick(*, ctl: Controller) -> None:
    """One tick of the run loop: start drivers, then tidy leases of runs that ended."""
    drive_tick(ctl=ctl)
    release_stale_run_leases(ctl=ctl)
