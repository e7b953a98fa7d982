"""Tables. The database is the source of truth for intent; the engine for what exists."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, DateTime, TypeDecorator
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


ALIVE_STATES = (
    MachineState.provisioning,
    MachineState.ready,
    MachineState.leased,
    MachineState.stopped,
)


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
    fence: int = 0
    """Fencing counter: the newest lease token granted on this machine."""
    created_at: datetime = ts_field()
    updated_at: datetime = ts_field()
    ready_at: datetime | None = ts_field(nullable=True)

    @property
    def workdir(self) -> str:
        return f"/workspace/{self.repo_name}" if self.repo_name else "/workspace"


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
