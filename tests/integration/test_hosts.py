"""A fleet across hosts, on three real nested Docker engines (``nested_hosts.py``).

One module-scoped set of three test hosts serves every test (copying the runner image into
a nested engine takes ~14 s each). The module's controller cordons ``local`` so that every
machine it makes goes to a nested host; each test removes the machines it made.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import docker
import httpx
import paramiko
import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.settings import Settings
from controller.store.models import Role
from tests.conftest import ROOT, TEST_LABEL, TEST_RUN_ID
from tests.integration.conftest import (
    ControllerProcess,
    PgCluster,
    issue_token,
    wait_json,
    wait_state,
)
from tests.integration.nested_hosts import NestedHost, NestedHosts

SHOPFLOOR = str(ROOT / ".venv" / "bin" / "shopfloor")
HOSTS = ("h0", "h1", "h2")
PER_HOST = 4
CAPACITY = {"cpus": 2.0, "memory_mb": 2048, "machines": PER_HOST}
SMALL = {"cpus": 0.5, "memory_mb": 512}


@pytest.fixture(scope="module")
def nested() -> Iterator[list[NestedHost]]:
    """Three nested engines, removed (containers, volumes, socket folders) afterwards."""
    made = NestedHosts({TEST_LABEL: TEST_RUN_ID})
    try:
        yield made.start(len(HOSTS))
    finally:
        made.close()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, runner_image: str, nested: list[NestedHost]
) -> Iterator[TestClient]:
    """A controller (loops on) with the three hosts registered and ``local`` cordoned; it
    waits until each host has the runner image."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("fleet") / "data",
        extra_labels=f"{TEST_LABEL}={TEST_RUN_ID}",
        runner_image=runner_image,
        reconcile_interval_s=0.5,
        orphan_grace_s=0,
        pool_interval_s=0.3,
        lease_reap_interval_s=0.3,
        host_heartbeat_interval_s=0.5,
        host_timeout_s=5,
        host_connect_timeout_s=2,
    )
    with TestClient(create_app(settings, background=True)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        assert client.post("/api/v1/hosts/local/cordon").status_code == 200
        for host in nested:
            body = {"url": host.url, "labels": {"zone": host.name}, "capacity": CAPACITY}
            answer = client.put(f"/api/v1/hosts/{host.name}", json=body)
            assert answer.status_code == 200, answer.text
        for host in nested:
            wait_json(
                client,
                f"/api/v1/hosts/{host.name}",
                lambda h: h["images"].get(runner_image, {}).get("state") in ("ready", "failed"),
                f"the runner image on {host.name}",
                timeout_s=300,
            )
            image = client.get(f"/api/v1/hosts/{host.name}").json()["images"][runner_image]
            assert image["state"] == "ready", image
        yield client


def destroy_all(client: TestClient) -> None:
    deadline = time.monotonic() + 120
    while True:
        left = client.get("/api/v1/machines").json()["data"]
        if not left:
            return
        assert time.monotonic() < deadline, f"machines left behind: {left}"
        for machine in left:
            client.delete(f"/api/v1/machines/{machine['id']}")  # a leased one: next round
        time.sleep(0.3)


@pytest.fixture
def clean_fleet(fleet: TestClient) -> Iterator[TestClient]:
    try:
        yield fleet
    finally:
        for pool in fleet.get("/api/v1/pools").json()["data"]:
            emptied = fleet.put(  # no pool may refill what the next test needs
                f"/api/v1/pools/{pool['name']}",
                json={"template": pool["template"], "min_ready": 0, "max_machines": 1},
            )
            assert emptied.status_code == 200, emptied.text
        destroy_all(fleet)
        for name in HOSTS:
            fleet.post(f"/api/v1/hosts/{name}/uncordon")


def engine_containers(host: NestedHost) -> list[Any]:
    with closing(host.client()) as engine:
        return list(engine.containers.list(all=True, filters={"label": TEST_LABEL}))


def test_a_host_that_is_not_an_engine_is_refused_with_the_reason(
    fleet: TestClient, tmp_path: Path
) -> None:
    missing = fleet.put("/api/v1/hosts/nowhere", json={"url": f"unix://{tmp_path}/no.sock"})
    assert missing.status_code == 422, missing.text
    assert "does not answer" in missing.json()["detail"] or "cannot use" in missing.json()["detail"]
    assert str(tmp_path) in missing.json()["detail"]

    scheme = fleet.put("/api/v1/hosts/nowhere", json={"url": "http://example.com"})
    assert scheme.status_code == 422
    assert "unix://, ssh:// or tcp://" in scheme.json()["detail"]

    plain_tcp = fleet.put("/api/v1/hosts/nowhere", json={"url": "tcp://127.0.0.1:2376"})
    assert plain_tcp.status_code == 422
    assert "TLS" in plain_tcp.json()["detail"]

    tls = {"ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "c.pem"), "key": "/nope"}
    bad_tls = fleet.put("/api/v1/hosts/nowhere", json={"url": "tcp://127.0.0.1:2376", "tls": tls})
    assert bad_tls.status_code == 422, bad_tls.text
    assert "ca.pem" in bad_tls.json()["detail"]
    assert "does not exist" in bad_tls.json()["detail"]

    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("not a certificate\n")
    tls = {k: str(tmp_path / f) for k, f in (("ca", "ca.pem"), ("cert", "c.pem"), ("key", "k.pem"))}
    junk_tls = fleet.put("/api/v1/hosts/nowhere", json={"url": "tcp://127.0.0.1:1", "tls": tls})
    assert junk_tls.status_code == 422, junk_tls.text

    assert fleet.get("/api/v1/hosts/nowhere").status_code == 404  # nothing was recorded
    names = [h["name"] for h in fleet.get("/api/v1/hosts").json()["data"]]
    assert names == ["h0", "h1", "h2", "local"]


def test_hosts_list_shows_state_capacity_and_engine(fleet: TestClient, runner_image: str) -> None:
    listed = fleet.get("/api/v1/hosts").json()
    assert listed["count"] == 4
    by_name = {h["name"]: h for h in listed["data"]}
    assert by_name["local"]["state"] == "cordoned"
    assert by_name["local"]["disk_limits"] is True
    for name in HOSTS:
        host = by_name[name]
        assert host["state"] == "ready"
        assert host["engine_version"]
        assert host["last_heartbeat"]
        assert host["capacity"]["machines"] == PER_HOST
        assert host["disk_limits"] is False
        assert host["images"][runner_image]["state"] == "ready"


@pytest.mark.timeout(600)
def test_placement_respects_capacity_and_labels_under_100_concurrent_creates(
    clean_fleet: TestClient, nested: list[NestedHost]
) -> None:
    fleet = clean_fleet

    def create(_: int) -> httpx.Response:
        return fleet.post("/api/v1/machines", json=SMALL)

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(create, range(100)))
    made = [a.json() for a in answers if a.status_code == 201]
    refused = [a for a in answers if a.status_code != 201]
    assert len(made) == PER_HOST * len(HOSTS), [a.text for a in refused[:3]]
    assert {a.status_code for a in refused} == {429}
    assert "no host has room" in refused[0].json()["detail"]
    assert "h0: cpus: 2 of 2 reserved, the machine needs 0.5" in refused[0].json()["detail"]
    assert Counter(m["host"] for m in made) == dict.fromkeys(HOSTS, PER_HOST)
    for machine in made:
        assert wait_state(fleet, machine["id"], {"ready", "failed"}, 300)["state"] == "ready"
    for host in nested:  # each engine holds what the database says it holds
        placed = {m["id"] for m in made if m["host"] == host.name}
        on_engine = {c.labels["shopfloor.machine"] for c in engine_containers(host)}
        assert placed <= on_engine
    hosts = {h["name"]: h for h in fleet.get("/api/v1/hosts").json()["data"]}
    for name in HOSTS:
        assert hosts[name]["used"]["machines"] == PER_HOST
        assert hosts[name]["free"]["machines"] == 0
        assert hosts[name]["used"]["cpus"] <= CAPACITY["cpus"]

    labelled = fleet.post("/api/v1/machines", json={**SMALL, "host_labels": {"zone": "h9"}})
    assert labelled.status_code == 409, labelled.text
    assert "lacks labels zone=h9" in labelled.json()["detail"]


def test_spread_and_labels_place_each_machine(clean_fleet: TestClient) -> None:
    fleet = clean_fleet
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: fleet.post("/api/v1/machines", json=SMALL), range(6)))
    assert all(a.status_code == 201 for a in answers), [a.text for a in answers]
    assert Counter(a.json()["host"] for a in answers) == dict.fromkeys(HOSTS, 2)
    pinned = fleet.post("/api/v1/machines", json={**SMALL, "host_labels": {"zone": "h1"}})
    assert pinned.status_code == 201
    assert pinned.json()["host"] == "h1"


