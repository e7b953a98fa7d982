"""Configuration from the environment: every knob is a ``SHOPFLOOR_*`` variable."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "shopfloor"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHOPFLOOR_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    """Where the database, keys, mirrors and evidence live."""
    database_url: str | None = None
    """SQLAlchemy URL; default is SQLite in the data dir. ``postgresql+psycopg://`` selects PG."""
    repo_roots: str = ""
    """Colon-separated folders that local repo paths must lie under. Empty: only ops may
    name a local path (agents use URLs or their pools' repos). Never allowed, set or not:
    a path in the engine's data root or in the controller's data dir."""
    install_id: str | None = None
    """Label value that marks containers as ours; default is read from the data dir."""
    docker_host: str | None = None
    """Engine address (``unix://``, ``ssh://``); default: the environment's DOCKER_HOST."""
    runner_image: str | None = None
    """Image machines use when a request names none; default is the built runner image."""

    extra_labels: str = ""
    """``key=value,key=value`` added to every container and volume (tests tag theirs)."""

    reconcile_interval_s: float = 5.0
    orphan_grace_s: float = 60.0
    pids_limit: int = 512

    # per-machine disk (issue 12)
    disk_limits: bool = True
    """Give each machine fixed-size disks (ext4 in sparse files under ``data_dir/disks``,
    loop-mounted). Needs root and an engine on this host; without them machines run
    unlimited and the controller says so in its log."""
    workspace_disk_bytes: int = 10 * 1024**3
    """Size of a machine's ``/workspace``; a write past it fails with ENOSPC. 0: no limit."""
    scratch_disk_bytes: int = 2 * 1024**3
    """One disk for everything else the machine's user can write (``/tmp``, ``/var/tmp``,
    ``$HOME``); ``/dev/shm`` and ``/run/lock`` are sized tmpfs. 0: no limit."""
    shm_bytes: int = 64 * 1024**2
    """Size of ``/dev/shm`` (tmpfs, counted in the machine's memory)."""
    disk_pool_bytes: int = 1024**4
    """Size of the XFS filesystem (``reflink=1``, in a sparse file ``data_dir/disks.xfs``)
    the disks live in, so that snapshots and forks share blocks instead of copying them.
    Sparse: it takes on the host what the disks hold. 0: disks lie on the data dir's own
    filesystem (snapshots copy whole images unless it shares blocks itself)."""
    disk_near_full: float = 0.9
    """Share of the workspace disk past which reconcile writes a ``machine.disk_near_full`` event."""
    exec_output_cap: int = 1024 * 1024
    provision_timeout_s: float = 600.0

    # snapshots, pause and fork (issue 15)
    fork_max: int = 8
    """Most machines one fork call may start."""
    snapshot_max_age_s: float = 7 * 86400.0
    """Unpinned snapshots no machine or pool uses are deleted past this age (retention loop)."""
    snapshot_max_bytes: int = 50 * 1024**3
    """Unpinned, unused snapshots are deleted, oldest first, while all snapshots together
    hold more than this."""
    snapshots_per_token: int = 20
    """Most snapshots one agent's API token may hold (its forks' snapshots too); past it,
    429 until it deletes some (``DELETE /snapshots/{id}``). Ops are not counted."""
    snapshot_bytes_per_token: int = 20 * 1024**3
    """Most bytes one agent's snapshots may hold together; past it, 429 until it deletes
    some (so that retention does not free others' snapshots for one agent's)."""
    forks_per_token: int = 8
    """Most live forks one agent's API token may hold (each a machine leased to it); past
    it, 429 until it releases some."""

    # pools, leases, runs (issue 3)
    pool_interval_s: float = 2.0
    """How often the pool loop tops pools up to ``min_ready``."""
    lease_reap_interval_s: float = 1.0
    """How often expired leases are reaped; a dead holder's machine returns within TTL + this."""
    max_lease_ttl_s: float = 86400.0
    max_lease_wait_s: float = 600.0
    run_poll_interval_s: float = 0.5
    """How often the run driver looks for queued runs and cancellations."""
    run_lease_ttl_s: float = 60.0
    """TTL of the lease a run holds; the driver renews it while the run lives."""
    run_machine_wait_s: float = 600.0
    """How long a run waits for a machine from its pool before it fails."""
    stage_kill_grace_s: float = 2.0
    leader_ttl_s: float = 10.0
    """Several controllers on one database: the leader lease of the loops that must run once
    lasts this long; another controller takes over within it when the leader dies."""
    run_claim_ttl_s: float = 15.0
    """A run's driver heartbeats its claim; another controller takes the run over once the
    claim is this old."""
    pool_failure_backoff: int = 3
    """Failed provisionings in a row after which a pool stops trying until its template changes."""

    # flow learning (issue 13)
    learning: bool = True
    """Give failed stage attempts signatures, link fixes, bench bad machines, write lessons,
    hand the tester the known flaky tests (rerun, quarantine). Off, runs behave as if no
    learning existed; only the JUnit history (evidence) is still kept."""
    quarantine_after: int = 3
    """Infra-class failures of one machine's stages within ``quarantine_window_s`` (while the
    same stages passed on other machines) that quarantine it. 0: never."""
    quarantine_window_s: float = 3600.0
    lessons_limit: int = 5
    """Open signatures and fixes listed in a run's lessons."""

    # evidence (issue 5)
    artifact_cap_bytes: int = 50 * 1024 * 1024
    """Largest artifact the store accepts; bigger uploads get 413."""
    junit_cap_bytes: int = 20 * 1024 * 1024
    """Largest JUnit XML that is parsed; bigger reports are refused."""
    image_max_pixels: int = 40_000_000
    """Largest screenshot (width x height) decoded for thumbnails and comparisons."""
    retention_days: float = 30.0
    """Artifacts of unpinned runs older than this are deleted; 0 keeps them forever."""
    retention_max_bytes: int = 20 * 1024 * 1024 * 1024
    """Total blob size above which the oldest unpinned runs lose their evidence; 0: no limit."""
    retention_interval_s: float = 3600.0

    # ssh transport: sessions, files, ports (issue 4)
    ssh_connect_timeout_s: float = 30.0
    """How long opening the SSH connection into a machine (through the engine) may take."""
    session_output_cap: int = 1024 * 1024
    """Bytes of output a session command keeps (head and tail); the rest is counted, dropped."""
    file_cap_bytes: int = 64 * 1024 * 1024
    """Largest file the files API moves in or out of a machine; bigger gets 413."""

    # limits on what one agent may hold (issue 12; docs/SECURITY.md lists them all)
    sessions_per_machine: int = 16
    """Shell sessions open at once in one machine; one more is 429 until one is closed."""
    forwards_per_lease: int = 16
    """Ports forwarded at once under one lease (or, for ops, one fence of an unleased
    machine); one more is 429 until one is closed (or the lease ends)."""
    files_in_flight: int = 8
    """File reads and writes (the files API) in progress at once on one machine; one more
    is 429 until one ends."""
    body_limit_bytes: int = 1024 * 1024
    """Largest request body on every route but file uploads (``file_cap_bytes``) and
    artifact uploads (``artifact_cap_bytes``); bigger is 413, refused as soon as it is known."""
    token_rate_per_s: float = 200.0
    """Requests per second one API token may make (a token bucket per controller process);
    past it, 429 with Retry-After. 0: no limit."""
    token_rate_burst: int = 400
    """How many requests a token may make at once before its rate applies."""

    # owners and webhooks (issue 13)
    webhook_interval_s: float = 1.0
    """How often the webhook loop sends the deliveries that are due."""
    webhook_timeout_s: float = 5.0
    """One delivery's whole budget (connect, send, answer); past it, the attempt failed."""
    webhook_max_attempts: int = 6
    """Attempts per delivery before it is recorded as failed for good."""
    webhook_backoff_s: float = 2.0
    """Wait after the first failed attempt; doubled after each further one."""
    webhook_batch: int = 20
    """Deliveries sent per tick of the loop (oldest due first)."""

    # a fleet across hosts (issue 14)
    placement: Literal["spread", "pack"] = "spread"
    """Among the hosts that can take a new machine: the least loaded (spread) or the most
    loaded that still has room (pack)."""
    host_heartbeat_interval_s: float = 5.0
    """How often every host's engine is pinged (heartbeat, version, state)."""
    host_timeout_s: float = 30.0
    """A host whose engine has not answered for this long is ``unreachable``: its machines
    are lost and no new machine goes there."""
    host_connect_timeout_s: float = 5.0
    """How long registering a host may wait for its engine to answer."""

    opentelemetry: bool = False
    """FastAPI's OpenTelemetry spans, metrics and logs for every request, for a collector
    you configure (OTEL_* variables). Off by default: /metrics serves Prometheus without
    them, and their per-request checks cost ~3% of a lease's time on these hosts."""

    otel_exporter_otlp_endpoint: str = Field(
        default="",
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "otel_exporter_otlp_endpoint"),
    )
    """The standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (no ``SHOPFLOOR_`` prefix): each run's
    trace goes over OTLP/HTTP to ``<endpoint>/v1/traces`` (``services/tracing.py``). Unset:
    tracing is off (no exporter, no SDK spans)."""

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'shopfloor.db'}"

    @property
    def extra_label_map(self) -> dict[str, str]:
        pairs = (item.partition("=") for item in self.extra_labels.split(",") if item.strip())
        return {key.strip(): value.strip() for key, _, value in pairs}

    @property
    def repo_root_paths(self) -> list[Path]:
        return [Path(p).resolve() for p in self.repo_roots.split(":") if p.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
