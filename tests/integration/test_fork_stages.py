"""Forking stages on the real engine (issue 15): a stage tried n ways at once on forks of the
run's machine, the run continuing on the winner's."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from controller.providers.docker import DockerProvider
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import ControllerProcess, issue_token, wait_json
from tests.integration.test_runs import cmd, create_run, wait_run

API = "/api/v1"
CTX = "/workspace/.shopfloor"
FORK_NO = f'python3 -c \'import json; print(json.load(open("{CTX}/run.json"))["current"]["fork"])\''
ONLY_FORK_2_GOOD = (
    f'i=$({FORK_NO}); echo "fork $i" > fork-marker.txt; '
    "if [ \"$i\" != 2 ]; then sed -i 's/Hello/Bye/' app.py; fi"
)
"""Every fork's agent passes; only fork 2's change keeps the sample's tests green."""
ALL_BAD = "echo tried > fork-marker.txt; sed -i 's/Hello/Bye/' app.py"


def alive_forks(client: TestClient, run_id: str) -> list[dict[str, Any]]:
    machines = client.get(f"{API}/machines").json()["data"]
    return [
        m
        for m in machines
        if m["labels"].get("run") == run_id
        and m["labels"].get("fork-stage")
        and m["state"] not in ("destroyed", "failed", "lost")
    ]


def test_the_fork_whose_change_passes_the_tests_wins_and_the_run_continues_on_it(
    live_client: TestClient, sample_repo: Path, settings: Settings
) -> None:
    client = live_client
    run = create_run(
        client,
        task="shout",
        repo=str(sample_repo),
        stages=[
            cmd("prepare", "echo prepared > prepared.txt"),
            {**cmd("implement", ONLY_FORK_2_GOOD), "fork": 3},
            {"name": "test", "agent": "tester"},
            cmd("after", "grep -qx 'fork 2' fork-marker.txt && test -s prepared.txt"),
        ],
    )
    done = wait_run(client, run["id"], timeout_s=240)
    assert done["status"] == "passed", json.dumps(done, indent=1)
    stages = {s["name"]: s for s in done["stages"]}
    implement = stages["implement"]
    assert implement["fork"] == {"count": 3, "select": "tests"}
    forks = [h for h in implement["history"] if "fork" in h]
    assert sorted(h["fork"] for h in forks) == [1, 2, 3]
    assert [h["fork"] for h in forks if h["winner"]] == [2]
    assert len({h["machine_id"] for h in forks}) == 3
    winner = next(h for h in forks if h["winner"])
    assert implement["outputs"]["fork"]["winner"] == 2
    # The next stages ran on the winner's machine and found its files (no re-creation).
    assert stages["test"]["machine_id"] == winner["machine_id"]
    assert stages["after"]["machine_id"] == winner["machine_id"]
    assert done["machine_id"] == winner["machine_id"]
    assert done["context_recreations"] == 0
    # Each fork kept its own evidence: a log per fork and the tester's report of each.
    artifacts = client.get(f"{API}/runs/{run['id']}/artifacts").json()["data"]
    fork_logs = {a["meta"].get("fork") for a in artifacts if a["stage"] == "implement"}
    assert fork_logs >= {1, 2, 3}
    # The gallery shows the three attempts side by side, each with its tests, the winner marked.
    browser = TestClient(client.app, follow_redirects=False)
    signed = browser.post("/gallery/login", data={"token": issue_token(settings, Role.reviewer)})
    assert signed.status_code == 303, signed.text
    page = browser.get(f"/gallery/runs/{run['id']}").text
    columns = re.findall(r'<div class="fork( winner)?" data-fork="(\d)">(.*?)</div>', page, re.S)
    assert [(bool(w), int(i)) for w, i, _ in columns] == [(False, 1), (True, 2), (False, 3)]
    for winner, _, html in columns:
        assert ("0 failed" in html) == bool(winner), html
        assert "implement-attempt1-fork" in html
    # The losers and, once the run ended, every fork are gone.
    time.sleep(1)
    assert alive_forks(client, run["id"]) == []