def test_cordon_keeps_new_machines_away(clean_fleet: TestClient) -> None:
    fleet = clean_fleet
    cordoned = fleet.post("/api/v1/hosts/h0/cordon")
    assert cordoned.status_code == 200
    assert cordoned.json()["state"] == "cordoned"
    hosts = [fleet.post("/api/v1/machines", json=SMALL).json()["host"] for _ in range(4)]
    assert "h0" not in hosts
    assert Counter(hosts) == {"h1": 2, "h2": 2}
    only_h0 = fleet.post("/api/v1/machines", json={**SMALL, "host_labels": {"zone": "h0"}})
    assert only_h0.status_code == 409
    assert "h0: cordoned" in only_h0.json()["detail"]
    assert fleet.post("/api/v1/hosts/h0/uncordon").json()["state"] == "ready"
    again = fleet.post("/api/v1/machines", json={**SMALL, "host_labels": {"zone": "h0"}})
    assert again.status_code == 201
    assert again.json()["host"] == "h0"


def test_a_host_with_machines_cannot_be_removed(clean_fleet: TestClient) -> None:
    fleet = clean_fleet
    machine = fleet.post("/api/v1/machines", json={**SMALL, "host_labels": {"zone": "h2"}})
    refused = fleet.delete("/api/v1/hosts/h2")
    assert refused.status_code == 409
    assert "still has 1 machines" in refused.json()["detail"]
    assert fleet.delete("/api/v1/hosts/local").status_code == 409
    fleet.delete(f"/api/v1/machines/{machine.json()['id']}")


