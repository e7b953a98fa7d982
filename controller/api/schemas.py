"""Request and response bodies of the API (tables live in ``models``)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

T = TypeVar("T")
_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ListOf(BaseModel, Generic[T]):
    data: list[T]
    count: int


class MachineTemplate(BaseModel):
    """How to make a machine; pools keep one of these too."""

    model_config = ConfigDict(extra="forbid")

    repo: str | None = Field(default=None, description="http(s)/ssh/git URL or absolute local path")
    ref: str | None = Field(default=None, description="branch, tag or commit; default: repo HEAD")
    image: str | None = Field(default=None, description="default: the runner image")
    cpus: float = Field(default=1.0, gt=0, le=16)
    memory_mb: int = Field(default=1024, ge=64, le=65536, description="at least 64")
    network: Literal["none", "egress"] = "none"
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    setup: list[str] = Field(default_factory=list, max_length=32)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"label key {key!r} must match [a-z0-9][a-z0-9._-]*")
            if len(value) > 256 or any(ord(c) < 32 for c in value):
                raise ValueError(f"label {key} must be at most 256 printable characters")
        return labels

    @field_validator("setup")
    @classmethod
    def _setup(cls, setup: list[str]) -> list[str]:
        for cmd in setup:
            if not cmd.strip() or len(cmd) > 8192 or "\x00" in cmd:
                raise ValueError("each setup command must be 1 to 8192 characters, no NUL")
        return setup


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
    lease_token: int
    created_at: datetime
    updated_at: datetime
    ready_at: datetime | None


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

_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
OUTPUTS_CAP_BYTES = 65536
"""A stage's outputs go into run.json for every later stage: small facts, not files."""


class PoolBody(BaseModel):
    """``PUT /pools/{name}``: a machine template and how many ready machines to keep."""

    model_config = ConfigDict(extra="forbid")

    template: MachineTemplate
    min_ready: int = Field(default=1, ge=0, le=200)
    max_machines: int = Field(default=4, ge=1, le=500)
    reset: Literal["keep", "clean", "recreate"] = Field(
        default="clean",
        description="after a lease: keep the workspace, clean it to the ref, or recreate",
    )


class PoolPublic(BaseModel):
    name: str
    template: MachineTemplate
    min_ready: int
    max_machines: int
    reset: str
    reason: str | None
    counts: dict[str, int]
    created_at: datetime
    updated_at: datetime


class LeaseSelector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str | None = Field(default=None, max_length=4096)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)


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


class LeasePublic(BaseModel):
    id: str
    machine_id: str
    pool: str | None
    holder: str
    token: int
    state: str
    ttl_s: float
    wait_ms: float
    acquired_at: datetime
    expires_at: datetime
    ended_at: datetime | None


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=_NAME, description="lower-case, e.g. plan, implement, test")
    agent: str = Field(min_length=1, max_length=63)
    with_: dict[str, object] = Field(default_factory=dict, alias="with")
    timeout_s: float = Field(default=600, gt=0, le=86400)
    retries: int = Field(default=0, ge=0, le=5)


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=65536)
    repo: str = Field(min_length=1, max_length=4096)
    ref: str | None = Field(default=None, max_length=255)
    pool: str | None = Field(default=None, max_length=63)
    stages: list[StageSpec] = Field(min_length=1, max_length=32)

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageSpec]) -> list[StageSpec]:
        names = [s.name for s in stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
        return stages


class StageReportBody(BaseModel):
    """A remote agent's result for the attempt it claimed (see ``remote_stages``)."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1, description="the attempt named in the claim")
    status: Literal["passed", "failed"]
    summary: str = Field(min_length=1, max_length=4000)
    outputs: dict[str, object] = Field(
        default_factory=dict, description="small JSON facts for run.json and the next stages"
    )

    @field_validator("outputs")
    @classmethod
    def _small(cls, outputs: dict[str, object]) -> dict[str, object]:
        size = len(json.dumps(outputs))
        if size > OUTPUTS_CAP_BYTES:
            raise ValueError(f"outputs take {size} bytes as JSON; at most {OUTPUTS_CAP_BYTES}")
        return outputs


class StageClaim(BaseModel):
    """What a remote agent needs to do a stage: its task and parameters, and the run's
    machine with the lease token that its commands, files and report must carry."""

    run_id: str
    stage: str
    attempt: int
    task: str
    repo: str
    ref: str
    params: dict[str, object]
    timeout_s: float
    machine_id: str
    lease_token: int
    workdir: str
    handoff_dir: str


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
    machine_id: str | None
    started_at: datetime | None
    finished_at: datetime | None


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
    """All required stages passed and the evidence was approved (evidence.verdicts.is_closed)."""


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
