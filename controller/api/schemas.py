"""Request and response bodies of the API (tables live in ``models``)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from controller.domain import (
    HostCapacity,
    LeaseGranted,
    LeaseSelector,
    MachineTemplate,
    ResetPolicy,
    RunSpec,
    StageReport,
)

T = TypeVar("T")
_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ListOf(BaseModel, Generic[T]):
    data: list[T]
    count: int


class MachinePublic(BaseModel):
    id: str
    state: str
    reason: str | None
    repo: str | None
    ref: str | None
    commit: str | None
    image: str
    cpus: float
    memory_mb: int
    network: str
    labels: dict[str, str]
    setup: list[str]
    pool: str | None
    workdir: str
    host: str = Field(
        default="local",
        description="the host (engine) it runs on; disk limits apply only on host local",
    )
    fence: int = Field(
        description="grows with each lease granted or ended; never a credential (a lease's "
        "token is shown only to the caller it was granted to)"
    )
    paused_from: str | None = Field(
        default=None, description="while paused: the state resume returns to"
    )
    snapshot_id: str | None = Field(default=None, description="the snapshot it started from")
    forked_from: str | None = Field(default=None, description="the machine it is a fork of")
    created_at: datetime
    updated_at: datetime
    ready_at: datetime | None
    disk_used_bytes: int | None = None
    """Bytes used on the machine's workspace disk when reconcile last looked; None: no
    limit (or not measured yet)."""
    disk_limit_bytes: int | None = None
    """Size of the workspace disk; writes past it fail with ENOSPC in the machine."""


class SnapshotBody(BaseModel):
    """``POST /machines/{id}/snapshots``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=200)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    pinned: bool = Field(default=False, description="kept by retention whatever its age (ops only)")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ValueError("name must be printable: no control characters or line breaks")
        return name

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        return MachineTemplate._labels(labels)


