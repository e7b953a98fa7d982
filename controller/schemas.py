"""Request and response bodies of the API (tables live in ``models``)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Generic, Literal, TypeVar

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