@pytest.mark.timeout(600)
def test_a_pool_of_six_spreads_two_two_two(clean_fleet: TestClient) -> None:
    fleet = clean_fleet
    body = {"template": SMALL, "min_ready": 6, "max_machines": 6}
    assert fleet.put("/api/v1/pools/spread", json=body).status_code == 200
    ready = wait_json(
        fleet,
        "/api/v1/machines?pool=spread&state=ready",
        lambda page: page["count"] == 6,
        "six ready machines in the pool",
        timeout_s=300,
    )
    assert Counter(m["host"] for m in ready["data"]) == dict.fromkeys(HOSTS, 2)


def test_exec_sessions_and_files_reach_a_machine_on_a_nested_host(
    clean_fleet: TestClient, nested: list[NestedHost], sample_repo: Path
) -> None:
    fleet = clean_fleet
    body = {**SMALL, "repo": str(sample_repo), "host_labels": {"zone": "h1"}}
    made = fleet.post("/api/v1/machines?wait=true", json=body)
    assert made.status_code == 201, made.text
    machine = made.json()
    assert machine["state"] == "ready", machine
    assert machine["host"] == "h1"
    assert machine["commit"]
    machine_id = machine["id"]
    on_h1 = {c.labels["shopfloor.machine"] for c in engine_containers(nested[1])}
    assert machine_id in on_h1
    with closing(docker.from_env()) as local:  # not on this host's engine
        assert not local.containers.list(all=True, filters={"name": f"shopfloor-{machine_id}"})

    ran = fleet.post(f"/api/v1/machines/{machine_id}/exec", json={"cmd": "id -un; ls"})
    assert ran.status_code == 200, ran.text
    assert ran.json()["stdout"].split()[0] == "runner"
    assert machine["workdir"].endswith("sample-app")

    session = fleet.post(f"/api/v1/machines/{machine_id}/sessions").json()["id"]
    first = fleet.post(
        f"/api/v1/machines/{machine_id}/sessions/{session}/run", json={"cmd": "cd /tmp; export X=1"}
    )
    assert first.status_code == 200, first.text
    second = fleet.post(
        f"/api/v1/machines/{machine_id}/sessions/{session}/run", json={"cmd": "echo $PWD $X"}
    )
    assert second.status_code == 200, second.text
    assert second.json()["output"].strip() == "/tmp 1"

    written = fleet.put(
        f"/api/v1/machines/{machine_id}/files", params={"path": "hello.txt"}, content=b"from afar"
    )
    assert written.status_code == 200, written.text
    read = fleet.get(f"/api/v1/machines/{machine_id}/files", params={"path": "hello.txt"})
    assert read.content == b"from afar"

    serve = (
        "mkdir -p /tmp/site && echo far > /tmp/site/index.html && cd /tmp/site && "
        "setsid nohup python3 -m http.server 8124 --bind 127.0.0.1 >/dev/null 2>&1 & "
        "for i in $(seq 100); do python3 -c 'import socket; "
        'socket.create_connection(("127.0.0.1", 8124))\' 2>/dev/null && exit 0; sleep 0.1; done; '
        "exit 1"
    )
    started = fleet.post(f"/api/v1/machines/{machine_id}/exec", json={"cmd": serve})
    assert started.json()["exit_code"] == 0, started.text
    forwarded = fleet.post(f"/api/v1/machines/{machine_id}/ports", json={"port": 8124})
    assert forwarded.status_code == 201, forwarded.text
    page = httpx.get(f"{forwarded.json()['url']}/index.html", timeout=30)
    assert page.text == "far\n"