def test_all_forks_failing_fail_the_stage_with_every_attempts_evidence(
    live_client: TestClient, sample_repo: Path
) -> None:
    client = live_client
    run = create_run(
        client,
        task="break it",
        repo=str(sample_repo),
        stages=[
            cmd("prepare", "true"),
            {**cmd("implement", ALL_BAD), "fork": 2},
            {"name": "test", "agent": "tester"},
        ],
    )
    done = wait_run(client, run["id"], timeout_s=240)
    assert done["status"] == "failed"
    implement = next(s for s in done["stages"] if s["name"] == "implement")
    assert implement["status"] == "failed"
    assert "all 2 forks failed" in implement["summary"]
    forks = [h for h in implement["history"] if "fork" in h]
    assert sorted(h["fork"] for h in forks) == [1, 2]
    assert not any(h["winner"] for h in forks)
    assert all("tests failed" in h["summary"] for h in forks), forks
    artifacts = client.get(f"{API}/runs/{run['id']}/artifacts").json()["data"]
    per_fork = {(a["meta"].get("fork"), a["kind"]) for a in artifacts if a["stage"] == "implement"}
    for index in (1, 2):
        assert (index, "log") in per_fork
        assert (index, "junit") in per_fork, per_fork
    time.sleep(1)
    assert alive_forks(client, run["id"]) == []
    assert next(s for s in done["stages"] if s["name"] == "test")["status"] == "skipped"


def test_select_by_command_and_first(live_client: TestClient, sample_repo: Path) -> None:
    client = live_client
    run = create_run(
        client,
        task="pick by command",
        repo=str(sample_repo),
        stages=[
            cmd("prepare", "true"),
            {
                **cmd("implement", f"i=$({FORK_NO}); echo $i > picked.txt"),
                "fork": 3,
                "select": {"command": "grep -qx 3 picked.txt"},
            },
            cmd("after", "grep -qx 3 picked.txt"),
        ],
    )
    done = wait_run(client, run["id"], timeout_s=240)
    assert done["status"] == "passed", json.dumps(done, indent=1)
    implement = next(s for s in done["stages"] if s["name"] == "implement")
    assert implement["fork"]["select"] == {"command": "grep -qx 3 picked.txt", "timeout_s": 600}
    assert [h["fork"] for h in implement["history"] if h["winner"]] == [3]
    losers = [h for h in implement["history"] if not h["winner"]]
    assert all("select command exited 1" in h["summary"] for h in losers), losers

    first = create_run(
        client,
        task="first wins",
        repo=str(sample_repo),
        stages=[
            cmd("prepare", "true"),
            {
                **cmd(
                    "implement",
                    f"i=$({FORK_NO}); sleep $(( (i - 1) * 60 + 1 )); echo $i > picked.txt",
                ),
                "fork": 2,
                "select": "first",
            },
            cmd("after", "grep -qx 1 picked.txt"),
        ],
    )
    done = wait_run(client, first["id"], timeout_s=240)
    assert done["status"] == "passed", json.dumps(done, indent=1)
    implement = next(s for s in done["stages"] if s["name"] == "implement")
    by_fork = {h["fork"]: h for h in implement["history"]}
    assert by_fork[1]["winner"]
    # The slower fork (a minute to go) was stopped once the first passed.
    assert by_fork[2]["summary"] == "stopped: another fork passed first"


