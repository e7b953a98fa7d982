"""Flaky tests through the real driver and tester on the sample app: a test that fails by
chance becomes ``flaky``, a repo that quarantines lets it fail without failing the stage,
and a test that always fails stays ``broken`` and fails the stage.

The sample's ``test_coin`` takes its outcomes from a script file a ``command`` stage writes
(outside the checkout, so the tree stays clean): ``F`` fails, ``P`` passes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.integration.test_agents_pipeline import wait_run

COIN = "test_app.FactoryTest::test_coin"
BROKEN = "test_app.FactoryTest::test_always_fails"


def run(client: TestClient, repo: Path, coin: str, *, broken: bool = False) -> dict[str, Any]:
    env = "SAMPLE_FLAKY_SCRIPT=/tmp/coin" + (" SAMPLE_BROKEN=1" if broken else "")
    stages = [
        {"name": "coin", "agent": "command", "with": {"cmd": f"printf {coin} > /tmp/coin"}},
        {"name": "test", "agent": "tester", "with": {"test": f"{env} python3 run_tests.py"}},
    ]
    created = client.post(
        "/api/v1/runs", json={"task": "flaky", "repo": str(repo), "stages": stages}
    )
    assert created.status_code == 201, created.text
    return wait_run(client, created.json()["id"], {"passed", "failed", "cancelled"}, 120)


def learned(client: TestClient, repo: Path, **query: str) -> dict[str, dict[str, Any]]:
    found = client.get("/api/v1/learning/tests", params={"repo": str(repo), **query})
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["count"] == len(body["data"])
    return {t["test"]: t for t in body["data"]}


def test_a_chance_failure_becomes_flaky_then_quarantined_and_a_broken_test_stays_broken(
    live_client: TestClient, sample_repo: Path
) -> None:
    first = run(live_client, sample_repo, "F", broken=True)
    assert first["status"] == "failed"
    test = first["stages"][1]
    assert set(test["outputs"]["failing"]) == {COIN, BROKEN}, test
    assert "rerun" not in test["outputs"]  # nothing was known flaky yet
    assert test["outputs"]["clean"] is True

    second = run(live_client, sample_repo, "P", broken=True)
    assert second["status"] == "failed"
    assert second["stages"][1]["outputs"]["failing"] == [BROKEN]
    known = learned(live_client, sample_repo)
    assert known[COIN]["state"] == "flaky", known[COIN]  # passed and failed on one clean tree
    assert known[BROKEN]["state"] == "broken"
    assert (known[BROKEN]["failures"], known[BROKEN]["passes"]) == (2, 0)
    assert known["test_app.GreetingTest::test_greets_by_name"]["state"] == "healthy"
    assert list(learned(live_client, sample_repo, state="flaky")) == [COIN]

    toml = sample_repo / ".shopfloor.toml"  # the repo starts quarantining its flaky tests
    toml.write_text(toml.read_text() + '\n[verify]\nflaky = "quarantine"\n')
    subprocess.run(
        ["git", "-C", str(sample_repo), "-c", "user.name=t", "-c", "user.email=t@t",
         "commit", "-qam", "quarantine flaky tests"],
        check=True,
    )  # fmt: skip

    third = run(live_client, sample_repo, "FF")  # fails, and fails its rerun too
    assert third["status"] == "passed", third
    test = third["stages"][1]
    assert test["outputs"]["quarantined"] == [COIN], test
    assert test["outputs"]["rerun"]["cmd"].endswith("run_tests.py test_app.FactoryTest.test_coin")
    assert f"{COIN} [quarantined]" in test["summary"]
    assert learned(live_client, sample_repo)[COIN]["state"] == "quarantined"

    fourth = run(live_client, sample_repo, "F", broken=True)  # a deterministic failure fails
    assert fourth["status"] == "failed"
    test = fourth["stages"][1]
    assert test["outputs"]["failing"] == [BROKEN], test
    assert test["outputs"]["quarantined"] == [COIN]
    known = learned(live_client, sample_repo)
    assert known[BROKEN]["state"] == "broken"
    assert known[BROKEN]["failures"] == 3
    assert known[COIN]["state"] == "quarantined"
    assert known[COIN]["score"] > known["test_app.GreetingTest::test_greets_by_name"]["score"]
