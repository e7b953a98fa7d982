"""The artifact store: content addressing, atomic writes, validation of hostile input."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from sqlmodel import Session, select

from controller.errors import InvalidInput, NotFound, TooLarge
from controller.store.models import Artifact, Event
from evidence.store import ArtifactStore, save_artifact, validate_name
from tests.unit.evidence_db import engine, make_run, png, store, tx

__all__ = ["engine", "tx", "store"]


def save(tx: Session, store: ArtifactStore, run_id: str, **overrides: Any) -> Artifact:
    values: dict[str, Any] = {
        "tx": tx,
        "store": store,
        "run_id": run_id,
        "stage": "test",
        "attempt": 1,
        "machine_id": "m-1",
        "commit": "a" * 40,
        "kind": "log",
        "name": "pytest.log",
        "data": b"collected 3 items\n",
    }
    values.update(overrides)
    return save_artifact(**values)


def test_blob_is_stored_by_hash_once_and_atomically(store: ArtifactStore) -> None:
    sha = store.put(b"hello")
    assert sha == hashlib.sha256(b"hello").hexdigest()
    path = store.blobs / sha[:2] / sha[2:]
    assert path.read_bytes() == b"hello"
    assert store.put(b"hello") == sha
    assert [p.name for p in path.parent.iterdir()] == [sha[2:]]  # no temp files left
    assert store.get(sha) == b"hello"


def test_save_links_record_to_run_stage_machine_commit(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx)
    first = save(tx, store, run.id)
    second = save(tx, store, run.id, name="again.log")
    assert first.sha256 == second.sha256
    assert (first.run_id, first.stage, first.attempt, first.machine_id) == (
        run.id,
        "test",
        1,
        "m-1",
    )
    assert first.commit == "a" * 40
    assert first.content_type.startswith("text/plain")
    assert first.facts == {"lines": 1}
    assert len(list(store.iter_blobs())) == 1
    kinds = [e.kind for e in tx.exec(select(Event).where(Event.subject_id == first.id))]
    assert kinds == ["artifact.saved"]


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "logs/../../secret",
        "%2e%2e/secret",
        "%2E%2E%2Fsecret",
        "..%5csecret",
        "..\\windows",
        "%252e%252e/twice-encoded",
        "/etc/passwd",
        "\\\\server\\share",
        "C:\\boot.ini",
        "nul\x00byte.txt",
        "bell\x07.txt",
        "line\nbreak.txt",
        "",
        "x" * 300,
    ],
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput):
        validate_name(name)


@pytest.mark.parametrize("name", ["pytest.log", "pages/about.png", "report 1.xml", "a..b.txt"])
def test_ordinary_names_pass(name: str) -> None:
    assert validate_name(name) == name


def test_bad_names_leave_nothing_behind(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx)
    with pytest.raises(InvalidInput, match="relative"):
        save(tx, store, run.id, name="/abs/path.log")
    assert list(store.iter_blobs()) == []
    assert tx.exec(select(Artifact)).all() == []


def test_over_the_cap_is_too_large(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx)
    with pytest.raises(TooLarge, match="SHOPFLOOR_ARTIFACT_CAP_BYTES"):
        save(tx, store, run.id, data=b"x" * (store.cap_bytes + 1))
    assert list(store.iter_blobs()) == []


def test_unknown_kind_and_run_are_refused(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx)
    with pytest.raises(InvalidInput, match="use one of"):
        save(tx, store, run.id, kind="video")
    with pytest.raises(NotFound):
        save(tx, store, "r-missing")
    with pytest.raises(InvalidInput, match="media type"):
        save(tx, store, run.id, content_type="text/html\r\nX-Evil: 1")


def test_screenshot_must_really_be_png(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx)
    with pytest.raises(InvalidInput, match="PNG"):
        save(tx, store, run.id, kind="screenshot", name="home.png", data=b"<svg></svg>")
    truncated = png()[:40]
    with pytest.raises(InvalidInput, match="not a valid PNG"):
        save(tx, store, run.id, kind="screenshot", name="home.png", data=truncated)
    shot = save(tx, store, run.id, kind="screenshot", name="home.png", data=png())
    assert shot.content_type == "image/png"
    assert shot.facts["width"] == 64
    assert shot.facts["page"] == "home"
    assert store.exists(shot.facts["thumb_sha256"])
    assert shot.facts["comparison"] is None  # no approved run yet


def test_screenshot_pixel_bomb_is_refused(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx)
    small = ArtifactStore(store.root, image_max_pixels=1000)
    with pytest.raises(InvalidInput, match="at most 1000 pixels"):
        save(tx, small, run.id, kind="screenshot", name="big.png", data=png((100, 100)))


def test_junit_counts_are_derived_on_save(tx: Session, store: ArtifactStore) -> None:
    run = make_run(tx)
    report = (
        b'<testsuite name="t"><testcase classname="c" name="ok"/>'
        b'<testcase classname="c" name="bad"><failure message="no">trace</failure></testcase>'
        b"</testsuite>"
    )
    artifact = save(tx, store, run.id, kind="junit", name="junit.xml", data=report)
    assert artifact.facts["junit"]["failed"] == 1
    assert artifact.facts["junit"]["passed"] == 1
    with pytest.raises(InvalidInput):
        save(tx, store, run.id, kind="junit", name="junit.xml", data=b"<testsuite")