def test_bad_fork_specs_are_refused_before_the_run_is_queued(
    client: TestClient, sample_repo: Path
) -> None:
    def refused(stages: list[dict[str, Any]], words: str) -> None:
        body = {"task": "t", "repo": str(sample_repo), "stages": stages}
        answer = client.post(f"{API}/runs", json=body)
        assert answer.status_code == 422, answer.text
        assert words in answer.text, answer.text

    later = [cmd("prepare", "true")]
    tester = {"name": "test", "agent": "tester"}
    refused([*later, {**cmd("x", "true"), "fork": 1}, tester], "greater than or equal to 2")
    refused([*later, {**cmd("x", "true"), "fork": 9}, tester], "less than or equal to 8")
    refused([{**cmd("x", "true"), "fork": 2}, tester], "the run has no machine yet")
    refused([*later, {**cmd("x", "true"), "fork": 2}], "add a tester stage after it")
    refused([*later, {**cmd("x", "true"), "fork": 2}, cmd("y", "true")], "next stage is 'y'")
    refused([*later, {**cmd("x", "true"), "select": "first"}], "select needs fork")
    refused([*later, {**cmd("x", "true"), "fork": 2, "select": "best"}], "select")
    refused(
        [*later, {**cmd("x", "true"), "fork": 2, "select": {"command": ""}}],
        "at least 1 character",
    )
    refused([*later, {"name": "x", "agent": "remote", "fork": 2}, tester], "remote agent")
    assert client.get(f"{API}/runs").json()["count"] == 0


def test_controller_sigkilled_mid_fork_stage_leaves_no_orphans_and_the_stage_ends(
    tmp_path: Path, runner_image: str, provider: DockerProvider, sample_repo: Path
) -> None:
    env = {"SHOPFLOOR_RECONCILE_INTERVAL_S": "0.5", "SHOPFLOOR_REPO_ROOTS": str(tmp_path)}
    controller = ControllerProcess(tmp_path / "data", runner_image, **env).start()
    try:
        ops = {"Authorization": f"Bearer {controller.token(Role.ops)}"}
        with httpx.Client(base_url=controller.url, headers=ops, timeout=60) as http:
            body = {
                "task": "slow forks",
                "repo": str(sample_repo),
                "stages": [
                    cmd("prepare", "true"),
                    {
                        **cmd("implement", "touch started; sleep 4"),
                        "fork": 2,
                        "select": "first",
                        "retries": 1,
                    },
                    cmd("after", "test -e started"),
                ],
            }
            created = http.post(f"{API}/runs", json=body)
            assert created.status_code == 201, created.text
            run_id = created.json()["id"]
            wait_json(
                http,
                f"{API}/machines",
                lambda data: (
                    sum(
                        1
                        for m in data["data"]
                        if m["labels"].get("fork-stage") and m["state"] == "leased"
                    )
                    == 2
                ),
                "both forks leased",
                timeout_s=180,
            )
            time.sleep(1)  # the agents are running on the forks
            controller.kill()
        controller.start()
        with httpx.Client(base_url=controller.url, headers=ops, timeout=60) as http:
            done = wait_json(
                http,
                f"{API}/runs/{run_id}",
                lambda r: r["status"] in ("passed", "failed", "cancelled"),
                "the run to end after the restart",
                timeout_s=240,
            )
            assert done["status"] == "passed", json.dumps(done, indent=1)
            implement = next(s for s in done["stages"] if s["name"] == "implement")
            assert any("controller restarted" in h["summary"] for h in implement["history"])
            assert any(h.get("winner") for h in implement["history"])
            info = provider.inspect_container(f"shopfloor-{done['machine_id']}")
            install_id = info.labels["shopfloor.controller"] if info else None

            def settled() -> bool:
                alive = {
                    m["id"]
                    for m in http.get(f"{API}/machines").json()["data"]
                    if m["state"] not in ("failed", "destroyed", "lost")
                }
                owned = {"shopfloor.controller": str(install_id)}
                names = {c.labels.get("shopfloor.machine") for c in provider.list_containers(owned)}
                volumes = {v.labels.get("shopfloor.machine") for v in provider.list_volumes(owned)}
                return names <= alive and volumes <= alive and not alive

            deadline = time.monotonic() + 60
            while not settled():
                assert time.monotonic() < deadline, "orphan containers or volumes after restart"
                time.sleep(0.5)
    finally:
        controller.stop()
