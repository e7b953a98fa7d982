"""Snapshots and forks as a hostile agent sees them: a lease is a boundary (issue 15).

What an agent snapshots or forks under its lease is its own: other agents neither see nor
use nor delete it, and a fork never reaches another holder (it is leased to the agent that
made it and destroyed when that lease ends). Every agent's share has a limit (429).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.settings import Settings
from tests.integration.conftest import wait_state
from tests.integration.test_fenced_channels import agent, lease, token_header
from tests.integration.test_snapshots import API, assert_no_parts, ctl_of, new_machine, sh


def leased_machine(client: TestClient, me: dict[str, str]) -> tuple[str, dict[str, Any]]:
    machine_id = new_machine(client)
    return machine_id, lease(client, me, machine_id)


def test_an_agents_snapshot_is_seen_and_deleted_only_by_it_and_ops(
    client: TestClient, settings: Settings
) -> None:
    alice, mallory = agent(settings), agent(settings)
    machine_id, granted = leased_machine(client, alice)
    made = client.post(
        f"{API}/machines/{machine_id}/snapshots",
        json={"name": "alice-secret-name", "labels": {"customer": "acme"}},
        headers={**alice, **token_header(granted["token"])},
    )
    assert made.status_code == 201, made.text
    snap_id = made.json()["id"]

    listed = client.get(f"{API}/snapshots", headers=mallory).json()
    assert listed == {"data": [], "count": 0}
    shown = client.get(f"{API}/snapshots/{snap_id}", headers=mallory)
    assert shown.status_code == 404, shown.text
    assert client.delete(f"{API}/snapshots/{snap_id}", headers=mallory).status_code == 404
    mallorys_machine = client.post(f"{API}/machines", json={"snapshot": snap_id}, headers=mallory)
    assert mallorys_machine.status_code == 403, mallorys_machine.text

    mine = client.get(f"{API}/snapshots", headers=alice).json()
    assert [s["id"] for s in mine["data"]] == [snap_id]
    assert client.get(f"{API}/snapshots/{snap_id}", headers=alice).status_code == 200
    assert [s["id"] for s in client.get(f"{API}/snapshots").json()["data"]] == [snap_id]

    deleted = client.delete(f"{API}/snapshots/{snap_id}", headers=alice)
    assert deleted.status_code == 200, deleted.text
    assert_no_parts(client)


def test_an_agent_may_not_pin_its_snapshots_past_retention(
    client: TestClient, settings: Settings
) -> None:
    me = agent(settings)
    machine_id, granted = leased_machine(client, me)
    pinned = client.post(
        f"{API}/machines/{machine_id}/snapshots",
        json={"pinned": True},
        headers={**me, **token_header(granted["token"])},
    )
    assert pinned.status_code == 403, pinned.text
    assert "pin" in pinned.json()["detail"]
    assert_no_parts(client)


def test_an_agents_fork_is_leased_to_it_alone_and_destroyed_when_that_lease_ends(
    client: TestClient, settings: Settings
) -> None:
    alice, mallory = agent(settings), agent(settings)
    machine_id, granted = leased_machine(client, alice)
    held = {**alice, **token_header(granted["token"])}
    sh(client, machine_id, "echo alice-secret > /workspace/secret", **held)
    forked = client.post(f"{API}/machines/{machine_id}/fork", json={"count": 2}, headers=held)
    assert forked.status_code == 201, forked.text
    body = forked.json()
    copies = [m["id"] for m in body["machines"]]
    assert [m["state"] for m in body["machines"]] == ["leased", "leased"]
    fork_leases = {g["machine_id"]: g for g in body["leases"]}
    assert set(fork_leases) == set(copies)

    for copy in copies:  # another agent cannot take the copy of alice's workspace
        taken = client.post(
            f"{API}/leases",
            json={"holder": "mallory", "machine_id": copy, "ttl_s": 30, "wait_s": 0},
            headers=mallory,
        )
        assert taken.status_code == 403, taken.text
        assert "fork" in taken.json()["detail"]
        stolen = client.post(
            f"{API}/machines/{copy}/exec",
            json={"cmd": "cat /workspace/secret"},
            headers={**mallory, **token_header(fork_leases[copy]["token"])},
        )
        assert stolen.status_code == 403, stolen.text

    first = copies[0]
    own = {**alice, **token_header(fork_leases[first]["token"])}
    assert sh(client, first, "cat /workspace/secret", **own)["stdout"] == "alice-secret\n"
    released = client.delete(f"{API}/leases/{fork_leases[first]['id']}", headers=alice)
    assert released.status_code == 200, released.text
    assert wait_state(client, first, {"destroyed"})["state"] == "destroyed"
    # the source's lease ending ends nothing of the other fork: it has its own lease
    assert client.get(f"{API}/machines/{copies[1]}").json()["state"] == "leased"
    client.delete(f"{API}/leases/{fork_leases[copies[1]]['id']}", headers=alice)
    assert wait_state(client, copies[1], {"destroyed"})["state"] == "destroyed"
    snap_id = body["snapshot"]["id"]
    assert client.get(f"{API}/snapshots/{snap_id}", headers=mallory).status_code == 404
    assert client.delete(f"{API}/snapshots/{snap_id}", headers=alice).status_code == 200
    assert_no_parts(client)


def test_an_agents_snapshots_and_forks_have_limits(
    make_settings: Any,
) -> None:
    from controller.api.app import create_app
    from controller.store.models import Role
    from tests.integration.conftest import issue_token

    settings = make_settings(snapshots_per_token=1, forks_per_token=1)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        me = agent(settings)
        machine_id, granted = leased_machine(client, me)
        held = {**me, **token_header(granted["token"])}
        url = f"{API}/machines/{machine_id}"
        assert client.post(f"{url}/snapshots", json={}, headers=held).status_code == 201
        second = client.post(f"{url}/snapshots", json={}, headers=held)
        assert second.status_code == 429, second.text
        assert "SHOPFLOOR_SNAPSHOTS_PER_TOKEN" in second.json()["detail"]
        many = client.post(f"{url}/fork", json={"count": 2}, headers=held)
        assert many.status_code == 429, many.text
        assert "SHOPFLOOR_FORKS_PER_TOKEN" in many.json()["detail"]
        assert client.post(f"{API}/machines/{machine_id}/snapshots", json={}).status_code == 201
        listed = client.get(f"{API}/snapshots").json()["data"]
        assert len(listed) == 2  # ops are not counted against the agent's share
        metrics = client.get("/metrics").text
        assert 'shopfloor_limit_refusals_total{limit="snapshots_per_token"} 1.0' in metrics
        assert 'shopfloor_limit_refusals_total{limit="forks_per_token"} 1.0' in metrics
        assert 'shopfloor_limit{limit="forks_per_token"} 1.0' in metrics
        for snap in listed:
            client.delete(f"{API}/snapshots/{snap['id']}")
        assert_no_parts(client)


def test_racing_pause_resume_snapshot_and_release_leaves_a_consistent_machine(
    client: TestClient, settings: Settings
) -> None:
    me = agent(settings)
    machine_id, granted = leased_machine(client, me)
    held = {**me, **token_header(granted["token"])}
    url = f"{API}/machines/{machine_id}"
    answers: list[int] = []

    def hammer(action: str) -> None:
        for _ in range(4):
            body = {} if action == "snapshots" else None
            answers.append(client.post(f"{url}/{action}", json=body, headers=held).status_code)

    threads = [
        threading.Thread(target=hammer, args=(action,))
        for action in ("pause", "resume", "snapshots", "pause", "resume", "snapshots")
    ]
    for thread in threads:
        thread.start()
    client.delete(f"{API}/leases/{granted['id']}", headers=me)
    for thread in threads:
        thread.join()
    assert set(answers) <= {200, 201, 409}, answers
    ctl = ctl_of(client)
    machine = client.get(url).json()
    if machine["state"] == "paused":  # paused after the lease ended: the reaper thaws it
        from controller.services import leases

        leases.reap(ctl=ctl)
    machine = wait_state(client, machine_id, {"ready"})
    info = ctl.provider.inspect_container(f"shopfloor-{machine_id}")
    assert info is not None
    assert info.status == "running", info
    assert machine["paused_from"] is None
    for snap in client.get(f"{API}/snapshots").json()["data"]:
        assert snap["state"] == "ready"
        assert client.delete(f"{API}/snapshots/{snap['id']}").status_code == 200
    assert_no_parts(client)


def test_racing_pauses_and_resumes_leave_the_engine_as_the_record_says(
    client: TestClient,
) -> None:
    """A pause whose record a resume undid before the engine froze the machine must not
    freeze it after all (frozen, yet recorded ready: commands would hang)."""
    machine_id = new_machine(client)
    url = f"{API}/machines/{machine_id}"
    ctl = ctl_of(client)
    answers: list[int] = []

    def hammer(action: str) -> None:
        for _ in range(15):
            answers.append(client.post(f"{url}/{action}").status_code)

    for _ in range(3):
        threads = [threading.Thread(target=hammer, args=(a,)) for a in ("pause", "resume") * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        state = client.get(url).json()["state"]
        info = ctl.provider.inspect_container(f"shopfloor-{machine_id}")
        assert info is not None
        assert (state, info.status) in {("paused", "paused"), ("ready", "running")}, answers
    assert set(answers) <= {200, 409}, answers


def test_hostile_names_labels_and_ids_get_a_4xx_and_reach_no_engine_name(
    client: TestClient,
) -> None:
    machine_id = new_machine(client)
    for name in ("bad\x00name", "line\nbreak", "x" * 201):
        answer = client.post(f"{API}/machines/{machine_id}/snapshots", json={"name": name})
        assert answer.status_code == 422, answer.text
        assert "name" in answer.text
    odd = client.post(f"{API}/machines/{machine_id}/snapshots", json={"name": "é🙂" * 100})
    assert odd.status_code == 201, odd.text  # any printable text is a name
    assert odd.json()["image"] == f"shopfloor/snapshot:{odd.json()['id']}"  # never from it
    for bad in ("../../etc", "snap-x;docker rm -f", "x" * 5000):
        assert client.get(f"{API}/snapshots/{bad}").status_code in (404, 414)
        made = client.post(f"{API}/machines", json={"snapshot": bad})
        assert made.status_code == 422, made.text
    for labels in ({"../up": "x"}, {"k": "v\n"}, {"k": "v" * 257}):
        forked = client.post(f"{API}/machines/{machine_id}/fork", json={"labels": labels})
        assert forked.status_code == 422, forked.text
    raw = client.post(
        f"{API}/machines/{machine_id}/snapshots",
        content=b'{"name": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    assert raw.status_code in (400, 422), raw.text  # FastAPI: "error parsing the body"
    assert client.delete(f"{API}/snapshots/{odd.json()['id']}").status_code == 200
    assert_no_parts(client)


def test_a_fork_its_agent_was_never_granted_is_destroyed_by_the_reaper(
    client: TestClient,
) -> None:
    """A controller killed between starting an agent's fork and leasing it to the agent
    leaves a ready machine nobody may ever lease: the reaper destroys it."""
    from controller.services import leases, snapshots

    machine_id = new_machine(client)
    ctl = ctl_of(client)
    snap = client.post(f"{API}/machines/{machine_id}/snapshots", json={}).json()
    made = snapshots.start_machines(
        ctl=ctl, snapshot_id=snap["id"], count=1, forked_from=machine_id, reserved_for="t-gone"
    )
    fork_id = made[0].id
    assert client.get(f"{API}/machines/{fork_id}").json()["state"] == "ready"
    leases.reap(ctl=ctl)
    assert client.get(f"{API}/machines/{fork_id}").json()["state"] == "destroyed"
    assert ctl.provider.inspect_container(f"shopfloor-{fork_id}") is None
    assert client.delete(f"{API}/snapshots/{snap['id']}").status_code == 200
    assert_no_parts(client)


def test_an_agents_snapshots_have_a_size_share(make_settings: Any) -> None:
    from controller.api.app import create_app
    from controller.store.models import Role
    from tests.integration.conftest import issue_token

    settings = make_settings(snapshot_bytes_per_token=1)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        me = agent(settings)
        machine_id, granted = leased_machine(client, me)
        held = {**me, **token_header(granted["token"])}
        url = f"{API}/machines/{machine_id}/snapshots"
        assert client.post(url, json={}, headers=held).status_code == 201
        second = client.post(url, json={}, headers=held)
        assert second.status_code == 429, second.text
        assert "SHOPFLOOR_SNAPSHOT_BYTES_PER_TOKEN" in second.json()["detail"]
        for snap in client.get(f"{API}/snapshots").json()["data"]:
            client.delete(f"{API}/snapshots/{snap['id']}")
        assert_no_parts(client)


def test_a_stale_lease_token_opens_nothing_after_the_hand_over(
    client: TestClient, settings: Settings
) -> None:
    """Paused, then released: the machine is thawed and handed over; the old holder's
    token (and the old holder without one) can neither pause, resume, snapshot nor fork."""
    from controller.services import leases

    alice, bob = agent(settings), agent(settings)
    machine_id, old = leased_machine(client, alice)
    url = f"{API}/machines/{machine_id}"
    stale = {**alice, **token_header(old["token"])}
    assert client.post(f"{url}/pause", headers=stale).status_code == 200
    assert client.delete(f"{API}/leases/{old['id']}", headers=alice).status_code == 200
    leases.reap(ctl=ctl_of(client))  # thaws it; then it is handed over
    wait_state(client, machine_id, {"ready"})
    new = lease(client, bob, machine_id)
    for action, body in (("pause", None), ("resume", None), ("snapshots", {}), ("fork", {})):
        for headers in (stale, alice):
            answer = client.post(f"{url}/{action}", json=body, headers=headers)
            assert answer.status_code in (403, 409), (action, answer.text)
    assert client.get(url).json()["state"] == "leased"
    assert client.get(f"{API}/snapshots", headers=alice).json()["count"] == 0
    assert client.delete(f"{API}/leases/{new['id']}", headers=bob).status_code == 200
    assert_no_parts(client)


def test_on_postgresql_an_agents_fork_is_its_own(make_settings: Any, postgres_url: str) -> None:
    """The reserved grant and the reserved machine's reset policy in PostgreSQL's SQL."""
    from controller.api.app import create_app
    from controller.store.models import Role
    from tests.integration.conftest import issue_token

    settings = make_settings(database_url=postgres_url)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        alice, mallory = agent(settings), agent(settings)
        machine_id, granted = leased_machine(client, alice)
        held = {**alice, **token_header(granted["token"])}
        forked = client.post(f"{API}/machines/{machine_id}/fork", json={"count": 1}, headers=held)
        assert forked.status_code == 201, forked.text
        fork_lease = forked.json()["leases"][0]
        copy = fork_lease["machine_id"]
        assert client.get(f"{API}/machines/{copy}").json()["state"] == "leased"
        snap_id = forked.json()["snapshot"]["id"]
        assert client.get(f"{API}/snapshots", headers=mallory).json()["count"] == 0
        assert client.get(f"{API}/snapshots", headers=alice).json()["count"] == 1
        assert client.delete(f"{API}/leases/{fork_lease['id']}", headers=alice).status_code == 200
        assert wait_state(client, copy, {"destroyed"})["state"] == "destroyed"
        taken = client.post(
            f"{API}/leases",
            json={"holder": "mallory", "machine_id": copy, "ttl_s": 30, "wait_s": 0},
            headers=mallory,
        )
        assert taken.status_code in (403, 409), taken.text
        assert client.delete(f"{API}/snapshots/{snap_id}", headers=alice).status_code == 200
        client.delete(f"{API}/leases/{granted['id']}", headers=alice)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_racing_forks_stay_within_the_agents_fork_share(
    make_settings: Any, database: str, request: pytest.FixtureRequest
) -> None:
    from controller.api.app import create_app
    from controller.store.models import Role
    from tests.integration.conftest import issue_token

    url = {"database_url": request.getfixturevalue("postgres_url")} if database != "sqlite" else {}
    settings = make_settings(forks_per_token=2, **url)
    with TestClient(create_app(settings, background=False)) as client:
        client.headers["Authorization"] = f"Bearer {issue_token(settings, Role.ops)}"
        me = agent(settings)
        machine_id, granted = leased_machine(client, me)
        held = {**me, **token_header(granted["token"])}
        answers: list[Any] = []

        def one() -> None:
            answers.append(
                client.post(f"{API}/machines/{machine_id}/fork", json={"count": 1}, headers=held)
            )

        threads = [threading.Thread(target=one) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = sorted(a.status_code for a in answers)
        assert codes == [201, 201, 429, 429, 429], [a.text for a in answers]
        for answer in answers:
            for fork_lease in answer.json().get("leases", []):
                client.delete(f"{API}/leases/{fork_lease['id']}", headers=me)
                wait_state(client, fork_lease["machine_id"], {"destroyed"})
        for snap in client.get(f"{API}/snapshots").json()["data"]:
            assert client.delete(f"{API}/snapshots/{snap['id']}").status_code == 200
        assert_no_parts(client)


def test_racing_snapshots_forks_and_destroy_leave_no_half_snapshot(client: TestClient) -> None:
    """Snapshots and forks of a machine that ops destroy meanwhile: each either is whole
    (record ready, image and workspace copy there) or left nothing behind."""
    machine_id = new_machine(client)
    url = f"{API}/machines/{machine_id}"
    ctl = ctl_of(client)
    answers: list[Any] = []

    def snapshot() -> None:
        for _ in range(3):
            answers.append(client.post(f"{url}/snapshots", json={}))

    def fork() -> None:
        answers.append(client.post(f"{url}/fork", json={"count": 2}))

    def destroy() -> None:
        time.sleep(0.6)
        answers.append(client.delete(url))

    threads = [threading.Thread(target=f) for f in (snapshot, snapshot, fork, destroy)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {a.status_code for a in answers} <= {200, 201, 409, 502}, [a.text for a in answers]
    assert client.get(url).json()["state"] == "destroyed"
    listed = client.get(f"{API}/snapshots").json()["data"]
    copies = {c.name for c in ctl.provider.list_volume_snapshots({})}
    for snap in listed:
        assert snap["state"] == "ready", snap
        assert ctl.provider.image_info(snap["image"]) is not None, snap
        assert f"shopfloor-snap-{snap['id']}" in copies or snap["id"] in " ".join(copies), snap
    for answer in answers:
        if answer.status_code == 201 and "machines" in answer.json():
            for machine in answer.json()["machines"]:
                client.delete(f"{API}/machines/{machine['id']}")
    for snap in listed:
        assert client.delete(f"{API}/snapshots/{snap['id']}").status_code == 200
    assert_no_parts(client)


def test_a_snapshot_whose_record_is_cleaned_while_it_is_taken_leaves_no_parts(
    client: TestClient,
) -> None:
    """Another controller's reconcile may clean a ``taking`` record while this one still
    makes its parts: the taker must remove what it made, not leave it to the orphan sweep."""
    from sqlmodel import select as sql_select

    from controller.errors import NotFound
    from controller.services import snapshots
    from controller.store.db import unit_of_work
    from controller.store.models import Snapshot

    machine_id = new_machine(client)
    sh(client, machine_id, "head -c 50000000 /dev/urandom > /workspace/big")
    ctl = ctl_of(client)
    failures: list[BaseException] = []

    def take() -> None:
        try:
            snapshots.take(ctl=ctl, machine_id=machine_id, key=None)
        except BaseException as exc:  # noqa: BLE001 - looked at below
            failures.append(exc)

    taker = threading.Thread(target=take)
    with snapshots._still(machine_id):  # the record is written; its parts wait for us
        taker.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with unit_of_work(ctl.reader) as tx:
                if tx.exec(sql_select(Snapshot.id)).first():
                    break
            time.sleep(0.02)
        cleaned = snapshots.clean_interrupted(db=ctl.db, provider=ctl.provider, older_than_s=0)
        assert len(cleaned) == 1
    taker.join()
    assert len(failures) == 1
    assert isinstance(failures[0], NotFound), failures
    assert_no_parts(client)


def test_an_agents_fork_paused_when_its_lease_ends_is_still_destroyed(
    client: TestClient, settings: Settings
) -> None:
    from controller.services import leases

    me = agent(settings)
    machine_id, granted = leased_machine(client, me)
    held = {**me, **token_header(granted["token"])}
    forked = client.post(f"{API}/machines/{machine_id}/fork", json={"count": 1}, headers=held)
    assert forked.status_code == 201, forked.text
    fork_lease = forked.json()["leases"][0]
    copy = fork_lease["machine_id"]
    own = {**me, **token_header(fork_lease["token"])}
    assert client.post(f"{API}/machines/{copy}/pause", headers=own).status_code == 200
    assert client.delete(f"{API}/leases/{fork_lease['id']}", headers=me).status_code == 200
    assert client.get(f"{API}/machines/{copy}").json()["state"] == "paused"
    leases.reap(ctl=ctl_of(client))  # thawed, then handed over: destroyed, being a fork
    assert wait_state(client, copy, {"destroyed"})["state"] == "destroyed"
    snap_id = forked.json()["snapshot"]["id"]
    assert client.delete(f"{API}/snapshots/{snap_id}", headers=me).status_code == 200
    assert_no_parts(client)
