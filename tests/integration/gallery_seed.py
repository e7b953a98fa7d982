"""Runs with every kind of evidence, inserted through the services (no machine needed)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageDraw
from sqlmodel import Session

from controller.settings import Settings
from controller.store.db import make_engine, unit_of_work
from controller.store.models import ApiToken, Artifact, Run, RunStatus, Stage, StageStatus, utcnow
from evidence.store import ArtifactStore, save_artifact
from evidence.verdicts import give_verdict

REPO = "/repos/sample-app"
OTHER_REPO = "/repos/other-app"
FAILURE = "AssertionError: assert 'Old title' == 'New title'"
JUNIT = f"""<testsuites><testsuite name="pytest">
<testcase classname="test_app" name="test_index" time="0.01"/>
<testcase classname="test_app" name="test_title" time="0.02"><failure message="{FAILURE.replace("'", "&apos;")}">def test_title():
&gt;       assert title() == "New title"
E       {FAILURE.replace("'", "&apos;")}</failure></testcase>
</testsuite></testsuites>""".encode()
LOG = (
    b"\x1b[1m===== test session starts =====\x1b[0m\ncollected 2 items\n"
    b"test_app.py::test_index \x1b[32mPASSED\x1b[0m\n"
    b"test_app.py::test_title \x1b[31mFAILED\x1b[0m\n"
    b"E       AssertionError: assert 'Old title' == 'New title'\n"
    b"\xff\xfe stray bytes <b>not bold</b>\n"
)
DIFF = (
    b"--- a/app.py\n+++ b/app.py\n@@ -1,3 +1,3 @@\n def title():\n"
    b"-    return 'Old title'\n+    return 'New title'\n"
)
PLAN = b"# Plan\n\n1. Change the title in app.py\n2. Update the test\n"
COMMIT = "c0ffee" * 6 + "abcd"


def page_png(marked: bool) -> bytes:
    image = Image.new("RGB", (400, 300), (250, 250, 250))
    ImageDraw.Draw(image).text((20, 20), "Sample app", fill=(0, 0, 0))
    if marked:
        ImageDraw.Draw(image).rectangle((100, 100, 159, 139), fill=(200, 30, 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def make_run(
    tx: Session, *, repo: str, status: RunStatus, stage_status: StageStatus, task: str
) -> Run:
    done = status in (RunStatus.passed, RunStatus.failed)
    run = Run(
        task=task,
        repo=repo,
        status=status,
        machine_id="m-seeded",
        started_at=utcnow(),
        finished_at=utcnow() if done else None,
    )
    tx.add(run)
    for position, name in enumerate(("plan", "implement", "test", "review", "qa")):
        tx.add(
            Stage(
                run_id=run.id,
                position=position,
                name=name,
                agent=name,
                status=stage_status,
                attempts=1,
                started_at=utcnow(),
                finished_at=utcnow() if done else None,
                machine_id="m-seeded",
                summary=f"{name} finished",
            )
        )
    tx.flush()
    return run


def add(
    tx: Session,
    store: ArtifactStore,
    run: Run,
    stage: str,
    kind: str,
    name: str,
    data: bytes,
    **extra: Any,
) -> Artifact:
    return save_artifact(
        tx=tx,
        store=store,
        run_id=run.id,
        stage=stage,
        attempt=1,
        machine_id="m-seeded",
        commit=COMMIT,
        kind=kind,
        name=name,
        data=data,
        **extra,
    )


def seed(settings: Settings, reviewer_token_id: str) -> dict[str, str]:
    """An approved baseline run, a finished run with all evidence, and a running run."""
    engine = make_engine(settings.sqlalchemy_url)
    store = ArtifactStore.from_settings(settings)
    with unit_of_work(engine) as tx:
        reviewer = tx.get(ApiToken, reviewer_token_id)
        assert reviewer is not None
        base = make_run(
            tx,
            repo=REPO,
            status=RunStatus.passed,
            stage_status=StageStatus.passed,
            task="First version of the page",
        )
        add(
            tx,
            store,
            base,
            "qa",
            "screenshot",
            "home.png",
            page_png(False),
            meta={"page": "/"},
        )
        tx.flush()
        give_verdict(
            tx=tx,
            run_id=base.id,
            decision="approve",
            comment="baseline",
            reviewer=reviewer,
        )
    with unit_of_work(engine) as tx:
        run = make_run(
            tx,
            repo=REPO,
            status=RunStatus.passed,
            stage_status=StageStatus.passed,
            task="Change the title to New title",
        )
        add(tx, store, run, "plan", "plan", "plan.md", PLAN)
        add(tx, store, run, "implement", "diff", "change.diff", DIFF)
        add(tx, store, run, "test", "junit", "junit.xml", JUNIT)
        add(tx, store, run, "test", "log", "pytest.log", LOG)
        add(tx, store, run, "qa", "screenshot", "home.png", page_png(True), meta={"page": "/"})
        add(tx, store, run, "qa", "file", "notes.txt", b"notes")
        going = make_run(
            tx,
            repo=OTHER_REPO,
            status=RunStatus.running,
            stage_status=StageStatus.running,
            task="Still going",
        )
    engine.dispose()
    return {"base": base.id, "run": run.id, "going": going.id}