def test_a_machine_on_a_nested_host_is_snapshotted_and_forked_on_that_host(
    clean_fleet: TestClient, nested: list[NestedHost]
) -> None:
    """Snapshot and fork go to the machine's own engine (a whole copy there: the
    copy-on-write disks are the controller's host's); the copies start on that host."""
    fleet = clean_fleet
    made = fleet.post("/api/v1/machines?wait=true", json={**SMALL, "host_labels": {"zone": "h2"}})
    assert made.status_code == 201, made.text
    source = made.json()["id"]
    wrote = fleet.post(
        f"/api/v1/machines/{source}/exec", json={"cmd": "echo far-state > /workspace/kept"}
    )
    assert wrote.json()["exit_code"] == 0, wrote.text
    forked = fleet.post(f"/api/v1/machines/{source}/fork", json={"count": 2})
    assert forked.status_code == 201, forked.text
    body = forked.json()
    copies = [m["id"] for m in body["machines"]]
    snap = fleet.get(f"/api/v1/snapshots/{body['snapshot']['id']}").json()
    assert snap["shared_blocks"] is False  # a whole copy on a remote engine, and it says so
    for copy in copies:
        machine = fleet.get(f"/api/v1/machines/{copy}").json()
        assert (machine["host"], machine["state"]) == ("h2", "ready"), machine
        read = fleet.post(f"/api/v1/machines/{copy}/exec", json={"cmd": "cat /workspace/kept"})
        assert read.json()["stdout"] == "far-state\n", read.text
    on_h2 = {c.labels["shopfloor.machine"] for c in engine_containers(nested[2])}
    assert set(copies) <= on_h2
    with closing(docker.from_env()) as local:  # nothing of it on the controller's engine
        assert not local.images.list(filters={"label": f"shopfloor.snapshot={snap['id']}"})
    for copy in copies:
        assert fleet.delete(f"/api/v1/machines/{copy}").status_code == 200
    assert fleet.delete(f"/api/v1/snapshots/{snap['id']}").status_code == 200
    with closing(nested[2].client()) as engine:  # its parts went with it, on its host
        assert not engine.images.list(filters={"label": f"shopfloor.snapshot={snap['id']}"})


def by_host(machines: list[dict[str, Any]]) -> Counter[str]:
    return Counter(m["host"] for m in machines)


