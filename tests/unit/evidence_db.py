"""Helpers for the evidence unit tests: a migrated SQLite database in tmp and sample data."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from sqlalchemy.engine import Engine
from sqlmodel import Session

from controller.store.db import make_engine, migrate, unit_of_work
from controller.store.models import Run, RunStatus, Stage, StageStatus
from evidence.store import ArtifactStore


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def tx(engine: Engine) -> Iterator[Session]:
    with unit_of_work(engine) as tx:
        yield tx


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", cap_bytes=1024 * 1024, junit_cap_bytes=64 * 1024)


def make_run(
    tx: Session,
    *,
    repo: str = "/repos/sample-app",
    status: RunStatus = RunStatus.passed,
    stage_status: StageStatus = StageStatus.passed,
    stages: tuple[str, ...] = ("plan", "implement", "test", "review", "qa"),
    **extra: Any,
) -> Run:
    run = Run(task="change the title", repo=repo, status=status, **extra)
    tx.add(run)
    for position, name in enumerate(stages):
        tx.add(Stage(run_id=run.id, position=position, name=name, agent=name, status=stage_status))
    tx.flush()
    return run


def png(
    size: tuple[int, int] = (64, 48),
    colour: tuple[int, int, int] = (255, 255, 255),
    box: tuple[int, int, int, int] | None = None,
) -> bytes:
    image = Image.new("RGB", size, colour)
    if box is not None:
        ImageDraw.Draw(image).rectangle(box, fill=(0, 0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
