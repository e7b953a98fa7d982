"""A typed Python client for remote agents.

    client = Client("http://127.0.0.1:8080", token)
    with client.lease(pool="py", ttl_s=60) as machine:      # renewed in the background
        with machine.session() as shell:
            shell.run("cd app && export CI=1")
            print(shell.run("make test").output)
        machine.put("app/notes.txt", b"hello")
        url = machine.forward(8000)

Errors come back as the controller's own exception classes (``controller.errors``),
chosen by the ``error`` code of the answer, so ``except StaleLease`` works remotely.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from controller.errors import InvalidInput, ShopfloorError

__all__ = [
    "Client",
    "ExecResult",
    "Lease",
    "Machine",
    "Session",
    "SessionResult",
    "StageClaim",
]


def _error_classes() -> dict[str, type[ShopfloorError]]:
    found: dict[str, type[ShopfloorError]] = {}
    pending: list[type[ShopfloorError]] = [ShopfloorError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


ERRORS = _error_classes()


def raise_for(response: httpx.Response) -> None:
    """The controller's typed error for a failed answer (ShopfloorError when unknown)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("error", ""))
    detail = str(body.get("detail") or response.text[:500] or response.reason_phrase)
    extra = {k: v for k, v in body.items() if k not in ("error", "detail")}
    cls = ERRORS.get(code) or (InvalidInput if response.status_code == 422 else ShopfloorError)
    error = cls(detail, **extra)
    error.status_code = response.status_code  # what this answer said, for callers that ask
    raise error


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: float
    truncated: bool
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class SessionResult:
    exit_code: int | None
    output: str
    duration_ms: float
    truncated: bool = False
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class StageClaim:
    """A stage a remote agent took on (see ``Client.claim_stage``)."""

    run_id: str
    stage: str
    attempt: int
    task: str
    params: dict[str, Any]
    timeout_s: float
    workdir: str
    """The checkout in the machine."""
    handoff_dir: str
    """run.json and the earlier stages' notes."""
    machine: Machine
    """The run's machine, under the claim's secret (only this client's API token may use it)."""
    fence: int
    """The run's lease's fence when claimed."""


