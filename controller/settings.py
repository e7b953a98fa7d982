"""Configuration from the environment: every knob is a ``SHOPFLOOR_*`` variable."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
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
    """Colon-separated folders that local repo paths must lie under; empty allows any."""
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
    default_cpus: float = 1.0
    default_memory_mb: int = 1024
    min_memory_mb: int = 64
    max_memory_mb: int = 16384
    max_cpus: float = 8.0
    pids_limit: int = 512
    exec_output_cap: int = 1024 * 1024
    exec_default_timeout_s: float = 600.0
    provision_timeout_s: float = 600.0

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