class ForkBody(BaseModel):
    """``POST /machines/{id}/fork``: ``count`` copies of the machine as it is now."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=1, description="how many copies (1 to SHOPFLOOR_FORK_MAX)")
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        return MachineTemplate._labels(labels)


class SnapshotPublic(BaseModel):
    id: str
    name: str
    labels: dict[str, str]
    pinned: bool
    state: str
    machine_id: str = Field(description="the machine it was taken of")
    image: str
    repo: str | None
    ref: str | None
    commit: str | None
    size_bytes: int = Field(
        description="bytes it holds: its image's own layer and its workspace copy (copies "
        "share blocks with the machines made from it where the disks allow)"
    )
    has_memory: bool = Field(description="whether it holds the running processes' memory")
    memory_reason: str | None = Field(description="why it holds no memory")
    shared_blocks: bool = Field(
        description="workspace copied copy-on-write (fast whatever its size) or whole"
    )
    took_ms: float
    paused_ms: float = Field(description="how long the machine was paused for it")
    created_at: datetime
    used_by: list[str] = Field(default_factory=list, description="live machines started from it")


class ForkAnswer(BaseModel):
    snapshot: SnapshotPublic
    machines: list[MachinePublic]
    leases: list[LeaseGranted] = Field(
        default_factory=list,
        description="an agent's forks: each leased to it (their tokens shown only here); "
        "a fork is destroyed when its lease ends",
    )


class ExecBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cmd: str = Field(min_length=1, max_length=131072, description="run by bash -c")
    cwd: str | None = Field(default=None, description="default: the checkout")
    env: dict[str, str] = Field(default_factory=dict, max_length=128)
    timeout_s: float = Field(default=600, gt=0, le=86400)


class ExecAnswer(BaseModel):
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: float
    truncated: bool
    timed_out: bool


# ---------------------------------------------------------------- pools, leases, runs (issue 3)


class RunBody(RunSpec):
    """``POST /runs``: a :class:`~controller.domain.RunSpec`."""


class StageReportBody(StageReport):
    """``POST /runs/{id}/stages/{name}/report``: a :class:`~controller.domain.StageReport`."""


class PoolBody(BaseModel):
    """``PUT /pools/{name}``: a machine template and how many ready machines to keep."""

    model_config = ConfigDict(extra="forbid")

    template: MachineTemplate
    min_ready: int = Field(default=1, ge=0, le=200)
    max_machines: int = Field(default=4, ge=1, le=500)
    reset: ResetPolicy = Field(
        default="clean",
        description="after a lease: keep the workspace, clean it to the ref, or recreate",
    )
    owner: str | None = Field(
        default=None,
        max_length=100,
        description="who answers for the pool's runs where the repo's [owners] names nobody",
    )


class PoolPublic(BaseModel):
    name: str
    template: MachineTemplate
    min_ready: int
    max_machines: int
    reset: str
    reason: str | None
    owner: str | None = None
    prebuilt: str | None = Field(
        default=None,
        description="with prebuild: the snapshot new machines start from (setup done once)",
    )
    counts: dict[str, int]
    created_at: datetime
    updated_at: datetime


class HostPublic(BaseModel):
    name: str
    url: str
    labels: dict[str, str]
    state: str = Field(description="ready | cordoned | draining | unreachable")
    reason: str | None
    capacity: HostCapacity = Field(description="a field left empty is not limited")
    used: dict[str, float] = Field(description="what its live machines reserve")
    free: dict[str, float | None] = Field(description="capacity less used; null: no limit")
    machines: dict[str, int] = Field(description="its machines by state")
    engine_version: str | None
    last_heartbeat: datetime | None
    images: dict[str, Any] = Field(
        description="images copied to it: state (loading | ready | failed), bytes sent"
    )
    disk_limits: bool = Field(description="whether machines here get disk caps (local only)")
    created_at: datetime
    updated_at: datetime


class LeaseBody(BaseModel):
    """Exactly one of ``pool``, ``machine_id`` or ``selector`` says which machines may do."""

    model_config = ConfigDict(extra="forbid")

    pool: str | None = Field(default=None, max_length=63)
    machine_id: str | None = Field(default=None, max_length=64)
    selector: LeaseSelector | None = None
    holder: str = Field(min_length=1, max_length=200, description="who holds it, for humans")
    ttl_s: float = Field(default=300, ge=1, le=86400, description="1 to 86400 seconds")
    wait_s: float = Field(default=0, ge=0, le=600, description="0 fails at once when none free")


class RenewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: float | None = Field(default=None, ge=1, le=86400)


class StagePublic(BaseModel):
    name: str
    agent: str
    status: str
    attempts: int
    retries: int
    timeout_s: float
    summary: str | None
    outputs: dict[str, object]
    history: list[dict[str, object]]
    fork: dict[str, object] = Field(
        default_factory=dict,
        description='a forking stage\'s {"count": n, "select": ...}; its history has one entry '
        "per fork, with fork, winner and machine_id",
    )
    machine_id: str | None
    started_at: datetime | None
    finished_at: datetime | None


class CriterionPublic(BaseModel):
    criterion: str
    met: bool | None
    """None: informational, or nothing to judge yet."""
    detail: str


class RunPublic(BaseModel):
    id: str
    task: str
    repo: str
    ref: str
    pool: str | None
    status: str
    reason: str | None
    machine_id: str | None
    lease_id: str | None
    context_recreations: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    stages: list[StagePublic]
    events: list[dict[str, object]] = Field(default_factory=list)
    verdict: Literal["pending", "approved", "rejected"] = "pending"
    """The reviewer's decision on the run's evidence (issue 5)."""
    closed: bool = False
    """Every criterion of the checklist is met (evidence.verdicts.is_closed)."""
    checklist: list[CriterionPublic] = Field(default_factory=list)
    """The run's verification criteria from its repo's ``[verify]`` (issue 13)."""


class EventPublic(BaseModel):
    id: int
    at: datetime
    kind: str
    subject_id: str
    data: dict[str, object]


class EventPage(BaseModel):
    data: list[EventPublic]
    count: int
    next: int
    """Pass as ``since`` to get the events after these."""


# sessions, files, ports (issue 4)


class SessionOpened(BaseModel):
    id: str
    machine_id: str


class SessionRunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cmd: str = Field(min_length=1, max_length=131072, description="run by the session's bash")
    timeout_s: float = Field(default=600, gt=0, le=86400)

    @field_validator("cmd")
    @classmethod
    def _no_nul(cls, cmd: str) -> str:
        if "\x00" in cmd:
            raise ValueError("cmd cannot contain a NUL byte")
        return cmd


class SessionRunAnswer(BaseModel):
    exit_code: int | None
    output: str
    """stdout and stderr together, in order."""
    duration_ms: float
    truncated: bool
    timed_out: bool


class FileWritten(BaseModel):
    path: str
    size: int


class PortBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: int = Field(ge=1, le=65535)


class PortForwarded(BaseModel):
    url: str
    """http://127.0.0.1:<local port> on the controller host."""
    port: int
    local_port: int
    listening: bool
    """Whether something listened on the port in the machine when the forward was made."""