class Client:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 660.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.http = http or httpx.Client(base_url=url, timeout=timeout_s)
        self._auth = f"Bearer {token}"  # per request: a shared ``http`` keeps its own headers

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(
        self, method: str, path: str, *, lease_token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        headers["Authorization"] = self._auth
        if lease_token is not None:
            headers["X-Lease-Token"] = lease_token
        response = self.http.request(method, f"/api/v1{path}", headers=headers, **kwargs)
        raise_for(response)
        return response

    def acquire(
        self,
        *,
        pool: str | None = None,
        machine_id: str | None = None,
        selector: dict[str, Any] | None = None,
        holder: str = "shopfloor-client",
        ttl_s: float = 60,
        wait_s: float = 0,
    ) -> Lease:
        which: dict[str, Any] = {"pool": pool, "machine_id": machine_id, "selector": selector}
        body = {k: v for k, v in which.items() if v is not None}
        body.update(holder=holder, ttl_s=ttl_s, wait_s=wait_s)
        answer = self.call("POST", "/leases", json=body, timeout=wait_s + 60).json()
        return Lease(
            self, answer["id"], answer["machine_id"], answer["token"], int(answer["fence"]), ttl_s
        )

    @contextmanager
    def lease(self, **kwargs: Any) -> Iterator[Machine]:
        """A leased machine for the ``with`` block: renewed in the background, then released."""
        lease = self.acquire(**kwargs)
        lease.start_renewing()
        try:
            yield lease.machine
        finally:
            lease.release()

    def machine(self, machine_id: str, lease_token: str | None = None) -> Machine:
        """A machine used without a lease of ours (ops), or with a lease's secret we hold."""
        return Machine(self, machine_id, lease_token)

    def upload_artifact(
        self,
        run_id: str,
        stage: str,
        data: bytes,
        *,
        kind: str,
        name: str,
        meta: dict[str, Any] | None = None,
        attempt: int | None = None,
        lease_token: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> dict[str, Any]:
        form: dict[str, str] = {"kind": kind, "name": name, "meta": json.dumps(meta or {})}
        if attempt is not None:
            form["attempt"] = str(attempt)
        answer = self.call(
            "POST",
            f"/runs/{run_id}/stages/{stage}/artifacts",
            lease_token=lease_token,
            data=form,
            files={"file": (name, data, content_type)},
        )
        result: dict[str, Any] = answer.json()
        return result

    def claim_stage(self, run_id: str, stage: str) -> StageClaim:
        """A running stage of a run whose agent is ``remote``: its task, parameters, and the
        run's machine under the claim's secret, which only this client's API token may use.
        Claiming again answers a new secret (the earlier one stops working)."""
        answer = self.call("POST", f"/runs/{run_id}/stages/{stage}/claim").json()
        machine = Machine(self, answer["machine_id"], answer["lease_token"])
        return StageClaim(
            run_id=answer["run_id"],
            stage=answer["stage"],
            attempt=int(answer["attempt"]),
            task=answer["task"],
            params=dict(answer["params"]),
            timeout_s=float(answer["timeout_s"]),
            workdir=answer["workdir"],
            handoff_dir=answer["handoff_dir"],
            machine=machine,
            fence=int(answer["fence"]),
        )

    def report_stage(
        self,
        claim: StageClaim,
        *,
        status: str,
        summary: str,
        outputs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The claimed attempt's result: the stage ends with it. ``StaleLease`` once the run
        no longer holds the machine the claim named."""
        body = {
            "attempt": claim.attempt,
            "status": status,
            "summary": summary,
            "outputs": outputs or {},
        }
        answer = self.call(
            "POST",
            f"/runs/{claim.run_id}/stages/{claim.stage}/report",
            lease_token=claim.machine.token,
            json=body,
        )
        result: dict[str, Any] = answer.json()
        return result


class Lease:
    def __init__(
        self,
        client: Client,
        lease_id: str,
        machine_id: str,
        token: str,
        fence: int,
        ttl_s: float,
    ) -> None:
        self.client = client
        self.id = lease_id
        self.machine_id = machine_id
        self.token = token
        """The lease's secret (X-Lease-Token): the controller shows it only once, here."""
        self.fence = fence
        self.ttl_s = ttl_s
        self.machine = Machine(client, machine_id, token)
        self.renew_error: ShopfloorError | None = None
        self.renewals = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def renew(self) -> None:
        self.client.call("POST", f"/leases/{self.id}/renew", json={"ttl_s": self.ttl_s})
        self.renewals += 1

    def start_renewing(self) -> None:
        """Renew at a third of the TTL, so two missed renewals still leave time."""

        def loop() -> None:
            while not self._stop.wait(max(self.ttl_s / 3, 0.2)):
                try:
                    self.renew()
                except ShopfloorError as exc:  # lost it: calls under it will say so
                    self.renew_error = exc
                    return
                except httpx.HTTPError:
                    continue  # the controller may be back before the lease runs out

        self._thread = threading.Thread(target=loop, name=f"lease-{self.id}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.client.call("DELETE", f"/leases/{self.id}")


class Machine:
    def __init__(self, client: Client, machine_id: str, token: str | None) -> None:
        self.client = client
        self.id = machine_id
        self.token = token

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.call(
            method, f"/machines/{self.id}{path}", lease_token=self.token, **kwargs
        )

    def exec(
        self,
        cmd: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 600,
    ) -> ExecResult:
        body: dict[str, Any] = {"cmd": cmd, "env": env or {}, "timeout_s": timeout_s}
        if cwd:
            body["cwd"] = cwd
        return ExecResult(**self._call("POST", "/exec", json=body).json())

    def session(self) -> Session:
        answer = self._call("POST", "/sessions").json()
        return Session(self, answer["id"])

    def put(self, path: str, data: bytes) -> str:
        answer = self._call("PUT", "/files", params={"path": path}, content=data).json()
        return str(answer["path"])

    def get(self, path: str) -> bytes:
        return self._call("GET", "/files", params={"path": path}).content

    def forward(self, port: int) -> str:
        return str(self._call("POST", "/ports", json={"port": port}).json()["url"])

    def pause(self) -> None:
        """Freeze the machine's processes with their memory (commands answer 409 meanwhile)."""
        self._call("POST", "/pause")

    def resume(self) -> None:
        self._call("POST", "/resume")

    def snapshot(self, name: str = "", *, pinned: bool = False) -> str:
        """Save the machine's disk state; answers the snapshot's id."""
        body = {"name": name, "pinned": pinned}
        return str(self._call("POST", "/snapshots", json=body).json()["id"])

    def fork(self, count: int = 1) -> list[str]:
        """Start ``count`` copies of the machine as it is now (ops: unleased); answers
        their ids. An agent wants :meth:`fork_leases`: its forks are leased to it."""
        answer = self._call("POST", "/fork", json={"count": count}).json()
        return [str(m["id"]) for m in answer["machines"]]

    def fork_leases(self, count: int = 1) -> list[Lease]:
        """An agent's fork: ``count`` copies, each leased to this agent alone (release each
        when done: the fork is destroyed then)."""
        answer = self._call("POST", "/fork", json={"count": count}).json()
        return [
            Lease(self.client, g["id"], g["machine_id"], g["token"], int(g["fence"]), g["ttl_s"])
            for g in answer.get("leases", [])
        ]


class Session:
    """A shell in the machine whose directory and environment carry over between commands."""

    def __init__(self, machine: Machine, session_id: str) -> None:
        self.machine = machine
        self.id = session_id

    def run(self, cmd: str, *, timeout_s: float = 600) -> SessionResult:
        answer = self.machine._call(
            "POST", f"/sessions/{self.id}/run", json={"cmd": cmd, "timeout_s": timeout_s}
        )
        return SessionResult(**answer.json())

    def close(self) -> None:
        self.machine._call("DELETE", f"/sessions/{self.id}")

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except ShopfloorError:
            if kind is None:
                raise
