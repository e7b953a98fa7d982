"""Shell sessions over SSH through the engine: state carries over, timeouts, big output, exit."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.providers.docker import DockerProvider
from controller.settings import Settings
from controller.store.models import Role
from tests.integration.conftest import issue_token, kill_sshd, wait_state


def open_session(client: TestClient, machine_id: str) -> str:
    response = client.post(f"/api/v1/machines/{machine_id}/sessions")
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def run(client: TestClient, machine_id: str, sid: str, cmd: str, **extra: Any) -> dict[str, Any]:
    response = client.post(
        f"/api/v1/machines/{machine_id}/sessions/{sid}/run", json={"cmd": cmd, **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def sid(module_client: TestClient, module_machine: str) -> str:
    return open_session(module_client, module_machine)


def test_cd_and_export_carry_over(module_client: TestClient, module_machine: str, sid: str) -> None:
    assert (
        run(module_client, module_machine, sid, "mkdir -p /tmp/here && cd /tmp/here")["exit_code"]
        == 0
    )
    run(module_client, module_machine, sid, "export GREETING=hello; plain=kept")
    result = run(module_client, module_machine, sid, 'pwd; echo "$GREETING $plain"; whoami')
    assert result["output"] == "/tmp/here\nhello kept\nrunner\n"
    assert result["exit_code"] == 0
    assert result["timed_out"] is False


def test_exit_codes_stderr_and_output_without_newline(
    module_client: TestClient, module_machine: str, sid: str
) -> None:
    result = run(
        module_client, module_machine, sid, "echo out; echo err >&2; printf tail; (exit 3)"
    )
    assert result["exit_code"] == 3
    assert result["output"] == "out\nerr\ntail"


def test_commands_cannot_eat_the_protocol(
    module_client: TestClient, module_machine: str, sid: str
) -> None:
    """A command that reads stdin, prints NUL bytes or quotes oddly leaves the session sound."""
    result = run(module_client, module_machine, sid, "cat; printf 'a\\0b'; echo \"it's\" 'fine'")
    assert result["output"] == "a\x00bit's fine\n"
    multi = run(module_client, module_machine, sid, "cat <<'EOF'\nline one\n$HOME\nEOF")
    assert multi["output"] == "line one\n$HOME\n"
    assert run(module_client, module_machine, sid, "set | grep -c __sf_ || true")["exit_code"] == 0
    assert run(module_client, module_machine, sid, "echo still")["output"] == "still\n"


def test_timeout_interrupts_and_session_stays_usable(
    module_client: TestClient, module_machine: str, sid: str
) -> None:
    run(module_client, module_machine, sid, "cd /tmp")
    slow = run(
        module_client, module_machine, sid, "echo before; sleep 300; echo after", timeout_s=1
    )
    assert slow["timed_out"] is True
    assert slow["output"].startswith("before\n")
    assert "timed out after 1s" in slow["output"]
    assert slow["duration_ms"] < 60_000
    busy = run(module_client, module_machine, sid, "while :; do :; done", timeout_s=1)
    assert busy["timed_out"] is True
    after = run(module_client, module_machine, sid, "pwd; pgrep -c -x sleep || true")
    assert after["output"] == "/tmp\n0\n"


def test_huge_output_is_capped_head_and_tail(
    module_client: TestClient, module_machine: str, sid: str
) -> None:
    cmd = "echo START; head -c 50M /dev/zero | tr '\\0' x; echo; echo END"
    result = run(module_client, module_machine, sid, cmd, timeout_s=120)
    assert result["exit_code"] == 0
    assert result["truncated"] is True
    assert result["output"].startswith("START\n")
    assert result["output"].endswith("END\n")
    assert "bytes omitted" in result["output"]
    assert len(result["output"]) < 1024 * 1024 + 200
    assert run(module_client, module_machine, sid, "echo ok")["output"] == "ok\n"


def test_exit_from_inside_says_session_lost_and_a_new_one_opens(
    module_client: TestClient, module_machine: str, sid: str
) -> None:
    url = f"/api/v1/machines/{module_machine}/sessions/{sid}/run"
    gone = module_client.post(url, json={"cmd": "exit 4"})
    assert gone.status_code == 410, gone.text
    assert gone.json()["error"] == "session_lost"
    assert "session lost" in gone.json()["detail"]
    assert "exited with status 4" in gone.json()["detail"]
    again = module_client.post(url, json={"cmd": "true"})
    assert again.status_code == 410
    fresh = open_session(module_client, module_machine)
    assert run(module_client, module_machine, fresh, "echo back")["output"] == "back\n"


def test_delete_closes_and_unknown_session_is_404(
    module_client: TestClient, module_machine: str, sid: str
) -> None:
    base = f"/api/v1/machines/{module_machine}/sessions"
    assert module_client.delete(f"{base}/{sid}").status_code == 204
    assert module_client.post(f"{base}/{sid}/run", json={"cmd": "true"}).status_code == 404
    assert module_client.post(f"{base}/s-nope/run", json={"cmd": "true"}).status_code == 404
    bad = module_client.post(f"{base}/{sid}/run", json={"cmd": "true", "timeout_s": 0})
    assert bad.status_code == 422


@pytest.mark.parametrize(
    ("body", "headers", "says"),
    [
        (b"{not json", {}, "JSON"),
        (b'{"cmd": "true", "shell": "zsh"}', {}, "shell: Extra inputs are not permitted"),
        (b'{"cmd": "echo \\u0000"}', {}, "NUL"),
        (b"\xff\xfe", {}, "JSON"),
        (b'{"cmd": "true"}', {"X-Lease-Token": "7" * 257}, "X-Lease-Token is at most 256"),
    ],
)
def test_run_refuses_bad_input_with_a_clear_422(
    module_client: TestClient,
    module_machine: str,
    sid: str,
    body: bytes,
    headers: dict[str, str],
    says: str,
) -> None:
    url = f"/api/v1/machines/{module_machine}/sessions/{sid}/run"
    answer = module_client.post(url, content=body, headers=headers)
    assert answer.status_code == 422, answer.text
    assert says in answer.json()["detail"]
    assert run(module_client, module_machine, sid, "echo still")["output"] == "still\n"


def test_sessions_are_independent(module_client: TestClient, module_machine: str) -> None:
    one, two = (
        open_session(module_client, module_machine),
        open_session(module_client, module_machine),
    )
    run(module_client, module_machine, one, "cd /tmp; export ONLY=one")
    result = run(module_client, module_machine, two, 'pwd; echo "[$ONLY]"')
    assert result["output"] == "/workspace\n[]\n"


def test_leased_machine_needs_the_current_token(
    module_client: TestClient, module_settings: Settings, module_machine: str
) -> None:
    base = f"/api/v1/machines/{module_machine}/sessions"
    me = {"Authorization": f"Bearer {issue_token(module_settings, Role.agent)}"}
    first = module_client.post(
        "/api/v1/leases",
        json={"machine_id": module_machine, "holder": "t", "ttl_s": 60},
        headers=me,
    )
    assert first.status_code == 201, first.text
    lease, token = first.json()["id"], first.json()["token"]
    try:
        refused = module_client.post(base, headers=me)
        assert refused.status_code == 409
        assert "X-Lease-Token" in refused.json()["detail"]
        mine = {**me, "X-Lease-Token": token}
        opened = module_client.post(base, headers=mine)
        assert opened.status_code == 201, opened.text
        sid = opened.json()["id"]
        ran = module_client.post(f"{base}/{sid}/run", json={"cmd": "echo mine"}, headers=mine)
        assert ran.json()["output"] == "mine\n"
        fence = {**me, "X-Lease-Token": str(first.json()["fence"])}
        stale = module_client.post(f"{base}/{sid}/run", json={"cmd": "true"}, headers=fence)
        assert stale.status_code == 409
        assert stale.json()["error"] == "stale_lease"
    finally:
        assert module_client.delete(f"/api/v1/leases/{lease}", headers=me).status_code == 200
    second = module_client.post(  # waits for the hand-over between the two leases
        "/api/v1/leases",
        json={"machine_id": module_machine, "holder": "u", "ttl_s": 60, "wait_s": 60},
    )
    new_token = second.json()["token"]
    try:
        reused = module_client.post(
            f"{base}/{sid}/run", json={"cmd": "true"}, headers={"X-Lease-Token": new_token}
        )
        assert reused.status_code == 410  # the next holder cannot use the last one's shell
        assert "earlier lease" in reused.json()["detail"]
    finally:
        module_client.delete(f"/api/v1/leases/{second.json()['id']}")
        assert wait_state(module_client, module_machine, {"ready"})["state"] == "ready"


def test_stopping_the_machine_loses_its_sessions(
    module_client: TestClient, module_machine: str, sid: str
) -> None:
    base = f"/api/v1/machines/{module_machine}"
    assert run(module_client, module_machine, sid, "echo up")["output"] == "up\n"
    assert module_client.post(f"{base}/stop").status_code == 200
    try:
        stopped = module_client.post(f"{base}/sessions/{sid}/run", json={"cmd": "true"})
        assert stopped.status_code == 409  # the machine is stopped: no commands at all
    finally:
        assert module_client.post(f"{base}/start").status_code == 200
    after = module_client.post(f"{base}/sessions/{sid}/run", json={"cmd": "true"})
    assert after.status_code == 410, after.text
    assert (
        run(
            module_client, module_machine, open_session(module_client, module_machine), "echo again"
        )["output"]
        == "again\n"
    )


def test_session_calls_need_an_agent_or_ops_token(
    module_client: TestClient, module_machine: str, module_settings: Settings, sid: str
) -> None:
    url = f"/api/v1/machines/{module_machine}/sessions/{sid}/run"
    no_token = module_client.post(url, json={"cmd": "true"}, headers={"Authorization": ""})
    assert no_token.status_code == 401
    reviewer = issue_token(module_settings, Role.reviewer)
    as_reviewer = module_client.post(
        url, json={"cmd": "true"}, headers={"Authorization": f"Bearer {reviewer}"}
    )
    assert as_reviewer.status_code == 403
    agent = issue_token(module_settings, Role.agent)
    as_agent = module_client.post(
        url, json={"cmd": "true"}, headers={"Authorization": f"Bearer {agent}"}
    )
    assert as_agent.status_code == 403  # an unleased machine is for ops (issue 12)
    assert "lease it first" in as_agent.json()["detail"]


def _drop_connection(
    client: TestClient, provider: DockerProvider, machine_id: str, sid: str
) -> None:
    """Drop the connection and wait until the controller has seen its session's end."""
    kill_sshd(provider, machine_id)
    session = client.app.state.controller.access.sessions.get(machine_id, sid)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while session.alive:
        assert time.monotonic() < deadline, "the controller did not see the connection drop"
        time.sleep(0.01)