# ---------------------------------------------------------------- evidence and verdicts (issue 5)


class ArtifactPublic(BaseModel):
    id: str
    run_id: str
    stage: str
    attempt: int
    machine_id: str | None
    commit: str | None
    kind: str
    name: str
    sha256: str
    size: int
    content_type: str
    meta: dict[str, Any]
    facts: dict[str, Any]
    """What the store derived: JUnit counts, image size, thumbnail, baseline comparison."""
    created_at: datetime
    url: str


class VerdictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    comment: str = Field(default="", max_length=4000, description="required for a rejection")


class VerdictPublic(BaseModel):
    run_id: str
    verdict: Literal["pending", "approved", "rejected"]
    comment: str
    reviewer: str
    created_at: datetime | None
    closed: bool
    open: list[CriterionPublic] = Field(default_factory=list)
    """Criteria of the run's checklist still unmet (issue 13)."""


class FailurePublic(BaseModel):
    """A failure signature of a repo's stage (``GET /learning/failures``)."""

    signature: str
    kind: Literal["test", "setup", "timeout", "infra", "agent"]
    repo: str
    stage: str
    count: int
    first_seen: datetime
    last_seen: datetime
    runs: list[str]
    """Runs that hit it, newest first (at most 50)."""
    sample: str
    """The failure's own text (unmasked, short) from its latest hit."""
    fixed_by: str | None
    """The later run of the repo that passed the stage after the failure was last seen."""
    fix_excerpt: str | None = None
    """The start of that run's review diff, when it stored one."""
    open: bool
    """Not fixed, or seen again since its fix."""


# ---------------------------------------------------------------- owners and webhooks (issue 13)


class OwnerItemPublic(BaseModel):
    id: str
    owner: str
    kind: str
    subject: str
    run: str | None
    stage: str | None
    since: datetime
    updated_at: datetime
    state: Literal["open", "done"]
    count: int
    """How many times it happened while the item was open."""
    data: dict[str, object]
    done_at: datetime | None


class WebhookBody(BaseModel):
    """``PUT /webhooks/{name}``: where to POST, which owner-queue events, the signing secret."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="http:// or https:// only; never redirected")
    events: list[str] = Field(
        min_length=1,
        max_length=16,
        description="'*' or item kinds: stage_failed, verdict_waiting, signature_new, "
        "signature_recurring, machine_quarantined",
    )
    secret: str = Field(
        min_length=16, max_length=256, description="signs each body; never shown back"
    )
    owners: list[str] = Field(
        default_factory=list, max_length=64, description="only these owners' items; [] all"
    )


class WebhookPublic(BaseModel):
    name: str
    url: str
    events: list[str]
    owners: list[str]
    has_secret: bool = True
    created_at: datetime
    updated_at: datetime


class DeliveryPublic(BaseModel):
    id: str
    webhook: str
    event: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    next_at: datetime
    last_error: str | None
    response_code: int | None
    created_at: datetime
    finished_at: datetime | None
    body: dict[str, object]
