"""Tables. The database is the source of truth for intent; the engine for what exists."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, TypeDecorator, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware datetimes out, on SQLite (which forgets zones) too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def ts_field(nullable: bool = False, index: bool = False) -> Any:
    """A UTC timestamp column: now by default, or empty when ``nullable``."""
    if nullable:
        return Field(default=None, sa_type=UTCDateTime, nullable=True, index=index)
    return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False, index=index)


def json_field(default: Any) -> Any:
    return Field(default_factory=lambda: type(default)(default), sa_column=Column(JSON))


class MachineState(StrEnum):
    provisioning = "provisioning"
    ready = "ready"
    leased = "leased"
    stopped = "stopped"
    failed = "failed"
    lost = "lost"
    destroyed = "destroyed"
    quarantined = "quarantined"
    """Benched by machine health (infra failures here while its stages passed elsewhere):
    never leased, not counted by its pool, kept for ops to look into or unquarantine."""
    paused = "paused"
    """Its processes frozen with their memory (the engine's pause); ``paused_from`` is the
    state resume returns to. Counted by its pool; commands answer 409."""


ALIVE_STATES = (
    MachineState.provisioning,
    MachineState.ready,
    MachineState.leased,
    MachineState.stopped,
    MachineState.quarantined,
    MachineState.paused,
)
"""States whose container and volume must exist (reconcile keeps them)."""


class Role(StrEnum):
    ops = "ops"
    agent = "agent"
    reviewer = "reviewer"


class Machine(SQLModel, table=True):
    __tablename__ = "machines"

    id: str = Field(default_factory=lambda: new_id("m"), primary_key=True)
    state: MachineState = Field(default=MachineState.provisioning, index=True)
    reason: str | None = None
    repo: str | None = None
    repo_name: str | None = None
    ref: str | None = None
    commit: str | None = None
    """The commit the ref pointed at when the machine was made; reset returns here."""
    branch: str | None = None
    image: str
    cpus: float
    memory_mb: int
    network: str = "none"
    labels: dict[str, str] = json_field({})
    setup: list[str] = json_field([])
    pool: str | None = Field(default=None, index=True)
    container_name: str
    volume_name: str
    host: str = Field(default="local", index=True)
    """The host (engine) the machine was placed on; every call about it goes there."""
    fence: int = 0
    """Fencing counter: grows with each lease granted or ended on this machine."""
    paused_from: str | None = None
    """While paused: the state resume returns to (ready, leased or quarantined)."""
    snapshot_id: str | None = Field(default=None, index=True)
    """The snapshot the machine was started from (a fork's, or one named in its template)."""
    forked_from: str | None = None
    """The machine a fork copies."""
    reserved_for: str | None = None
    """The API token (an agent's) whose fork this is: only it is ever granted the machine,
    and the machine is destroyed when its lease ends (nothing of it reaches another holder)."""
    created_at: datetime = ts_field()
    updated_at: datetime = ts_field()
    ready_at: datetime | None = ts_field(nullable=True)

    @property
    def workdir(self) -> str:
        return f"/workspace/{self.repo_name}" if self.repo_name else "/workspace"


class SnapshotState(StrEnum):
    taking = "taking"
    """Being taken: a controller that dies meanwhile leaves one, removed at its restart."""
    ready = "ready"


class Snapshot(SQLModel, table=True):
    """A machine's disk state saved: its container's filesystem as an image and its
    workspace as a volume snapshot (see ``Provider.snapshot_volume``)."""

    __tablename__ = "snapshots"

    id: str = Field(default_factory=lambda: new_id("snap"), primary_key=True)
    name: str = ""
    labels: dict[str, str] = json_field({})
    pinned: bool = False
    state: SnapshotState = Field(default=SnapshotState.taking, index=True)
    machine_id: str = Field(index=True)
    """The machine it was taken of."""
    host: str = "local"
    """The host whose engine holds its image and workspace copy; its machines start there."""
    owner_token_id: str | None = Field(default=None, index=True)
    """The agent's API token that took it (None: ops or the controller): an agent sees,
    uses and deletes only its own snapshots."""
    image: str = ""
    """The image of the machine's filesystem (``docker commit``)."""
    base_image: str = ""
    volume_snapshot: str = ""
    repo: str | None = None
    repo_name: str | None = None
    ref: str | None = None
    commit: str | None = None
    branch: str | None = None
    cpus: float = 1.0
    memory_mb: int = 1024
    network: str = "none"
    setup: list[str] = json_field([])
    size_bytes: int = 0
    has_memory: bool = False
    memory_reason: str | None = None
    shared_blocks: bool = False
    """Whether the workspace copy shares its blocks (copy-on-write) or is a whole copy."""
    took_ms: float = 0.0
    paused_ms: float = 0.0
    created_at: datetime = ts_field(index=True)


class HostState(StrEnum):
    ready = "ready"
    unreachable = "unreachable"
    """Its engine did not answer for ``SHOPFLOOR_HOST_TIMEOUT_S``: its machines are lost."""
    cordoned = "cordoned"
    """Keeps its machines; no new machine goes there."""
    draining = "draining"
    """Like cordoned, and its ready machines leave the pools (refilled elsewhere)."""


class Host(SQLModel, table=True):
    """One Docker engine of the fleet (issue 14); ``local`` is SHOPFLOOR_DOCKER_HOST's."""

    __tablename__ = "hosts"

    name: str = Field(primary_key=True)
    url: str
    tls: dict[str, str] = json_field({})
    """Client TLS file paths of a ``tcp://`` engine: ``ca``, ``cert``, ``key``."""
    labels: dict[str, str] = json_field({})
    cpus: float | None = None
    """Capacity: CPUs the fleet may reserve here; None: no limit (``local`` by default)."""
    memory_mb: int | None = None
    disk_gb: float | None = None
    max_machines: int | None = None
    state: HostState = Field(default=HostState.ready, index=True)
    reason: str | None = None
    state_before: HostState | None = None
    """While unreachable: the state it returns to when its engine answers (cordoned stays
    cordoned)."""
    engine_version: str | None = None
    last_heartbeat: datetime | None = ts_field(nullable=True)
    images: dict[str, Any] = json_field({})
    """Image ref -> {state: loading|ready|failed, bytes, total, reason}: copies to this host."""
    created_at: datetime = ts_field()
    updated_at: datetime = ts_field()


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"

    id: str = Field(default_factory=lambda: new_id("t"), primary_key=True)
    role: Role
    name: str = ""
    token_hash: str = Field(index=True, unique=True)
    created_at: datetime = ts_field()


class Event(SQLModel, table=True):
    """Append-only trace of every state change, written in the change's own transaction."""

    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = ts_field(index=True)
    kind: str = Field(index=True)
    subject_id: str = Field(index=True)
    data: dict[str, Any] = json_field({})


# --- evidence (issue 5) -------------------------------------------------------------------


class ArtifactKind(StrEnum):
    log = "log"
    junit = "junit"
    screenshot = "screenshot"
    diff = "diff"
    plan = "plan"
    file = "file"


class Artifact(SQLModel, table=True):
    """One piece of evidence: a content-addressed blob linked to run, stage, machine, commit.

    ``facts`` holds what the store derived on save (JUnit counts, image size, thumbnail,
    comparison with the baseline), so pages never re-parse blobs to list them.
    """

    __tablename__ = "artifacts"

    id: str = Field(default_factory=lambda: new_id("a"), primary_key=True)
    run_id: str = Field(index=True)
    stage: str
    attempt: int = 1
    machine_id: str | None = None
    commit: str | None = None
    kind: ArtifactKind
    name: str
    sha256: str = Field(index=True)
    size: int
    content_type: str
    meta: dict[str, Any] = json_field({})
    facts: dict[str, Any] = json_field({})
    created_at: datetime = ts_field(index=True)


class Verdict(SQLModel, table=True):
    """A reviewer's one decision on a run; the unique run_id makes a second one a conflict."""

    __tablename__ = "verdicts"

    id: str = Field(default_factory=lambda: new_id("v"), primary_key=True)
    run_id: str = Field(index=True, unique=True)
    decision: str
    comment: str = ""
    reviewer_token_id: str
    reviewer_name: str = ""
    created_at: datetime = ts_field()


class Baseline(SQLModel, table=True):
    """The last approved screenshot of one page of one repo; only approvals write here."""

    __tablename__ = "baselines"

    repo: str = Field(primary_key=True)
    page: str = Field(primary_key=True)
    artifact_id: str
    run_id: str
    sha256: str
    approved_at: datetime = ts_field()


class RunPin(SQLModel, table=True):
    """A run whose evidence retention must keep."""

    __tablename__ = "run_pins"

    run_id: str = Field(primary_key=True)
    pinned_at: datetime = ts_field()


# ---------------------------------------------------------------- pools, leases, runs (issue 3)


class LeaseState(StrEnum):
    active = "active"
    released = "released"
    expired = "expired"


class RunStatus(StrEnum):
    queued = "queued"
    running = "running"
    passed = "passed"
    failed = "failed"
    cancelled = "cancelled"


FINISHED_RUN_STATUSES = (RunStatus.passed, RunStatus.failed, RunStatus.cancelled)


class StageStatus(StrEnum):
    pending = "pending"
    running = "running"
    passed = "passed"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"


class Pool(SQLModel, table=True):
    """A machine template plus how many ``ready`` machines to keep warm."""

    __tablename__ = "pools"

    name: str = Field(primary_key=True)
    template: dict[str, Any] = json_field({})
    min_ready: int = 0
    max_machines: int = 1
    reset: str = "clean"
    """What happens to a machine when its lease ends: keep | clean | recreate."""
    reason: str | None = None
    """Why the pool cannot fill, when its last provisioning failed."""
    owner: str | None = None
    """Who answers for the pool's runs when the repo's ``[owners]`` names nobody (issue 13)."""
    prebuilt: str | None = None
    """With ``prebuild``: the snapshot the pool starts its machines from (its commit is the
    snapshot's); none until the first machine's setup was snapshotted."""
    created_at: datetime = ts_field()
    updated_at: datetime = ts_field()


class Lease(SQLModel, table=True):
    """One holder's exclusive, time-bounded right to a machine.

    Its secret (the ``X-Lease-Token`` its holder sends) is stored only as a SHA-256 hash;
    ``fence`` is the machine's fence at the grant."""

    __tablename__ = "leases"

    id: str = Field(default_factory=lambda: new_id("l"), primary_key=True)
    machine_id: str = Field(index=True)
    pool: str | None = Field(default=None, index=True)
    holder: str
    owner_token_id: str | None = None
    """The API token that took the lease; only it (or ops) may use, renew or release it."""
    fence: int
    token_hash: str | None = None
    """SHA-256 of the lease's secret (None: a lease ended at the upgrade that made secrets)."""
    claim_hash: str | None = None
    """SHA-256 of the secret of a claim on the run's remote stage made under this lease."""
    claimed_by: str | None = None
    """The API token that made that claim; only it may use the claim's secret."""
    state: LeaseState = Field(default=LeaseState.active, index=True)
    ttl_s: float
    wait_ms: float = 0.0
    requested_at: datetime = ts_field()
    acquired_at: datetime = ts_field(index=True)
    expires_at: datetime = ts_field(index=True)
    ended_at: datetime | None = ts_field(nullable=True)
    reason: str | None = None
    """Why the lease ended when nobody ended it (its machine was lost)."""


class Run(SQLModel, table=True):
    """One change going through the factory's stages on one machine."""

    __tablename__ = "runs"

    id: str = Field(default_factory=lambda: new_id("r"), primary_key=True)
    task: str
    repo: str
    ref: str = "HEAD"
    pool: str | None = None
    status: RunStatus = Field(default=RunStatus.queued, index=True)
    reason: str | None = None
    machine_id: str | None = None
    lease_id: str | None = None
    context_recreations: int = 0
    """How many times the run had to move to a fresh machine (its context was rebuilt)."""
    cancel_requested: bool = False
    created_by: str | None = None
    created_at: datetime = ts_field(index=True)
    started_at: datetime | None = ts_field(nullable=True)
    finished_at: datetime | None = ts_field(nullable=True, index=True)
    driver: str | None = None
    """The controller process driving the run (its claim); another takes over once
    ``driver_expires_at`` passes without a heartbeat."""
    driver_expires_at: datetime | None = ts_field(nullable=True)
    policy: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The repo's ``[verify]`` and ``[owners]`` (``agents.config.RepoPolicy``), read from its
    checkout when the run starts; None until then."""


class Stage(SQLModel, table=True):
    """One step of a run; ``history`` keeps one entry per attempt."""

    __tablename__ = "stages"

    id: str = Field(default_factory=lambda: new_id("s"), primary_key=True)
    run_id: str = Field(index=True)
    position: int
    name: str
    agent: str
    params: dict[str, Any] = json_field({})
    timeout_s: float = 600.0
    retries: int = 0
    status: StageStatus = StageStatus.pending
    attempts: int = 0
    summary: str | None = None
    outputs: dict[str, Any] = json_field({})
    history: list[dict[str, Any]] = json_field([])
    fork: dict[str, Any] = json_field({})
    """A forking stage's ``{"count": n, "select": ...}`` (empty: not forked)."""
    machine_id: str | None = None
    started_at: datetime | None = ts_field(nullable=True)
    finished_at: datetime | None = ts_field(nullable=True)


# ---------------------------------------------------------------- several controllers (issue 12)


class Leader(SQLModel, table=True):
    """A leader lease: the loops that must run once run in the controller that holds it."""

    __tablename__ = "leaders"

    name: str = Field(primary_key=True)
    holder: str
    """The controller process (``host:pid:random``) that leads."""
    fence: int = 0
    """Grows with each takeover: writes of an older leader can be told apart."""
    expires_at: datetime = ts_field()
    heartbeat_at: datetime = ts_field()


class InstallMeta(SQLModel, table=True):
    """Facts of the install that every controller on this database shares (its id)."""

    __tablename__ = "install"

    key: str = Field(primary_key=True)
    value: str


# ---------------------------------------------------------------- flow learning (issue 13)


class FailureSignature(SQLModel, table=True):
    """One failure seen in a repo's stage, by its signature (``evidence.signatures``).

    ``fixed_by`` is the first later run of the repo that passed the stage after the failure
    was last seen (``fixed_at``); the signature is open again when it recurs after that."""

    __tablename__ = "signatures"
    __table_args__ = (
        UniqueConstraint("signature", "repo", "stage", name="uq_signatures_repo_stage"),
    )

    id: int | None = Field(default=None, primary_key=True)
    signature: str = Field(index=True)
    kind: str = Field(index=True)
    repo: str = Field(index=True)
    stage: str
    count: int = 0
    first_seen: datetime = ts_field()
    last_seen: datetime = ts_field(index=True)
    sample: str = ""
    normalized: str = ""
    fixed_by: str | None = None
    fixed_at: datetime | None = ts_field(nullable=True)
    fix_excerpt: str | None = None
    """The start of the fixing run's diff, when it stored one."""

    @property
    def open(self) -> bool:
        return self.fixed_at is None or self.last_seen > self.fixed_at


class SignatureHit(SQLModel, table=True):
    """One failed stage attempt carrying a signature."""

    __tablename__ = "signature_hits"

    id: int | None = Field(default=None, primary_key=True)
    signature: str = Field(index=True)
    kind: str
    repo: str = Field(index=True)
    run_id: str = Field(index=True)
    stage: str
    attempt: int
    machine_id: str | None = Field(default=None, index=True)
    at: datetime = ts_field(index=True)


# ---------------------------------------------------------------- flaky tests (issue 13)


class CaseResult(SQLModel, table=True):
    """One test case's result in one saved JUnit report: the history flakiness is read from.

    ``test`` is the case's id, ``classname::name`` as the JUnit gives them. ``commit`` is the
    checkout's commit when the tester said so (else the machine's); ``clean`` whether the
    checkout had no change against it (None: nobody said); ``retry`` whether the result came
    from the tester's rerun of failed tests (or a rerun inside the report itself)."""

    __tablename__ = "test_results"
    __table_args__ = (
        Index("ix_test_results_repo_test", "repo", "test"),
        Index("ix_test_results_repo_commit", "repo", "commit"),
    )

    id: int | None = Field(default=None, primary_key=True)
    repo: str
    test: str
    status: str
    """passed | failed | error | skipped"""
    run_id: str = Field(index=True)
    stage: str
    attempt: int = 1
    commit: str | None = None
    clean: bool | None = None
    retry: bool = False
    artifact_id: str | None = None
    at: datetime = ts_field()


class CaseStats(SQLModel, table=True):
    """What the history says of one test of one repo, kept up to date at each ingest so that
    reading a repo's tests never scans the history."""

    __tablename__ = "test_stats"

    repo: str = Field(primary_key=True)
    test: str = Field(primary_key=True)
    runs: int = 0
    """Results seen (skipped ones included)."""
    passes: int = 0
    failures: int = 0
    """Failed or errored."""
    skipped: int = 0
    clean_passes: int = 0
    """Passes on a clean tree: the evidence the score is made of."""
    clean_failures: int = 0
    retry_passes: int = 0
    """Passes on the tester's rerun of a failed test."""
    same_tree: bool = False
    """It both passed and failed on one clean tree (same commit, no change)."""
    fail_streak: int = 0
    """Failures since its last pass."""
    last_status: str = "passed"
    last_commit: str | None = None
    last_run_id: str | None = None
    first_seen: datetime = ts_field()
    last_seen: datetime = ts_field(index=True)


# ---------------------------------------------------------------- owners and webhooks (issue 13)


OWNER_ITEM_KINDS = (
    "stage_failed",
    "verdict_waiting",
    "signature_new",
    "signature_recurring",
    "machine_quarantined",
)
"""What lands in an owner's queue (and what a webhook may ask to be told of)."""


class OwnerItemState(StrEnum):
    open = "open"
    done = "done"


class OwnerItem(SQLModel, table=True):
    """Something an owner must look at: a failed stage, a run waiting for its verdict, a
    failure signature, a quarantined machine. One open item per (owner, kind, subject):
    a recurrence counts on it."""

    __tablename__ = "owner_items"

    id: str = Field(default_factory=lambda: new_id("q"), primary_key=True)
    owner: str = Field(index=True)
    kind: str = Field(index=True)
    subject: str
    run_id: str | None = Field(default=None, index=True)
    stage: str | None = None
    state: OwnerItemState = Field(default=OwnerItemState.open, index=True)
    count: int = 1
    data: dict[str, Any] = json_field({})
    created_at: datetime = ts_field(index=True)
    updated_at: datetime = ts_field()
    done_at: datetime | None = ts_field(nullable=True)


class Webhook(SQLModel, table=True):
    """Where owners are told: a URL, the item kinds it wants, and the secret that signs."""

    __tablename__ = "webhooks"

    name: str = Field(primary_key=True)
    url: str
    events: list[str] = json_field([])
    owners: list[str] = json_field([])
    """Only items of these owners; empty: every owner."""
    secret: str
    """Kept to sign deliveries (HMAC-SHA256); never shown back."""
    created_at: datetime = ts_field()
    updated_at: datetime = ts_field()


class DeliveryState(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class WebhookDelivery(SQLModel, table=True):
    """One JSON body for one webhook, sent by the webhook loop (never by a request or a run
    driver), retried with backoff up to a bound."""

    __tablename__ = "webhook_deliveries"

    id: str = Field(default_factory=lambda: new_id("d"), primary_key=True)
    webhook: str = Field(index=True)
    event: str
    body: str
    state: DeliveryState = Field(default=DeliveryState.pending, index=True)
    attempts: int = 0
    next_at: datetime = ts_field(index=True)
    last_error: str | None = None
    response_code: int | None = None
    created_at: datetime = ts_field()
    finished_at: datetime | None = ts_field(nullable=True)