def _state_file(provider: DockerProvider, machine_id: str, sid: str) -> bool:
    found = provider.exec(
        f"shopfloor-{machine_id}", ["test", "-e", f"/dev/shm/.shopfloor-session-{sid}"]
    )
    list(found)
    return found.exit_code() == 0


def test_a_dropped_connection_keeps_directory_and_exports(
    module_client: TestClient, module_machine: str, provider: DockerProvider
) -> None:
    sid = open_session(module_client, module_machine)
    setup = "mkdir -p '/tmp/kept dir' && cd '/tmp/kept dir' && export KEPT='a \"b\"' && LOCAL=1"
    assert run(module_client, module_machine, sid, setup)["exit_code"] == 0

    _drop_connection(module_client, provider, module_machine, sid)
    after = run(module_client, module_machine, sid, 'pwd; echo "$KEPT|${LOCAL:-unset}"')
    assert after["output"] == '/tmp/kept dir\na "b"|unset\n'  # exported: kept; plain: not
    assert run(module_client, module_machine, sid, "echo again")["output"] == "again\n"

    assert (
        module_client.delete(f"/api/v1/machines/{module_machine}/sessions/{sid}").status_code == 204
    )
    assert not _state_file(provider, module_machine, sid)  # closed on purpose: nothing kept