def pool_machines(fleet: TestClient, pool: str, state: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = fleet.get(
        "/api/v1/machines", params={"pool": pool, "state": state}
    ).json()["data"]
    return found


@pytest.mark.timeout(600)
def test_drain_moves_ready_machines_away_and_lets_a_leased_one_finish(
    clean_fleet: TestClient,
) -> None:
    fleet = clean_fleet
    body = {"template": SMALL, "min_ready": 3, "max_machines": 3, "reset": "keep"}
    assert fleet.put("/api/v1/pools/drainer", json=body).status_code == 200
    wait_json(
        fleet,
        "/api/v1/machines?pool=drainer&state=ready",
        lambda page: page["count"] == 3,
        "three ready machines",
        timeout_s=300,
    )
    ready = pool_machines(fleet, "drainer", "ready")
    assert by_host(ready) == dict.fromkeys(HOSTS, 1)
    on_h0 = next(m for m in ready if m["host"] == "h0")
    lease = fleet.post("/api/v1/leases", json={"machine_id": on_h0["id"], "holder": "drain-test"})
    assert lease.status_code == 201, lease.text

    for name in ("h0", "h1"):
        assert fleet.post(f"/api/v1/hosts/{name}/drain").json()["state"] == "draining"
    moved = wait_json(
        fleet,
        "/api/v1/machines?pool=drainer&state=ready",
        lambda page: by_host(page["data"]) == {"h2": 2},
        "the ready machines to leave the draining hosts",
        timeout_s=300,
    )
    assert by_host(moved["data"]) == {"h2": 2}
    assert fleet.get(f"/api/v1/machines/{on_h0['id']}").json()["state"] == "leased"

    token = {"X-Lease-Token": lease.json()["token"]}
    assert fleet.delete(f"/api/v1/leases/{lease.json()['id']}", headers=token).status_code == 200
    wait_json(
        fleet,
        "/api/v1/machines?pool=drainer&state=ready",
        lambda page: by_host(page["data"]) == {"h2": 3},
        "the returned machine to leave its draining host too",
        timeout_s=300,
    )
    assert fleet.get(f"/api/v1/machines/{on_h0['id']}").json()["state"] == "destroyed"
    hosts = {h["name"]: h for h in fleet.get("/api/v1/hosts").json()["data"]}
    assert hosts["h0"]["used"]["machines"] == 0
    assert hosts["h1"]["used"]["machines"] == 0


def test_the_cli_adds_lists_cordons_drains_and_removes_hosts(
    tmp_path: Path, runner_image: str, nested: list[NestedHost]
) -> None:
    controller = ControllerProcess(tmp_path / "data", runner_image).start()
    try:
        env = {
            **controller.env,
            "SHOPFLOOR_URL": controller.url,
            "SHOPFLOOR_TOKEN": controller.token(Role.ops),
            "COLUMNS": "250",
        }

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [SHOPFLOOR, "hosts", *argv], env=env, capture_output=True, text=True, timeout=120
            )

        added = cli(
            "add", "far", "--engine", nested[0].url, "--label", "zone=far", "--machines", "2"
        )
        assert added.returncode == 0, added.stderr
        assert "far" in added.stdout
        assert "ready" in added.stdout
        listed = cli("ls")
        assert "far" in listed.stdout
        assert "local" in listed.stdout
        assert "zone=far" in listed.stdout
        assert "machines 0/2" in listed.stdout
        assert cli("cordon", "far").stdout.strip() == "far: cordoned"
        assert cli("drain", "far").stdout.strip() == "far: draining"
        assert cli("uncordon", "far").stdout.strip() == "far: ready"
        bad = cli("add", "bad", "--engine", f"unix://{tmp_path}/none.sock")
        assert bad.returncode == 1
        assert "422" in bad.stderr
        assert "none.sock" in bad.stderr
        assert cli("rm", "far").stdout.strip() == "far: removed"
        assert "far" not in cli("ls").stdout
    finally:
        controller.stop()


