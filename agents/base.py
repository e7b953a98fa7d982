"""The one small protocol every stage agent speaks.

An agent gets an :class:`Assignment` (the run, the task, a handle on the machine, the
handoff folder, its ``with`` parameters) and returns a :class:`StageResult`. Agents never
talk to the engine or the database: the run driver gives them a :class:`MachineHandle`
and stores what they return.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

HANDOFF_DIR = "/workspace/.shopfloor"
LESSONS_FILE = "lessons.md"
"""In the handoff folder: what earlier runs of the repo taught (the driver writes it, with
``lessons.json``, when a run starts)."""
ArtifactKind = Literal["log", "junit", "screenshot", "diff", "plan", "file"]
StageStatus = Literal["passed", "failed"]


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: float
    truncated: bool = False
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class MachineHandle(Protocol):
    """What an agent may do to the machine it runs on."""

    machine_id: str
    workdir: str
    """The checkout, e.g. /workspace/sample-app."""

    def run(
        self,
        cmd: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 600,
    ) -> CommandResult: ...

    def read_file(self, path: str) -> bytes: ...

    def write_file(self, path: str, data: bytes) -> None: ...

    def write_files(self, files: Mapping[str, bytes]) -> None:
        """Several files (path -> bytes) in one go: one SFTP session instead of one each."""
        ...

    def forward(self, port: int) -> str:
        """A URL on the controller host that reaches ``port`` inside the machine."""
        ...


@dataclass(frozen=True)
class Artifact:
    kind: ArtifactKind
    name: str
    data: bytes
    content_type: str = "application/octet-stream"
    meta: dict[str, Any] = field(default_factory=dict)
    """Kind-specific facts, e.g. ``{"page": "/about"}`` for a screenshot."""


@dataclass(frozen=True)
class RemoteReport:
    """What a remote agent reported for a stage attempt (see agents/remote.py)."""

    status: StageStatus
    summary: str
    outputs: dict[str, Any]


@dataclass(frozen=True)
class KnownTests:
    """What the factory learned of the repo's tests before this stage (ids are
    ``classname::name`` as the JUnit gives them)."""

    flaky: frozenset[str] = frozenset()
    """Tests known to fail now and then: the tester reruns the failed tests once when every
    failure is one of these (or a quarantined one)."""
    quarantined: frozenset[str] = frozenset()
    """Known flaky tests whose failures do not fail the stage: the run's policy says
    ``[verify] flaky = "quarantine"`` (empty otherwise)."""


@dataclass(frozen=True)
class Assignment:
    run_id: str
    task: str
    repo: str
    ref: str
    stage: str
    attempt: int
    params: dict[str, Any]
    """The stage's ``with`` block, merged over the repo's ``.shopfloor.toml``."""
    machine: MachineHandle
    timeout_s: float
    handoff_dir: str = HANDOFF_DIR
    log: Callable[[str], None] = lambda _line: None
    """Progress lines; the driver keeps them as the stage's log."""
    remote_report: Callable[[], RemoteReport | None] = lambda: None
    """This attempt's report from a remote agent, once it came (the ``remote`` agent waits
    for it)."""
    known_tests: KnownTests = field(default_factory=KnownTests)
    """The repo's known flaky and quarantined tests (the ``tester`` uses them)."""

    @property
    def lessons_path(self) -> str:
        return f"{self.handoff_dir}/{LESSONS_FILE}"


@dataclass
class StageResult:
    status: StageStatus
    summary: str
    outputs: dict[str, Any] = field(default_factory=dict)
    """Small JSON facts for run.json and the next stages (paths, counts, exit codes)."""
    artifacts: list[Artifact] = field(default_factory=list)


class Agent(Protocol):
    name: str

    def run(self, work: Assignment) -> StageResult: ...