def test_a_dropped_connection_without_kept_state_is_session_lost(
    module_client: TestClient, module_machine: str, provider: DockerProvider
) -> None:
    sid = open_session(module_client, module_machine)
    assert run(module_client, module_machine, sid, "cd /tmp")["exit_code"] == 0
    _drop_connection(module_client, provider, module_machine, sid)
    container = f"shopfloor-{module_machine}"
    list(provider.exec(container, ["sh", "-c", "rm -f /dev/shm/.shopfloor-session-*"], user="root"))

    url = f"/api/v1/machines/{module_machine}/sessions/{sid}/run"
    gone = module_client.post(url, json={"cmd": "pwd"})
    assert gone.status_code == 410, gone.text
    assert "no longer holds its state" in gone.json()["detail"]


def test_a_command_sent_as_the_connection_drops_is_reopened_or_reported(
    module_client: TestClient, module_machine: str, provider: DockerProvider
) -> None:
    sid = open_session(module_client, module_machine)
    assert run(module_client, module_machine, sid, "export RACE=won")["exit_code"] == 0
    kill_sshd(provider, module_machine)  # no wait: the controller may not have seen it yet
    url = f"/api/v1/machines/{module_machine}/sessions/{sid}/run"
    first = module_client.post(url, json={"cmd": "echo $RACE"})
    if first.status_code == 200:  # the send failed or found the drop: reopened, then ran
        assert first.json()["output"] == "won\n"
    else:  # the command went out on the dying connection: its result is unknown
        assert first.status_code == 502, first.text
        assert "result is unknown" in first.json()["detail"]
    assert run(module_client, module_machine, sid, "echo $RACE")["output"] == "won\n"


