"""Failure signatures and their fixes, on a real SQLite database: which pass closes which
open signature (the statement every passed attempt runs, ``store.learning``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

from sqlalchemy.engine import Engine
from sqlmodel import select

from controller.services import learning
from controller.services.runtime import Controller
from controller.settings import Settings
from controller.store.db import unit_of_work
from controller.store.models import FailureSignature
from evidence.signatures import AttemptFacts
from tests.unit.evidence_db import engine, make_run

__all__ = ["engine"]

REPO = "/repos/app"
FAILED = AttemptFacts(stage="test", summary="tests failed", log="AssertionError: 1 != 2\n")


def ctl(engine: Engine, tmp_path: Path) -> Controller:
    settings = Settings(data_dir=tmp_path, quarantine_after=0)
    return cast(Controller, SimpleNamespace(reader=engine, db=engine, settings=settings))


def attempt(ctl: Controller, run_id: str, *, passed: bool) -> learning.Learned:
    return learning.observe_attempt(
        ctl=ctl, run_id=run_id, stage="test", attempt=1, machine_id="m", passed=passed,
        facts=None if passed else FAILED, repo=REPO,
    )  # fmt: skip


def new_run(engine: Engine) -> str:
    with unit_of_work(engine) as tx:
        return make_run(tx, repo=REPO, stages=("test",)).id


def the_signature(engine: Engine) -> FailureSignature:
    with unit_of_work(engine) as tx:
        (row,) = tx.exec(select(FailureSignature)).all()
        return row


def test_a_pass_in_another_run_fixes_an_open_signature_and_a_recurrence_reopens_it(
    engine: Engine, tmp_path: Path
) -> None:
    factory = ctl(engine, tmp_path)
    first, second, third = new_run(engine), new_run(engine), new_run(engine)

    failed = attempt(factory, first, passed=False)
    assert failed.signature is not None
    assert attempt(factory, first, passed=True).fixed == []  # its own retry: no fix
    assert the_signature(engine).open

    assert attempt(factory, second, passed=True).fixed == [failed.signature.signature]
    fixed = the_signature(engine)
    assert (fixed.fixed_by, fixed.open) == (second, False)
    assert attempt(factory, third, passed=True).fixed == []  # closed: nothing more to fix

    attempt(factory, third, passed=False)  # it recurs: open again, fixed by the next pass
    assert the_signature(engine).open
    assert attempt(factory, first, passed=True).fixed == []  # a run that hit it fixes nothing
    fourth = new_run(engine)
    assert attempt(factory, fourth, passed=True).fixed == [failed.signature.signature]
    assert the_signature(engine).fixed_by == fourth


def test_lessons_list_open_failures_and_fixes(engine: Engine, tmp_path: Path) -> None:
    factory = ctl(engine, tmp_path)
    first, second = new_run(engine), new_run(engine)
    attempt(factory, first, passed=False)
    doc = learning.lessons_for(ctl=factory, repo=REPO, known=[])
    assert doc is not None
    assert [f["count"] for f in doc["open_failures"]] == [1]
    assert doc["fixes"] == []
    attempt(factory, second, passed=True)
    doc = learning.lessons_for(ctl=factory, repo=REPO, known=[])
    assert doc is not None
    assert doc["open_failures"] == []
    assert [f["fixed_by"] for f in doc["fixes"]] == [second]
