"""Learning off (``SHOPFLOOR_LEARNING=false``) is off for every effect on a run: the tester
gets no known flaky tests (no rerun, no quarantined failure let through, even where the
repo's policy quarantines), the handoff folder gets no lessons, no signature is recorded
and a machine whose stages keep failing with infra errors is not quarantined. The JUnit
history is evidence and is still kept (``/learning/tests`` reads it; its state says
``flaky``, never ``quarantined``, since nothing is quarantined)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token
from tests.integration.test_leases import lease, put_pool, wait_ready
from tests.integration.test_runs import CTX, cmd, create_run, wait_run

API = "/api/v1"
COIN = "test_app.FactoryTest::test_coin"
KILLED_ON_BAD = "test ! -e /home/runner/bad-machine || kill -9 $$; python3 -c 'assert 1 + 1 == 2'"
NO_LESSONS = (
    f'test ! -e {CTX}/lessons.json && test ! -e {CTX}/lessons.md && python3 -c "import json;'
    f" assert json.load(open('{CTX}/run.json'))['lessons'] is None\""
)


def quarantining(repo: Path) -> None:
    toml = repo / ".shopfloor.toml"
    toml.write_text(toml.read_text() + '\n[verify]\nflaky = "quarantine"\n')
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
         "commit", "-qam", "quarantine flaky tests"],
        check=True,
    )  # fmt: skip


def coin_run(client: TestClient, repo: Path, coin: str) -> dict[str, Any]:
    stages = [
        cmd("coin", f"printf {coin} > /tmp/coin && {NO_LESSONS}"),
        cmd("build", KILLED_ON_BAD),
        {
            "name": "test",
            "agent": "tester",
            "with": {"test": "SAMPLE_FLAKY_SCRIPT=/tmp/coin python3 run_tests.py"},
        },
    ]
    run = create_run(client, task="coin", repo=str(repo), pool="off", stages=stages)
    return wait_run(client, run["id"])


def test_learning_off_leaves_runs_as_if_no_learning_existed(
    make_settings: Callable[..., Settings], sample_repo: Path
) -> None:
    settings = make_settings(
        learning=False, pool_interval_s=0.3, lease_reap_interval_s=0.3, run_poll_interval_s=0.2
    )
    quarantining(sample_repo)
    repo = str(sample_repo)
    with TestClient(create_app(settings, background=True)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        put_pool(client, "off", template={"repo": repo}, min_ready=2, max_machines=2, reset="keep")
        wait_ready(client, "off", 2)

        assert coin_run(client, sample_repo, "F")["status"] == "failed"
        passed = coin_run(client, sample_repo, "P")
        assert passed["status"] == "passed", json.dumps(passed, indent=1)
        # Learning on, this run passes: test_coin is known flaky and quarantined (rerun,
        # then let through). Off, the tester knows nothing: the failure fails the stage.
        third = coin_run(client, sample_repo, "FFFF")
        assert third["status"] == "failed", json.dumps(third, indent=1)
        test = third["stages"][2]
        assert test["outputs"]["failing"] == [COIN], test
        assert "rerun" not in test["outputs"]
        assert "quarantined" not in test["outputs"]
        assert [a["status"] for a in test["history"]] == ["failed"]
        assert all(s["status"] == "passed" for s in third["stages"][:2])  # no lessons written
        tests = client.get(f"{API}/learning/tests", params={"repo": repo}).json()["data"]
        states = {t["test"]: t["state"] for t in tests}
        assert states[COIN] == "flaky", states  # the history is kept; nothing is quarantined

        # A machine whose commands are SIGKILLed (infra) three times, while the same stage
        # passed on the other machine, stays in service: no quarantine, no move.
        wait_ready(client, "off", 2)  # the third run's machine may still be on its way back
        held = lease(client, {}, machine_id=passed["machine_id"])
        ready = client.get(f"{API}/machines", params={"pool": "off", "state": "ready"})
        bad = ready.json()["data"][0]["id"]
        marked = client.post(f"{API}/machines/{bad}/exec", json={"cmd": "touch ~/bad-machine"})
        assert marked.json()["exit_code"] == 0, marked.text
        build = cmd("build", KILLED_ON_BAD, retries=2)
        run = create_run(client, task="b", repo=repo, pool="off", stages=[build])
        done = wait_run(client, run["id"])
        assert done["status"] == "failed", json.dumps(done, indent=1)
        assert done["context_recreations"] == 0
        assert [a["machine_id"] for a in done["stages"][0]["history"]] == [bad] * 3
        machine = client.get(f"{API}/machines/{bad}").json()
        assert machine["state"] != "quarantined", machine
        assert client.delete(f"{API}/leases/{held['id']}").status_code == 200

        failures = client.get(f"{API}/learning/failures", params={"repo": repo}).json()
        assert failures["count"] == 0, failures
        for kind in ("learning.", "machine.quarantined"):
            found = client.get(f"{API}/events", params={"kind": kind}).json()["data"]
            assert found == [], found