@pytest.mark.timeout(600)
def test_a_host_that_stops_answering_loses_its_machines_and_recovers_without_duplicates(
    clean_fleet: TestClient, nested: list[NestedHost]
) -> None:
    fleet = clean_fleet
    made = fleet.post("/api/v1/machines?wait=true", json={**SMALL, "host_labels": {"zone": "h0"}})
    assert made.json()["state"] == "ready", made.text
    machine_id = made.json()["id"]
    lease = fleet.post("/api/v1/leases", json={"machine_id": machine_id, "holder": "loss-test"})
    assert lease.status_code == 201, lease.text
    host = nested[0]
    NestedHosts.pause(host)
    try:
        gone = wait_json(
            fleet,
            "/api/v1/hosts/h0",
            lambda h: h["state"] == "unreachable",
            "h0 to be unreachable",
            timeout_s=60,
        )
        assert "has not answered" in gone["reason"]
        lost = fleet.get(f"/api/v1/machines/{machine_id}").json()
        assert lost["state"] == "lost"
        assert "h0 became unreachable" in lost["reason"]
        renew = fleet.post(
            f"/api/v1/leases/{lease.json()['id']}/renew",
            headers={"X-Lease-Token": lease.json()["token"]},
            json={},
        )
        assert renew.status_code == 409
        assert "h0 became unreachable" in renew.json()["detail"]
        elsewhere = fleet.post("/api/v1/machines", json=SMALL)
        assert elsewhere.json()["host"] in ("h1", "h2")
        only_h0 = fleet.post("/api/v1/machines", json={**SMALL, "host_labels": {"zone": "h0"}})
        assert only_h0.status_code == 409
        assert "h0: unreachable" in only_h0.json()["detail"]
        cordoned = fleet.post("/api/v1/hosts/h0/cordon").json()
        assert cordoned["state"] == "unreachable"  # it applies once the engine answers
    finally:
        NestedHosts.unpause(host)
    wait_json(fleet, "/api/v1/hosts/h0", lambda h: h["state"] == "cordoned", "h0 back", 60)
    deadline = time.monotonic() + 60
    while engine_containers(host) and time.monotonic() < deadline:
        time.sleep(0.5)  # reconcile removes what is left of the lost machine
    assert engine_containers(host) == []
    assert fleet.get(f"/api/v1/machines/{machine_id}").json()["state"] == "lost"


