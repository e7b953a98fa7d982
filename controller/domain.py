"""Values the services take and return: what a machine, a lease, a run and a stage report
are, apart from how the API spells its bodies (``api/schemas.py``)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
ResetPolicy = Literal["keep", "clean", "recreate"]
"""What a machine gets between two leases: its workspace kept, cleaned to the ref, or made anew."""
OUTPUTS_CAP_BYTES = 65536
"""A stage's outputs go into run.json for every later stage: small facts, not files."""


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
    snapshot: str | None = Field(
        default=None,
        max_length=64,
        description="start from this snapshot (GET /snapshots): its image, workspace, repo "
        "and commit; repo, ref, image and setup must then be left out",
    )
    host_labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="labels a host must carry for the machine to be placed on it",
    )
    prebuild: bool = Field(
        default=False,
        description="pools only: run clone + setup once per commit of the ref, snapshot that "
        "machine and start every later machine from the snapshot",
    )

    @field_validator("labels", "host_labels")
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


class HostCapacity(BaseModel):
    """What the fleet may reserve on a host; a field left out is not limited."""

    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(default=None, gt=0, le=4096)
    memory_mb: int | None = Field(default=None, ge=64, le=64 * 1024 * 1024)
    disk_gb: float | None = Field(default=None, gt=0, le=1024 * 1024)
    machines: int | None = Field(default=None, ge=0, le=100000)


class HostTLS(BaseModel):
    """Client TLS files (paths on the controller's host) for a ``tcp://`` engine."""

    model_config = ConfigDict(extra="forbid")

    ca: str = Field(min_length=1, max_length=4096)
    cert: str = Field(min_length=1, max_length=4096)
    key: str = Field(min_length=1, max_length=4096)


class HostSpec(BaseModel):
    """A host of the fleet: where its engine answers, its labels, its capacity."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="unix:///path, ssh://user@host[:port] or tcp://host:2376 (with tls)",
    )
    tls: HostTLS | None = None
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)
    capacity: HostCapacity = Field(default_factory=HostCapacity)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        return MachineTemplate._labels(labels)


class LeaseSelector(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str | None = Field(default=None, max_length=4096)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)


class LeasePublic(BaseModel):
    """A lease as anyone may see it: never its secret."""

    id: str
    machine_id: str
    pool: str | None
    holder: str
    fence: int = Field(description="the machine's fence at the grant; grows with each lease")
    state: str
    ttl_s: float
    wait_ms: float
    acquired_at: datetime
    expires_at: datetime
    ended_at: datetime | None


class LeaseGranted(LeasePublic):
    """A grant, as its caller alone sees it, once: with the lease's secret."""

    token: str = Field(
        description="the lease's secret: send it in X-Lease-Token; shown only in this answer"
    )


class SelectCommand(BaseModel):
    """A fork wins when this command, run in its checkout after its agent passed, exits 0."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1, max_length=8192)
    timeout_s: float = Field(default=600, gt=0, le=86400)


ForkSelect = Literal["tests", "first"] | SelectCommand
"""How a forking stage picks its winner: ``tests`` (the default) the next stage's tester
passes on the fork; ``first`` the first fork whose agent passes; or a command's exit code."""


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=_NAME, description="lower-case, e.g. plan, implement, test")
    agent: str = Field(min_length=1, max_length=63)
    with_: dict[str, object] = Field(default_factory=dict, alias="with")
    timeout_s: float = Field(default=600, gt=0, le=86400)
    retries: int = Field(default=0, ge=0, le=5)
    fork: int | None = Field(
        default=None,
        ge=2,
        le=8,
        description="try the stage this many ways at once, each on a fork of the run's machine",
    )
    select: ForkSelect | None = Field(
        default=None,
        description='with fork: "tests" (default: the next stage\'s tester passes on the fork), '
        '"first" (the first fork to pass) or {"command": "..."} (its exit code decides)',
    )


class RunSpec(BaseModel):
    """A task on a repo, carried through named stages on one machine."""

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
        for position, stage in enumerate(stages):
            _check_fork(stages, position, stage)
        return stages


def _check_fork(stages: list[StageSpec], position: int, stage: StageSpec) -> None:
    """A forking stage forks the machine the run already worked on, and needs a rule it can
    apply: refused here, before the run is queued, rather than failing mid-run."""
    if stage.fork is None:
        if stage.select is not None:
            raise ValueError(f"stage {stage.name!r}: select needs fork (2 to 8)")
        return
    if position == 0:
        raise ValueError(
            f"stage {stage.name!r} cannot fork: it is the run's first stage, and the run has "
            "no machine yet (it is leased when the run starts); fork a later stage"
        )
    if stage.agent == "remote":
        raise ValueError(
            f"stage {stage.name!r} cannot fork: a remote agent claims one machine per stage"
        )
    if stage.select in (None, "tests"):
        following = stages[position + 1] if position + 1 < len(stages) else None
        if following is None or following.agent != "tester":
            raise ValueError(
                f'stage {stage.name!r} forks with select "tests" (the default), which runs '
                "the next stage's tester on each fork, but the next stage is "
                + (f"{following.name!r} (agent {following.agent})" if following else "missing")
                + '; add a tester stage after it, or say select "first" or {"command": "..."}'
            )


class StageReport(BaseModel):
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
    machine with the claim's secret, which its commands, files and report must carry in
    X-Lease-Token. The secret works only for the API token that claimed, only while the
    run holds this lease, and only until the stage is claimed again."""

    run_id: str
    stage: str
    attempt: int
    task: str
    repo: str
    ref: str
    params: dict[str, object]
    timeout_s: float
    machine_id: str
    lease_token: str
    fence: int
    workdir: str
    handoff_dir: str


TestState = Literal["healthy", "flaky", "broken", "quarantined"]


class CaseHealth(BaseModel):
    """What the factory knows of one test of one repo (``services/flaky.py``)."""

    repo: str
    test: str
    """``classname::name`` as the JUnit gives them."""
    state: TestState
    score: float
    """Posterior mean of its failure probability on an unchanged tree (Beta(1,1) prior)."""
    score_upper: float
    """The 95 % upper credible bound of that probability."""
    runs: int
    passes: int
    failures: int
    skipped: int
    clean_passes: int
    clean_failures: int
    retry_passes: int
    """Times it passed on the tester's rerun after failing."""
    same_tree: bool
    """It passed and failed on one clean tree."""
    fail_streak: int
    last_status: str
    last_commit: str | None
    last_run_id: str | None
    first_seen: datetime
    last_seen: datetime
