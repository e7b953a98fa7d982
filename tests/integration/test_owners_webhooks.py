"""Owners and webhooks on real runs (issue 13): a failed stage lands in its owner's queue,
a passed run waits for its verdict in the pool owner's queue, and webhooks that are down,
slow (30 s) or answer 500 never delay a run: the driver only writes delivery rows, the
webhook loop sends them."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.settings import Settings
from controller.store.models import Role
from tests.hook_server import SLOW_S, closed_port, hook_server
from tests.integration.conftest import issue_token
from tests.integration.test_bad_input import commit_policy
from tests.integration.test_leases import put_pool, wait_for, wait_ready
from tests.integration.test_runs import cmd, create_run, wait_run

API = "/api/v1"
SECRET = "integration-secret-0123"


@pytest.fixture
def hooked_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(
        pool_interval_s=0.3,
        lease_reap_interval_s=0.3,
        run_poll_interval_s=0.2,
        webhook_interval_s=0.2,
        webhook_backoff_s=60,
    )
    with TestClient(create_app(settings, background=True)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        yield client


def deliveries(client: TestClient, name: str) -> list[dict[str, Any]]:
    answer = client.get(f"{API}/webhooks/{name}/deliveries")
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]  # type: ignore[no-any-return]


def attempted(client: TestClient, name: str) -> list[dict[str, Any]] | None:
    """The webhook's deliveries once each was tried at least once."""
    found = deliveries(client, name)
    return found if found and all(d["attempts"] >= 1 for d in found) else None


def seconds(run: dict[str, Any]) -> float:
    started = datetime.fromisoformat(run["created_at"])
    return (datetime.fromisoformat(run["finished_at"]) - started).total_seconds()


def test_owners_hear_of_failures_and_waiting_verdicts_without_delaying_runs(
    hooked_client: TestClient, sample_repo: Path
) -> None:
    client = hooked_client
    commit_policy(sample_repo, '[owners]\ntest = "qa-team"\n')
    put_pool(
        client,
        "owned",
        template={"repo": str(sample_repo)},
        min_ready=1,
        max_machines=2,
        owner="pool-team",
        reset="keep",
    )
    wait_ready(client, "owned", 1)
    baseline = wait_run(
        client,
        create_run(
            client,
            task="baseline, no webhooks",
            repo=str(sample_repo),
            pool="owned",
            stages=[cmd("plan", "true"), cmd("test", "exit 1")],
        )["id"],
    )
    assert baseline["status"] == "failed"
    with hook_server() as server:
        for name, url in (
            ("ok", f"{server.url}/ok"),
            ("slow", f"{server.url}/slow"),
            ("fail", f"{server.url}/fail"),
            ("down", f"http://127.0.0.1:{closed_port()}/hook"),
        ):
            answer = client.put(
                f"{API}/webhooks/{name}", json={"url": url, "events": ["*"], "secret": SECRET}
            )
            assert answer.status_code == 200, answer.text
        wait_ready(client, "owned", 1)
        failing = wait_run(
            client,
            create_run(
                client,
                task="a test that fails",
                repo=str(sample_repo),
                pool="owned",
                stages=[cmd("plan", "true"), cmd("test", "exit 1")],
            )["id"],
        )
        wait_ready(client, "owned", 1)
        passing = wait_run(
            client,
            create_run(
                client,
                task="all green",
                repo=str(sample_repo),
                pool="owned",
                stages=[cmd("plan", "true"), cmd("test", "true")],
            )["id"],
        )
        assert failing["status"] == "failed", failing
        assert passing["status"] == "passed", passing
        # Generous: a run that waited on the slow endpoint would take 30 s more.
        assert seconds(failing) < seconds(baseline) + SLOW_S / 2, (failing, baseline)
        slow_hit = wait_for(
            lambda: next((h for h in server.hits if h.path == "/slow"), None),
            what="the slow endpoint to be called",
        )
        finished = datetime.fromisoformat(passing["finished_at"]).timestamp()
        assert finished < slow_hit.at + SLOW_S  # both runs ended while it was still held

        qa = client.get(f"{API}/owners/qa-team/queue").json()
        assert sorted((i["kind"], i["run"], i["stage"]) for i in qa["data"]) == sorted(
            [
                ("stage_failed", baseline["id"], "test"),
                ("stage_failed", failing["id"], "test"),
                # learning tells the stage's owner of the failure's signature: new, then seen again
                ("signature_new", baseline["id"], "test"),
                ("signature_recurring", failing["id"], "test"),
            ]
        )
        pool_team = client.get(f"{API}/owners/pool-team/queue").json()
        assert [(i["kind"], i["run"]) for i in pool_team["data"]] == [
            ("verdict_waiting", passing["id"])
        ]

        # The webhooks came after the baseline run: the failing run's stage and its
        # recurring signature, and the passing run's wait for a verdict.
        delivered = wait_for(
            lambda: (
                len(d := [x for x in deliveries(client, "ok") if x["state"] == "delivered"]) == 3
                and d
            ),
            what="three deliveries to the endpoint that answers",
        )
        assert sorted(d["body"]["event"] for d in delivered) == [
            "signature_recurring",
            "stage_failed",
            "verdict_waiting",
        ]
        for hit in (h for h in server.hits if h.path == "/ok"):
            mac = hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
            assert hit.headers["x-shopfloor-signature"] == f"sha256={mac}"
            assert json.loads(hit.body)["webhook"] == "ok"
        fail = wait_for(
            lambda: attempted(client, "fail"),
        )
        assert {d["response_code"] for d in fail} == {500}
        assert {d["state"] for d in fail} == {"pending"}  # retried later, with backoff
        down = wait_for(
            lambda: attempted(client, "down"),
        )
        assert all("ConnectError" in d["last_error"] for d in down)
        slow = wait_for(
            lambda: attempted(client, "slow"),
            timeout_s=60,
        )
        assert all("timed out" in d["last_error"] for d in slow)