@pytest.mark.timeout(600)
def test_a_host_added_while_two_controllers_run_is_used_by_both_without_overbooking(
    tmp_path: Path, runner_image: str, nested: list[NestedHost], pg_cluster: PgCluster
) -> None:
    env = {"SHOPFLOOR_DATABASE_URL": pg_cluster.url, "SHOPFLOOR_HOST_HEARTBEAT_INTERVAL_S": "0.5"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = ControllerProcess(tmp_path / "a" / "data", runner_image, **env).start()
    second = ControllerProcess(tmp_path / "b" / "data", runner_image, **env).start()
    try:
        ops = {"Authorization": f"Bearer {first.token(Role.ops)}"}
        one = httpx.Client(base_url=first.url, headers=ops, timeout=120)
        two = httpx.Client(base_url=second.url, headers=ops, timeout=120)
        assert one.post("/api/v1/hosts/local/cordon").status_code == 200
        host = nested[2]
        body = {"url": host.url, "labels": {"zone": "shared"}, "capacity": {"machines": 3}}
        assert one.put("/api/v1/hosts/shared", json=body).status_code == 200

        def create(i: int) -> httpx.Response:
            return (one if i % 2 else two).post("/api/v1/machines", json=SMALL)

        with ThreadPoolExecutor(max_workers=10) as pool:
            answers = list(pool.map(create, range(20)))
        made = [a.json() for a in answers if a.status_code == 201]
        assert len(made) == 3, [a.text for a in answers if a.status_code != 201][:2]
        assert {a.status_code for a in answers if a.status_code != 201} == {429}
        assert {m["host"] for m in made} == {"shared"}
        by = Counter(i % 2 for i, a in enumerate(answers) if a.status_code == 201)
        assert len(by) == 2 or len(made) == 3  # whichever asked, the total holds
        for machine in made:
            state = wait_state(two, machine["id"], {"ready", "failed"}, 300)
            assert state["state"] == "ready", state
        shown = two.get("/api/v1/hosts/shared").json()
        assert shown["used"]["machines"] == 3
        assert shown["free"]["machines"] == 0
        for machine in made:
            assert one.delete(f"/api/v1/machines/{machine['id']}").status_code == 200
    finally:
        first.stop()
        second.stop()


def test_nested_hosts_run_engines_reachable_on_unix_sockets(nested: list[NestedHost]) -> None:
    for host in nested:
        assert os.path.exists(host.folder / "docker.sock")
        with closing(host.client()) as engine:
            assert engine.ping()
            assert engine.info()["Driver"] == "overlay2"


def test_a_host_reached_over_ssh_runs_machines_and_an_unknown_host_key_is_refused(
    tmp_path: Path, runner_image: str
) -> None:
    """ssh://root@127.0.0.1:<port> of a nested host running sshd: the docker SDK over
    paramiko (no docker CLI on the controller's side), with the controller's own ~/.ssh."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    key = paramiko.RSAKey.generate(2048)
    key.write_private_key_file(str(home / ".ssh" / "id_rsa"))
    made = NestedHosts({TEST_LABEL: TEST_RUN_ID}, prefix="sf-ssh-host")
    controller = ControllerProcess(tmp_path / "data", runner_image, HOME=str(home))
    try:
        (host,) = made.start(1, ssh=True)
        port, known = made.enable_ssh(host, f"{key.get_name()} {key.get_base64()}")
        controller.start()
        ops = {"Authorization": f"Bearer {controller.token(Role.ops)}"}
        http = httpx.Client(base_url=controller.url, headers=ops, timeout=300)
        url = f"ssh://root@127.0.0.1:{port}"

        unknown = http.put("/api/v1/hosts/far", json={"url": url, "labels": {"via": "ssh"}})
        assert unknown.status_code == 422, unknown.text
        assert "known_hosts" in unknown.json()["detail"]

        (home / ".ssh" / "known_hosts").write_text(known + "\n")
        added = http.put("/api/v1/hosts/far", json={"url": url, "labels": {"via": "ssh"}})
        assert added.status_code == 200, added.text
        assert added.json()["engine_version"]
        body = {**SMALL, "host_labels": {"via": "ssh"}}
        machine = http.post("/api/v1/machines?wait=true", json=body).json()
        assert machine["state"] == "ready", machine
        assert machine["host"] == "far"
        ran = http.post(f"/api/v1/machines/{machine['id']}/exec", json={"cmd": "echo over ssh"})
        assert ran.json()["stdout"] == "over ssh\n"
        assert http.delete(f"/api/v1/machines/{machine['id']}").status_code == 200
    finally:
        controller.stop()
        made.close()


@pytest.mark.timeout(600)
def test_a_run_whose_host_stops_answering_moves_and_finishes_on_another_host(
    clean_fleet: TestClient, nested: list[NestedHost], sample_repo: Path
) -> None:
    fleet = clean_fleet
    template = {**SMALL, "repo": str(sample_repo)}
    body = {"template": template, "min_ready": 2, "max_machines": 3, "reset": "keep"}
    assert fleet.put("/api/v1/pools/mover", json=body).status_code == 200
    wait_json(
        fleet,
        "/api/v1/machines?pool=mover&state=ready",
        lambda page: page["count"] == 2,
        "two ready machines",
        timeout_s=300,
    )
    ctx = "/workspace/.shopfloor"
    stages = [
        {"name": "plan", "agent": "command", "with": {"cmd": f"echo planned > {ctx}/plan.md"}},
        {"name": "implement", "agent": "command", "with": {"cmd": "sleep 15; echo done"}},
    ]
    run_body = {"task": "move", "repo": str(sample_repo), "pool": "mover", "stages": stages}
    created = fleet.post("/api/v1/runs", json=run_body)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    running = wait_json(
        fleet,
        f"/api/v1/runs/{run_id}",
        lambda r: r["stages"][1]["status"] == "running",
        "the implement stage to start",
    )
    first = fleet.get(f"/api/v1/machines/{running['machine_id']}").json()
    host = next(h for h in nested if h.name == first["host"])
    NestedHosts.pause(host)
    try:
        ended = wait_json(
            fleet,
            f"/api/v1/runs/{run_id}",
            lambda r: r["status"] not in ("queued", "running"),
            "the run to end",
            timeout_s=300,
        )
        assert ended["status"] == "passed", ended
        assert ended["context_recreations"] == 1
        assert ended["machine_id"] != first["id"]
        moved = fleet.get(f"/api/v1/machines/{ended['machine_id']}").json()
        assert moved["host"] != first["host"]
        lost = fleet.get(f"/api/v1/machines/{first['id']}").json()
        assert lost["state"] == "lost"
        assert f"{first['host']} became unreachable" in lost["reason"]
    finally:
        NestedHosts.unpause(host)
    wait_json(fleet, f"/api/v1/hosts/{host.name}", lambda h: h["state"] == "ready", "back", 60)
