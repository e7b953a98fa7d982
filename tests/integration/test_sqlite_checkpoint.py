"""Checkpoints on a real SQLite file: a long write-ahead log is started over, a short one is
copied back without waiting for anyone."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from controller.store.db import AUTOCHECKPOINT_PAGES, checkpoint, make_engine
from controller.store.rawsql import Sql, transaction

INSERT = Sql("INSERT INTO blobs (data) VALUES (:data)")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Engine, Path]]:
    path = tmp_path / "db.sqlite"
    engine = make_engine(f"sqlite:///{path}", checkpoint_loop=True)
    with transaction(engine) as tx:
        tx.run(Sql("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)"))
    yield engine, path
    engine.dispose()


def write_pages(engine: Engine, n: int) -> None:
    with transaction(engine) as tx:
        tx.run_many(INSERT, [{"data": os.urandom(3000)} for _ in range(n)])


def frames_in_log(engine: Engine) -> int:
    raw = engine.raw_connection()
    try:
        return int(raw.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    finally:
        raw.close()


def reading(path: Path) -> sqlite3.Connection:
    """A reader in the middle of a read transaction on the log's frames."""
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM blobs").fetchone()
    return reader


LONG = 300
"""Frames that count as a long log in these tests (the controller's is longer)."""


def checkpoint_in_thread(engine: Engine) -> threading.Event:
    done = threading.Event()
    work = lambda: (checkpoint(engine, restart_frames=LONG), done.set())  # noqa: E731
    threading.Thread(target=work, daemon=True).start()
    return done


def test_a_long_log_is_started_over_once_its_readers_are_done(db: tuple[Engine, Path]) -> None:
    engine, path = db
    write_pages(engine, LONG + 50)
    reader = reading(path)
    done = checkpoint_in_thread(engine)
    assert not done.wait(0.5), "a RESTART checkpoint waits for the readers of the log"
    reader.execute("COMMIT")
    assert done.wait(10)
    write_pages(engine, 1)
    assert frames_in_log(engine) < 10  # the next writer started the log over


def test_a_short_log_is_copied_back_without_waiting(db: tuple[Engine, Path]) -> None:
    engine, path = db
    write_pages(engine, 10)
    reader = reading(path)
    try:
        assert checkpoint_in_thread(engine).wait(5)
    finally:
        reader.close()


def test_commits_checkpoint_themselves_only_without_the_loop(tmp_path: Path) -> None:
    for loop, pages in ((True, 0), (False, AUTOCHECKPOINT_PAGES)):
        engine = make_engine(f"sqlite:///{tmp_path}/{loop}.sqlite", checkpoint_loop=loop)
        raw = engine.raw_connection()
        try:
            assert raw.cursor().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == pages
        finally:
            raw.close()
            engine.dispose()