def test_a_rewritten_state_file_is_refused_and_never_runs(
    module_client: TestClient, module_machine: str, provider: DockerProvider
) -> None:
    """A process of the machine rewrites the state a dropped shell kept: the controller
    refuses it (410) and the restored shell never runs what was injected."""
    sid = open_session(module_client, module_machine)
    assert run(module_client, module_machine, sid, "cd /tmp && export KEPT=1")["exit_code"] == 0
    _drop_connection(module_client, provider, module_machine, sid)
    container = f"shopfloor-{module_machine}"
    state = f"/dev/shm/.shopfloor-session-{sid}"
    deadline = time.monotonic() + 10
    while not _state_file(provider, module_machine, sid):
        assert time.monotonic() < deadline, "the dropped shell kept no state"
        time.sleep(0.05)
    forge = f"rm -f /tmp/injected; echo 'touch /tmp/injected' >> {state}"
    list(provider.exec(container, ["sh", "-c", forge]))  # as runner, like any process there

    url = f"/api/v1/machines/{module_machine}/sessions/{sid}/run"
    refused = module_client.post(url, json={"cmd": "pwd"})
    assert refused.status_code == 410, refused.text
    assert "integrity" in refused.json()["detail"]
    check = provider.exec(container, ["test", "-e", "/tmp/injected"])
    list(check)
    assert check.exit_code() != 0, "the injected command ran"


def _kept_then_reopened(
    client: TestClient, provider: DockerProvider, machine_id: str
) -> tuple[str, str]:
    """A session whose connection dropped and whose next command reopened it: the state
    its first shell kept is in the machine, as after a controller's restart."""
    sid = open_session(client, machine_id)
    assert run(client, machine_id, sid, "cd /tmp && export KEPT=1")["exit_code"] == 0
    _drop_connection(client, provider, machine_id, sid)
    assert run(client, machine_id, sid, "echo $KEPT")["output"] == "1\n"
    assert _state_file(provider, machine_id, sid)
    return sid, f"/api/v1/machines/{machine_id}/sessions/{sid}"


def test_a_deleted_session_keeps_nothing_once_the_delete_answers(
    module_client: TestClient, module_machine: str, provider: DockerProvider
) -> None:
    """The delete answers once the machine holds no state for the session, so a command
    right after it is 404, never a restore of that state nor a half-removed one (410)."""
    sid, url = _kept_then_reopened(module_client, provider, module_machine)
    assert module_client.delete(url).status_code == 204
    assert not _state_file(provider, module_machine, sid)  # at once: no wait
    gone = module_client.post(f"{url}/run", json={"cmd": "true"})
    assert gone.status_code == 404, gone.text


def test_a_session_deleted_while_its_shell_is_busy_is_404(
    module_client: TestClient, module_machine: str, provider: DockerProvider
) -> None:
    """Its shell cannot remove its state before the command ends: the controller does."""
    sid, url = _kept_then_reopened(module_client, provider, module_machine)
    busy: list[int] = []
    worker = threading.Thread(
        target=lambda: busy.append(
            module_client.post(f"{url}/run", json={"cmd": "sleep 8"}).status_code
        )
    )
    worker.start()
    try:
        time.sleep(1)  # the command is running
        started = time.monotonic()
        assert module_client.delete(url).status_code == 204
        assert time.monotonic() - started < 6, "the delete waited for the command"
        assert not _state_file(provider, module_machine, sid)
        gone = module_client.post(f"{url}/run", json={"cmd": "true"})
        assert gone.status_code == 404, gone.text
    finally:
        worker.join(30)
    assert busy, "the busy command did not answer"
    assert busy[0] != 200, busy  # the closed session's command has no result
