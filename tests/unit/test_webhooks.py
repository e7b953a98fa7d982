"""Owners' queues and webhooks (issue 13): items land in the queue, deliveries are rows
sent by the loop, signed, retried with backoff, never following a redirect."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from controller.errors import InvalidInput
from controller.services import owners, webhooks
from controller.settings import Settings
from controller.store.db import make_engine, migrate, reader, unit_of_work
from controller.store.models import (
    DeliveryState,
    OwnerItem,
    Pool,
    Run,
    RunStatus,
    WebhookDelivery,
    utcnow,
)
from tests.hook_server import SLOW_S, HookServer, closed_port, hook_server

SECRET = "s3cret-s3cret-s3cret"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def ctl(engine: Engine, tmp_path: Path) -> Any:
    settings = Settings(
        data_dir=tmp_path,
        webhook_timeout_s=1.0,
        webhook_backoff_s=10.0,
        webhook_max_attempts=3,
    )
    return SimpleNamespace(
        db=engine, reader=reader(engine), settings=settings, stopping=threading.Event()
    )


@pytest.fixture
def server() -> Iterator[HookServer]:
    with hook_server() as found:
        yield found


def hook(ctl: Any, name: str, url: str, events: list[str] | None = None, **extra: Any) -> None:
    webhooks.put_webhook(
        ctl=ctl,
        name=name,
        url=url,
        events_=events or ["*"],
        secret=SECRET,
        owners=extra.get("owners", []),
    )


def deliveries(ctl: Any, name: str) -> list[WebhookDelivery]:
    return webhooks.deliveries(ctl=ctl, name=name)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/x",
        "gopher://example.com/",
        "javascript:alert(1)",
        "/relative/path",
        "http://",
        "http://user:pw@example.com/",
        "http://example.com/a b",
        "http://example.com:notaport/",
    ],
)
def test_hostile_urls_are_refused(ctl: Any, url: str) -> None:
    with pytest.raises(InvalidInput, match="url"):
        hook(ctl, "bad", url)


def test_events_and_secret_are_checked(ctl: Any) -> None:
    with pytest.raises(InvalidInput, match="unknown: run.exploded"):
        hook(ctl, "x", "https://example.com/", events=["run.exploded"])
    with pytest.raises(InvalidInput, match="secret"):
        webhooks.put_webhook(
            ctl=ctl, name="x", url="https://example.com/", events_=["*"], secret="short", owners=[]
        )


def test_a_failed_stage_lands_in_the_queue_and_is_delivered_signed(
    ctl: Any, server: HookServer
) -> None:
    hook(ctl, "team", f"{server.url}/ok", events=["stage_failed"])
    hook(ctl, "others", f"{server.url}/ok", events=["*"], owners=["someone-else"])
    with unit_of_work(ctl.db) as tx:
        item = owners.notify_in(
            tx,
            owner="qa-team",
            kind="stage_failed",
            subject="s-1",
            data={"summary": "exit 1"},
            run_id="r-1",
            stage="test",
        )
        assert item.state == "open"
    assert server.hits == []  # nothing is sent by the change itself
    assert webhooks.deliver_due(ctl=ctl) == 1
    (hit,) = server.hits
    expected = "sha256=" + hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
    assert hit.headers["x-shopfloor-signature"] == expected
    body = json.loads(hit.body)
    assert body["event"] == "stage_failed"
    assert body["owner"] == "qa-team"
    assert body["run"] == "r-1"
    assert body["stage"] == "test"
    (sent,) = deliveries(ctl, "team")
    assert sent.state == DeliveryState.delivered
    assert sent.response_code == 200
    assert sent.attempts == 1
    assert deliveries(ctl, "others") == []
    assert [i.kind for i in owners.queue(ctl=ctl, owner="qa-team")] == ["stage_failed"]


def test_a_recurrence_counts_on_the_open_item(ctl: Any) -> None:
    for _ in range(3):
        owners.notify(ctl=ctl, owner="ops", kind="signature_recurring", subject="abc", data={})
    (item,) = owners.queue(ctl=ctl, owner="ops")
    assert item.count == 3
    owners.mark_done(ctl=ctl, owner="ops", item_id=item.id, by="me")
    owners.notify(ctl=ctl, owner="ops", kind="signature_recurring", subject="abc", data={})
    assert sorted(i.state.value for i in owners.queue(ctl=ctl, owner="ops")) == ["done", "open"]
    with pytest.raises(InvalidInput, match="kind"):
        owners.notify(ctl=ctl, owner="ops", kind="whatever", subject="x", data={})
    with pytest.raises(InvalidInput, match="owner"):
        owners.notify(ctl=ctl, owner="bad owner!", kind="stage_failed", subject="x", data={})


def test_owner_is_the_repos_then_the_pools(ctl: Any) -> None:
    with unit_of_work(ctl.db) as tx:
        tx.add(Pool(name="p", owner="pool-team"))
        run = Run(task="t", repo="/r", pool="p", policy={"owners": {"test": "qa-team"}})
        tx.add(run)
        assert owners.owner_for(tx, run, "test") == "qa-team"
        assert owners.owner_for(tx, run, "qa") == "pool-team"
        assert owners.run_owners(tx, run) == ["pool-team", "qa-team"]
        alone = Run(task="t", repo="/r")
        assert owners.owner_for(tx, alone, "test") is None


def test_down_failing_slow_and_redirecting_endpoints_are_recorded_not_waited_for(
    ctl: Any, server: HookServer
) -> None:
    hook(ctl, "down", f"http://127.0.0.1:{closed_port()}/")
    hook(ctl, "fail", f"{server.url}/fail")
    hook(ctl, "slow", f"{server.url}/slow")
    hook(ctl, "redirect", f"{server.url}/redirect")
    started = time.monotonic()
    owners.notify(ctl=ctl, owner="qa-team", kind="verdict_waiting", subject="r-1", data={})
    assert time.monotonic() - started < 1.0  # the change only writes rows
    started = time.monotonic()
    assert webhooks.deliver_due(ctl=ctl) == 4
    assert time.monotonic() - started < SLOW_S / 3  # the slow one hit its timeout
    down, fail, slow, redirect = (
        deliveries(ctl, name)[0] for name in ("down", "fail", "slow", "redirect")
    )
    for retried in (down, fail, slow):
        assert retried.state == DeliveryState.pending
        assert retried.attempts == 1
        assert retried.next_at > utcnow() + timedelta(seconds=8)  # backoff
    assert fail.response_code == 500
    assert "ConnectError" in (down.last_error or "")
    assert "timed out" in (slow.last_error or "")
    assert redirect.state == DeliveryState.failed
    assert redirect.response_code == 302
    assert "not followed" in (redirect.last_error or "")
    assert "/ok" not in server.paths()
    assert webhooks.deliver_due(ctl=ctl) == 0  # nothing due until the backoff passed


def test_retries_back_off_exponentially_and_stop(ctl: Any, server: HookServer) -> None:
    hook(ctl, "fail", f"{server.url}/fail")
    owners.notify(ctl=ctl, owner="qa-team", kind="stage_failed", subject="s-9", data={})
    waits = []
    for _ in range(3):
        before = utcnow()
        assert webhooks.deliver_due(ctl=ctl, now=utcnow() + timedelta(days=1)) == 1
        (found,) = deliveries(ctl, "fail")
        waits.append((found.next_at - before).total_seconds())
    assert found.state == DeliveryState.failed
    assert found.attempts == 3
    assert 9 < waits[0] < 12
    assert 19 < waits[1] < 22
    assert server.paths() == ["/fail"] * 3
    assert webhooks.deliver_due(ctl=ctl, now=utcnow() + timedelta(days=2)) == 0


def test_deleting_a_webhook_drops_its_deliveries(ctl: Any, server: HookServer) -> None:
    hook(ctl, "gone", f"{server.url}/ok")
    owners.notify(ctl=ctl, owner="qa-team", kind="stage_failed", subject="s-2", data={})
    webhooks.delete_webhook(ctl=ctl, name="gone")
    assert webhooks.deliver_due(ctl=ctl) == 0
    with unit_of_work(ctl.reader) as tx:
        assert list(tx.exec(select(WebhookDelivery))) == []
        assert len(list(tx.exec(select(OwnerItem)))) == 1


def test_a_verdict_closes_the_waiting_item(ctl: Any) -> None:
    with unit_of_work(ctl.db) as tx:
        run = Run(
            task="t", repo="/r", status=RunStatus.passed, policy={"owners": {"review": "rev"}}
        )
        tx.add(run)
        tx.flush()
        owners.verdict_waiting_in(tx, run=run)
    with unit_of_work(ctl.db) as tx:
        owners.verdict_given_in(tx, run_id=run.id)
    (item,) = owners.queue(ctl=ctl, owner="rev")
    assert item.state == "done"
    assert item.done_at is not None
