"""Pause/resume, snapshots and fork on the real engine (issue 15)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.providers.docker import DockerProvider
from controller.services import snapshots
from controller.services.runtime import Controller
from controller.settings import Settings
from controller.store.models import Role
from tests.conftest import TEST_LABEL, TEST_RUN_ID
from tests.integration.conftest import ControllerProcess, issue_token, wait_state
from tests.integration.test_fenced_channels import PORT, agent, lease, token_header
from tests.integration.test_ports import SERVE

API = "/api/v1"
WRITER = (
    'nohup bash -c \'i=0; while :; do printf "line %08d %s\\n" $i '
    "abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz >> /workspace/log.txt; "
    "i=$((i+1)); done' >/dev/null 2>&1 &"
)


def new_machine(client: TestClient, **body: Any) -> str:
    response = client.post(f"{API}/machines?wait=true", json=body)
    assert response.json()["state"] == "ready", response.text
    return str(response.json()["id"])


def sh(client: TestClient, machine_id: str, cmd: str, **headers: str) -> dict[str, Any]:
    answer = client.post(f"{API}/machines/{machine_id}/exec", json={"cmd": cmd}, headers=headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def line_count(client: TestClient, machine_id: str) -> int:
    return int(sh(client, machine_id, "wc -l < /workspace/log.txt")["stdout"].strip())


def ctl_of(client: TestClient) -> Controller:
    ctl: Controller = client.app.state.controller  # type: ignore[attr-defined]
    return ctl


def snapshot_images(provider: DockerProvider, snapshot_id: str) -> list[str]:
    found = provider.list_images({"shopfloor.snapshot": snapshot_id})
    return [tag for image in found for tag in image.tags]


def assert_no_parts(client: TestClient, snapshot_id: str | None = None) -> None:
    """No snapshot record, image or workspace copy left (of one snapshot, or of any)."""
    ctl = ctl_of(client)
    listed = client.get(f"{API}/snapshots").json()["data"]
    images = ctl.provider.list_images({"shopfloor.controller": ctl.install_id})
    copies = ctl.provider.list_volume_snapshots({"shopfloor.controller": ctl.install_id})
    if snapshot_id is None:
        assert listed == []
        assert images == []
        assert copies == []
    else:
        assert all(s["id"] != snapshot_id for s in listed)
        assert all(i.labels.get("shopfloor.snapshot") != snapshot_id for i in images)
        assert all(snapshot_id not in c.name for c in copies)


# ---------------------------------------------------------------- pause / resume


def test_pause_freezes_and_resume_keeps_processes_sessions_and_forwards(
    client: TestClient,
) -> None:
    machine_id = new_machine(client)
    served = sh(client, machine_id, SERVE.format(port=PORT))
    assert served["exit_code"] == 0, served
    forward = client.post(f"{API}/machines/{machine_id}/ports", json={"port": PORT})
    assert forward.status_code == 201, forward.text
    url = forward.json()["url"]
    opened = client.post(f"{API}/machines/{machine_id}/sessions")
    session = f"{API}/machines/{machine_id}/sessions/{opened.json()['id']}/run"
    ran = client.post(session, json={"cmd": "export KEPT=forty-two; cd /workspace"})
    assert ran.status_code == 200, ran.text
    sh(
        client,
        machine_id,
        "nohup bash -c 'while :; do date +%s%N >> /workspace/ticks; sleep 0.05; done' >/dev/null 2>&1 &",
    )
    time.sleep(0.5)

    paused = client.post(f"{API}/machines/{machine_id}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["state"] == "paused"
    assert paused.json()["paused_from"] == "ready"
    ticks = Path(f"/proc/{_pid(client, machine_id)}/root/workspace/ticks")
    before = ticks.read_text().count("\n")
    time.sleep(0.5)
    assert ticks.read_text().count("\n") == before, "a paused machine's process kept writing"
    for answer in (
        client.post(f"{API}/machines/{machine_id}/exec", json={"cmd": "true"}),
        client.post(session, json={"cmd": "echo $KEPT"}),
        client.post(f"{API}/machines/{machine_id}/sessions"),
        client.get(f"{API}/machines/{machine_id}/files", params={"path": "ticks"}),
    ):
        assert answer.status_code == 409, answer.text
        assert "paused" in answer.json()["detail"]
    assert client.post(f"{API}/machines/{machine_id}/pause").json()["state"] == "paused"

    resumed = client.post(f"{API}/machines/{machine_id}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["state"] == "ready"
    assert resumed.json()["paused_from"] is None
    again = client.post(session, json={"cmd": "echo $KEPT $PWD"})
    assert again.status_code == 200, again.text
    assert again.json()["output"] == "forty-two /workspace\n"
    time.sleep(0.5)
    assert ticks.read_text().count("\n") > before, "the background process did not carry on"
    assert httpx.get(f"{url}/index.html", timeout=10).text == "hello from the machine\n"
    assert client.post(f"{API}/machines/{machine_id}/resume").status_code == 409


def _pid(client: TestClient, machine_id: str) -> int:
    ctl = ctl_of(client)
    docker = ctl.provider.on_host("local").api  # type: ignore[attr-defined]
    return int(docker.inspect_container(f"shopfloor-{machine_id}")["State"]["Pid"])


def test_a_paused_leased_machine_keeps_its_lease_and_is_handed_over_after_it(
    live_client: TestClient,
) -> None:
    client = live_client
    settings: Settings = ctl_of(client).settings
    me = agent(settings)
    machine_id = new_machine(client)
    granted = lease(client, me, machine_id)
    token = granted["token"]
    # another agent, and the holder without its token, may not pause it
    assert client.post(f"{API}/machines/{machine_id}/pause", headers=me).status_code == 409
    other = agent(settings)
    refused = client.post(
        f"{API}/machines/{machine_id}/pause", headers={**other, **token_header(token)}
    )
    assert refused.status_code == 403, refused.text
    paused = client.post(
        f"{API}/machines/{machine_id}/pause", headers={**me, **token_header(token)}
    )
    assert paused.status_code == 200, paused.text
    assert paused.json()["paused_from"] == "leased"
    renewed = client.post(f"{API}/leases/{granted['id']}/renew", json={}, headers=me)
    assert renewed.status_code == 200, renewed.text
    # counted by its pool's maximum like any live machine: it is alive
    assert client.get(f"{API}/machines/{machine_id}").json()["state"] == "paused"
    # released while paused: the reaper resumes it, then hands it over like any machine
    # leased by nobody (its user's processes ended) and it is ready for the next holder
    released = client.delete(f"{API}/leases/{granted['id']}", headers=me)
    assert released.status_code == 200, released.text
    back = wait_state(client, machine_id, {"ready", "failed"}, timeout_s=60)
    assert back["state"] == "ready", back
    assert back["fence"] > granted["fence"]
    events = client.get(f"{API}/events", params={"subject": machine_id}).json()["data"]
    assert any(e["kind"] == "machine.handed_over" for e in events), events


# ---------------------------------------------------------------- snapshots


def test_a_snapshot_taken_while_the_machine_writes_restores_a_consistent_file(
    client: TestClient,
) -> None:
    source = new_machine(client)
    assert sh(client, source, WRITER)["exit_code"] == 0
    time.sleep(1.0)
    taken = client.post(f"{API}/machines/{source}/snapshots", json={"name": "mid-write"})
    assert taken.status_code == 201, taken.text
    snap = taken.json()
    assert snap["state"] == "ready"
    assert snap["machine_id"] == source
    assert snap["has_memory"] is False
    assert snap["memory_reason"]
    assert snap["size_bytes"] > 0
    # the source's writer carries on
    counted = line_count(client, source)
    time.sleep(0.5)
    assert line_count(client, source) > counted
    # a machine from the snapshot has every line whole and in order
    restored = client.post(f"{API}/machines?wait=true", json={"snapshot": snap["id"]})
    assert restored.status_code == 201, restored.text
    assert restored.json()["state"] == "ready", restored.text
    assert restored.json()["snapshot_id"] == snap["id"]
    copy = restored.json()["id"]
    # checked in the machine: the file is megabytes, more than an exec's output keeps
    check = (
        'awk \'{ if ($1 != "line" || length($0) != 76 || $2 + 0 != NR - 1) bad++ } '
        "END { print NR, bad + 0 }' /workspace/log.txt; tail -c 1 /workspace/log.txt | od -An -c"
    )
    counted_lines, torn, last = sh(client, copy, check)["stdout"].split()
    assert int(counted_lines) > 100
    assert torn == "0", "torn or missing lines in the restored file"
    assert last == "\\n", "the last line is cut"
    # nothing of the writer runs in the copy (disk only), and the copy is its own
    assert "log.txt" not in sh(client, copy, "ps -eo args")["stdout"]
    listed = client.get(f"{API}/snapshots").json()
    assert listed["count"] == 1
    assert listed["data"][0]["used_by"] == [copy]
    # in use: 409; once the copy is gone, deleted with its parts
    refused = client.delete(f"{API}/snapshots/{snap['id']}")
    assert refused.status_code == 409, refused.text
    assert copy in refused.json()["detail"]
    assert client.delete(f"{API}/machines/{copy}").status_code == 200
    assert client.delete(f"{API}/snapshots/{snap['id']}").status_code == 200
    assert_no_parts(client)
    sh(client, source, "pkill -f log.txt || true")


def test_fork_starts_copies_that_are_their_own(client: TestClient) -> None:
    source = new_machine(client, labels={"team": "a"})
    sh(client, source, "echo original > /workspace/file; mkdir -p /workspace/.venv")
    forked = client.post(f"{API}/machines/{source}/fork", json={"count": 2, "labels": {"try": "x"}})
    assert forked.status_code == 201, forked.text
    body = forked.json()
    copies = [m["id"] for m in body["machines"]]
    assert len(set(copies)) == 2
    for machine in body["machines"]:
        assert machine["state"] == "ready"
        assert machine["forked_from"] == source
        assert machine["snapshot_id"] == body["snapshot"]["id"]
        assert machine["labels"] == {"team": "a", "try": "x"}
        assert machine["fence"] == 0
    for copy in copies:
        assert sh(client, copy, "cat /workspace/file")["stdout"] == "original\n"
        sh(client, copy, f"echo {copy} > /workspace/file")
    assert sh(client, source, "cat /workspace/file")["stdout"] == "original\n"
    for copy in copies:
        assert sh(client, copy, "cat /workspace/file")["stdout"] == f"{copy}\n"
    ctl = ctl_of(client)
    labels = ctl.provider.inspect_container(f"shopfloor-{copies[0]}")
    assert labels is not None
    assert labels.labels["shopfloor.forked-from"] == source
    assert labels.labels["shopfloor.machine"] == copies[0]
    for copy in copies:
        client.delete(f"{API}/machines/{copy}")
    assert client.delete(f"{API}/snapshots/{body['snapshot']['id']}").status_code == 200
    assert_no_parts(client)


def test_fork_under_a_lease_needs_its_token_and_ops_forking_it_is_recorded(
    client: TestClient, settings: Settings
) -> None:
    machine_id = new_machine(client)
    me = agent(settings)
    granted = lease(client, me, machine_id)
    url = f"{API}/machines/{machine_id}/fork"
    without = client.post(url, json={"count": 1}, headers=me)
    assert without.status_code == 409, without.text
    assert "X-Lease-Token" in without.json()["detail"]
    stale = client.post(url, json={"count": 1}, headers={**me, **token_header("guess")})
    assert stale.status_code == 409, stale.text
    made: list[str] = []
    mine = client.post(url, json={"count": 1}, headers={**me, **token_header(granted["token"])})
    assert mine.status_code == 201, mine.text
    made += [m["id"] for m in mine.json()["machines"]]
    ops = client.post(url, json={"count": 1})
    assert ops.status_code == 201, ops.text
    made += [m["id"] for m in ops.json()["machines"]]
    events = client.get(f"{API}/events", params={"subject": machine_id}).json()["data"]
    forks = [e for e in events if e["kind"] == "machine.forked"]
    assert {e["data"]["under_lease"] for e in forks} == {None, granted["id"]}
    for copy in made:
        client.delete(f"{API}/machines/{copy}")


def test_bad_input(client: TestClient) -> None:
    machine_id = new_machine(client)
    unknown = client.post(f"{API}/machines", json={"snapshot": "snap-nothing"})
    assert unknown.status_code == 422, unknown.text
    assert "unknown snapshot" in unknown.json()["detail"]
    assert client.get(f"{API}/snapshots/snap-nothing").status_code == 404
    assert client.delete(f"{API}/snapshots/snap-nothing").status_code == 404
    for count in (0, 9, -1):
        answer = client.post(f"{API}/machines/{machine_id}/fork", json={"count": count})
        assert answer.status_code == 422, answer.text
        assert "count must be 1 to 8" in answer.json()["detail"]
    wrong = client.post(f"{API}/machines/{machine_id}/fork", json={"count": "many"})
    assert wrong.status_code == 422
    assert client.post(f"{API}/machines/m-nothing/snapshots", json={}).status_code == 404
    snap = client.post(f"{API}/machines/{machine_id}/snapshots", json={}).json()
    clash = client.post(f"{API}/machines", json={"snapshot": snap["id"], "repo": "/tmp"})
    assert clash.status_code == 422, clash.text
    assert "repo" in clash.json()["detail"]
    assert client.delete(f"{API}/machines/{machine_id}").status_code == 200
    for action, body in (("snapshots", {}), ("fork", {"count": 1}), ("pause", None)):
        answer = client.post(f"{API}/machines/{machine_id}/{action}", json=body)
        assert answer.status_code == 409, answer.text
        assert "destroyed" in answer.json()["detail"]
    client.delete(f"{API}/snapshots/{snap['id']}")
    assert_no_parts(client)


def test_retention_deletes_old_unused_unpinned_snapshots(
    make_settings: Any,
) -> None:
    settings = make_settings(snapshot_max_age_s=0)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        machine_id = new_machine(client)
        url = f"{API}/machines/{machine_id}/snapshots"
        old = client.post(url, json={"name": "old"}).json()
        pinned = client.post(url, json={"name": "kept", "pinned": True}).json()
        used = client.post(url, json={"name": "used"}).json()
        user = new_machine(client, snapshot=used["id"])
        deleted = snapshots.retention_tick(ctl=ctl_of(client))
        assert deleted == [old["id"]]
        left = {s["id"] for s in client.get(f"{API}/snapshots").json()["data"]}
        assert left == {pinned["id"], used["id"]}
        assert_no_parts(client, old["id"])
        client.delete(f"{API}/machines/{user}")
        assert snapshots.retention_tick(ctl=ctl_of(client)) == [used["id"]]
        client.delete(f"{API}/snapshots/{pinned['id']}")
        client.delete(f"{API}/machines/{machine_id}")
        assert_no_parts(client)


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_store_fails_snapshot_and_fork_and_leaves_nothing(
    make_settings: Any,
) -> None:
    settings = make_settings(disk_pool_bytes=2 * 1024**3)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        ctl = ctl_of(client)
        disks = ctl.provider.on_host("local").disks  # type: ignore[attr-defined]
        assert disks is not None
        assert disks.reflink, "the disk pool shares blocks"
        machine_id = new_machine(client)
        sh(client, machine_id, "head -c 50000000 /dev/urandom > /workspace/data; sync")
        filler = settings.data_dir / "disks" / ".filler"
        with filler.open("wb") as fh:
            fh.truncate(0)
        free = disks.free_bytes()
        subprocess.run(["fallocate", "-l", str(free - 16 * 1024**2), str(filler)], check=True)
        try:
            volumes_before = {v.name for v in ctl.provider.list_volumes({TEST_LABEL: TEST_RUN_ID})}
            for url, body in (
                (f"{API}/machines/{machine_id}/snapshots", {}),
                (f"{API}/machines/{machine_id}/fork", {"count": 2}),
            ):
                answer = client.post(url, json=body)
                assert answer.status_code == 507, answer.text
                assert "full" in answer.json()["detail"]
                assert_no_parts(client)
                machines = client.get(f"{API}/machines").json()["data"]
                assert [m["id"] for m in machines] == [machine_id]
            volumes_after = {v.name for v in ctl.provider.list_volumes({TEST_LABEL: TEST_RUN_ID})}
            assert volumes_after <= volumes_before
            # the source is untouched: running, not paused, its data whole
            assert client.get(f"{API}/machines/{machine_id}").json()["state"] == "ready"
            assert sh(client, machine_id, "wc -c < /workspace/data")["stdout"].strip() == "50000000"
            info = ctl.provider.inspect_container(f"shopfloor-{machine_id}")
            assert info is not None
            assert info.status == "running"
        finally:
            filler.unlink()
        forked = client.post(f"{API}/machines/{machine_id}/fork", json={"count": 1})
        assert forked.status_code == 201, forked.text
        for m in forked.json()["machines"]:
            client.delete(f"{API}/machines/{m['id']}")
        client.delete(f"{API}/snapshots/{forked.json()['snapshot']['id']}")
        client.delete(f"{API}/machines/{machine_id}")


# ---------------------------------------------------------------- a controller killed mid-fork


def _fork_in_background(http: httpx.Client, machine_id: str) -> threading.Thread:
    def call() -> None:
        try:
            http.post(f"{API}/machines/{machine_id}/fork", json={"count": 3}, timeout=60)
        except httpx.HTTPError:
            pass  # the controller was killed under it

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def _wait_for(http: httpx.Client, path: str, check: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if check(http.get(path).json()["data"]):
            return
        time.sleep(0.01)
    raise AssertionError(f"never saw the moment to kill the controller at on {path}")


def _assert_nothing_orphaned(
    http: httpx.Client, provider: DockerProvider, install_id: str, source: str
) -> None:
    machines = {m["id"]: m for m in http.get(f"{API}/machines").json()["data"]}
    alive = {i for i, m in machines.items() if m["state"] not in ("failed", "destroyed", "lost")}
    owned = {"shopfloor.controller": install_id}

    def settled() -> bool:
        names = {c.labels.get("shopfloor.machine") for c in provider.list_containers(owned)}
        volumes = {v.labels.get("shopfloor.machine") for v in provider.list_volumes(owned)}
        known = {s["id"] for s in http.get(f"{API}/snapshots").json()["data"]}
        images = {i.labels.get("shopfloor.snapshot") for i in provider.list_images(owned)}
        copies = {c.name for c in provider.list_volume_snapshots(owned)}
        return (
            names <= alive
            and volumes <= alive
            and images <= known
            and all(any(k in c for k in known) for c in copies)
        )

    deadline = time.monotonic() + 30
    while not settled():
        assert time.monotonic() < deadline, "orphans left after the restart"
        time.sleep(0.5)
    for snap in http.get(f"{API}/snapshots").json()["data"]:
        assert snap["state"] == "ready", snap
    for machine in machines.values():
        assert machine["state"] in ("ready", "failed"), machine
    info = provider.inspect_container(f"shopfloor-{source}")
    deadline = time.monotonic() + 30
    while info is not None and info.status != "running" and time.monotonic() < deadline:
        time.sleep(0.3)  # reconcile thaws a machine a dead controller left paused
        info = provider.inspect_container(f"shopfloor-{source}")
    assert info is not None
    assert info.status == "running"


def test_controller_sigkilled_mid_fork_leaves_no_orphans_after_restart(
    tmp_path: Path, runner_image: str, provider: DockerProvider
) -> None:
    env = {"SHOPFLOOR_RECONCILE_INTERVAL_S": "0.5"}
    controller = ControllerProcess(tmp_path / "data", runner_image, **env).start()
    try:
        ops = {"Authorization": f"Bearer {controller.token(Role.ops)}"}
        with httpx.Client(base_url=controller.url, headers=ops, timeout=60) as http:
            source = http.post(f"{API}/machines?wait=true", json={}).json()["id"]
        info = provider.inspect_container(f"shopfloor-{source}")
        assert info is not None
        install_id = info.labels["shopfloor.controller"]
        moments = (
            # while the snapshot is taken (the source paused by the engine)
            (f"{API}/snapshots", lambda data: any(s["state"] == "taking" for s in data)),
            # while its copies are made
            (f"{API}/machines", lambda data: any(m["state"] == "provisioning" for m in data)),
        )
        for path, moment in moments:
            with httpx.Client(base_url=controller.url, headers=ops, timeout=60) as http:
                _fork_in_background(http, source)
                _wait_for(http, path, moment)
                controller.kill()
            controller.start()  # on a new port
            with httpx.Client(base_url=controller.url, headers=ops, timeout=60) as http:
                _assert_nothing_orphaned(http, provider, install_id, source)
                assert http.get(f"{API}/machines/{source}").json()["state"] == "ready"
    finally:
        controller.stop()


def test_without_disk_limits_snapshots_copy_the_workspace_and_say_so(
    make_settings: Any,
) -> None:
    settings = make_settings(disk_limits=False)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        source = new_machine(client)
        sh(
            client,
            source,
            "mkdir -p /workspace/d && echo kept > /workspace/d/f && chmod 600 /workspace/d/f"
            " && mkdir /workspace/shut && echo hid > /workspace/shut/g && chmod 000 /workspace/shut",
        )
        forked = client.post(f"{API}/machines/{source}/fork", json={"count": 2})
        assert forked.status_code == 201, forked.text
        body = forked.json()
        assert body["snapshot"]["shared_blocks"] is False
        for machine in body["machines"]:
            got = sh(client, machine["id"], "stat -c '%U %a' /workspace/d/f; cat /workspace/d/f")
            assert got["stdout"] == "runner 600\nkept\n"
            shut = "stat -c '%a' /workspace/shut; chmod 700 /workspace/shut; cat /workspace/shut/g"
            assert sh(client, machine["id"], shut)["stdout"] == "0\nhid\n"
        for machine in body["machines"]:
            client.delete(f"{API}/machines/{machine['id']}")
        assert client.delete(f"{API}/snapshots/{body['snapshot']['id']}").status_code == 200
        assert_no_parts(client)
        client.delete(f"{API}/machines/{source}")


def test_a_pool_fills_from_a_snapshot_its_template_names(live_client: TestClient) -> None:
    client = live_client
    source = new_machine(client)
    sh(client, source, "echo from-the-snapshot > /workspace/marker")
    snap = client.post(f"{API}/machines/{source}/snapshots", json={}).json()
    body = {"template": {"snapshot": snap["id"]}, "min_ready": 1, "max_machines": 1}
    assert client.put(f"{API}/pools/snap", json=body).status_code in (200, 201)
    pooled = wait_state_of_pool(client, "snap")
    assert pooled["snapshot_id"] == snap["id"]
    assert sh(client, pooled["id"], "cat /workspace/marker")["stdout"] == "from-the-snapshot\n"
    refused = client.delete(f"{API}/snapshots/{snap['id']}")
    assert refused.status_code == 409, refused.text
    assert "pools snap" in refused.json()["detail"]


def wait_state_of_pool(client: TestClient, pool: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = client.get(f"{API}/machines", params={"pool": pool, "state": "ready"}).json()
        if ready["data"]:
            return dict(ready["data"][0])
        time.sleep(0.3)
    raise AssertionError(f"pool {pool} made no ready machine")


def test_on_postgresql_pause_snapshot_and_fork(make_settings: Any, postgres_url: str) -> None:
    """PostgreSQL keeps the machine state as a native enum: ``paused`` must be one of it."""
    settings = make_settings(database_url=postgres_url)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        machine_id = new_machine(client)
        assert client.post(f"{API}/machines/{machine_id}/pause").json()["state"] == "paused"
        listed = client.get(f"{API}/machines", params={"state": "paused"}).json()["data"]
        assert [m["id"] for m in listed] == [machine_id]
        assert client.post(f"{API}/machines/{machine_id}/resume").json()["state"] == "ready"
        forked = client.post(f"{API}/machines/{machine_id}/fork", json={"count": 1})
        assert forked.status_code == 201, forked.text
        copy = forked.json()["machines"][0]["id"]
        assert client.delete(f"{API}/machines/{copy}").status_code == 200
        snapshot_id = forked.json()["snapshot"]["id"]
        assert client.delete(f"{API}/snapshots/{snapshot_id}").status_code == 200
        assert client.delete(f"{API}/machines/{machine_id}").status_code == 200


def test_a_paused_machine_still_counts_against_its_pools_maximum(
    live_client: TestClient,
) -> None:
    client = live_client
    body = {"template": {}, "min_ready": 1, "max_machines": 1}
    assert client.put(f"{API}/pools/one", json=body).status_code in (200, 201)
    machine_id = wait_state_of_pool(client, "one")["id"]
    assert client.post(f"{API}/machines/{machine_id}/pause").status_code == 200
    time.sleep(2.0)  # several pool ticks (0.3 s): none may add a machine past the maximum
    pooled = client.get(f"{API}/machines", params={"pool": "one"}).json()["data"]
    assert [(m["id"], m["state"]) for m in pooled] == [(machine_id, "paused")]
    pool = client.get(f"{API}/pools/one").json()
    assert pool["counts"]["paused"] == 1, pool
    assert client.post(f"{API}/machines/{machine_id}/resume").json()["state"] == "ready"
