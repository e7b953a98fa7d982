"""Machine access: who may reach into a machine now, and every live channel into it.

One :class:`MachineAccess` per controller (``ctl.access``) owns the SSH connections, shell
sessions, SFTP, port forwards and one-shot commands. Each call that opens or uses a channel
checks the machine's state and the caller's key first (:func:`authorize`: a leased machine
needs the secret of its current lease, from the API token that took it; a stale one is 409;
an unleased machine is for ops), and each channel is registered with the machine and the
fence it was opened under.

Channels never outlive what they were opened under: when a machine's fence moves (a lease
is granted or ends: :meth:`MachineAccess.close_before_fence`) the channels of older fences
close, and when a machine is reset, stopped, destroyed or lost
(:meth:`MachineAccess.close_machine`) all of them do. A closed forward's URL refuses
connections and ends those it relayed; a closed session answers 410 (``SessionLost``).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio.to_thread
import paramiko
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    LimitReached,
    NotFound,
    ShopfloorError,
    StaleLease,
    StorageFull,
    TooLarge,
    TransportError,
)
from controller.providers.base import Provider
from controller.services import auth
from controller.services.limits import FORWARDS, SESSIONS, Limits
from controller.settings import Settings
from controller.store import leases as lease_rows
from controller.store.db import reader, run_read, unit_of_work
from controller.store.models import ApiToken, Lease, LeaseState, Machine, MachineState, Role
from controller.store.rawsql import Row, transaction
from controller.transport import exec as commands
from controller.transport import sessions, sftp
from controller.transport.forward import Forward, ForwardRegistry
from controller.transport.ssh import SshPool
from controller.transport.sshexec import CommandRunner, SshCommands

log = logging.getLogger(__name__)

EXEC_READY = (MachineState.ready, MachineState.leased, MachineState.quarantined)
"""The states in which commands and channels may reach a machine (a quarantined one: ops,
to look into it, and the run that is being moved off it)."""
SESSION_ID = re.compile(r"s-[0-9a-f]{16}")


# ---------------------------------------------------------------- who may reach in


@dataclass(frozen=True)
class Key:
    """Who reaches into a machine, with what.

    An API caller (``caller``) sends the secret of a lease or of a stage claim in
    X-Lease-Token (``secret``). The controller's own code (the run driver and the handles
    it gives agents: ``caller`` None) holds its lease in memory and names its ``fence``.
    """

    caller: ApiToken | None
    secret: str | None = None
    fence: int | None = None

    @staticmethod
    def of(caller: ApiToken, lease_token: str | None) -> Key:
        return Key(caller=caller, secret=lease_token)

    @staticmethod
    def internal(fence: int) -> Key:
        return Key(caller=None, fence=fence)


def machine_for_command(*, db: Engine, machine_id: str, key: Key) -> Machine:
    """The machine, if ``key`` may run commands in it now (see :func:`authorize`)."""
    with unit_of_work(reader(db)) as tx:  # a read: takes no write lock
        machine = _get_machine(tx.get(Machine, machine_id), machine_id)
        check_machine(tx, machine, key)
    return machine


def check_machine(
    tx: Session, machine: Machine, key: Key, as_state: MachineState | None = None
) -> None:
    """:func:`authorize` for a machine read in ``tx`` (with its active lease); ``as_state``:
    judge it as if it were in that state (a paused machine as what it was before)."""
    lease = tx.exec(
        select(Lease).where(Lease.machine_id == machine.id, Lease.state == LeaseState.active)
    ).first()
    state = as_state or machine.state
    row: Row = {"state": state, "fence": machine.fence, "lease_id": None}
    if lease is not None:
        row.update(
            lease_id=lease.id,
            lease_fence=lease.fence,
            token_hash=lease.token_hash,
            owner_token_id=lease.owner_token_id,
            claim_hash=lease.claim_hash,
            claimed_by=lease.claimed_by,
        )
    authorize(machine.id, row, key)


def fence_for_command(*, db: Engine, machine_id: str, key: Key) -> int:
    """The same check as :func:`machine_for_command` as one plain-SQL read (see ``rawsql``):
    a session's command already knows its container, so it needs only the machine's state
    and fence and its active lease's fence, owner and secret hashes; answers the fence."""
    with transaction(db, write=False) as tx:
        row = lease_rows.access_row(tx, machine_id)
    if row is None:
        raise NotFound(f"no machine {machine_id}")
    authorize(machine_id, row, key)
    return int(row["fence"])


def authorize(machine_id: str, row: Row, key: Key) -> None:
    """Whether ``key`` may reach into the machine whose :data:`store.leases.ACCESS` row
    this is; raise when not.

    - The machine must be ready, leased or quarantined (409).
    - The controller's own code passes with the current fence (else 409 stale).
    - A secret must be the secret of the machine's active lease, or of the stage claim
      made under it, whose fence is the machine's; any other (a lease that ended, a guess,
      a fence number) is 409 stale. The lease's secret serves only the API token that took
      the lease, the claim's only the token that claimed (403 for any other agent token).
    - Without a secret: ops may reach into any machine; an agent gets 409 on a leased
      machine (send the token) and 403 on an unleased one (lease it first).
    """
    state = MachineState(row["state"])
    if state == MachineState.paused:
        raise Conflict(
            f"machine {machine_id} is paused: resume it first "
            f"(POST /api/v1/machines/{machine_id}/resume)",
            state=state.value,
        )
    if state not in EXEC_READY:
        raise Conflict(
            f"machine {machine_id} is {state.value}; commands need it ready, leased or quarantined",
            state=state.value,
        )
    if key.caller is None:
        if key.fence is not None and key.fence != row["fence"]:
            raise StaleLease(
                f"machine {machine_id} moved past fence {key.fence}",
                state=state.value,
                fence=row["fence"],
            )
        return
    ops = key.caller.role == Role.ops
    if key.secret is None:
        if ops:
            return
        if state == MachineState.leased:
            raise Conflict(
                f"machine {machine_id} is leased: send the lease's token in X-Lease-Token",
                state="leased",
            )
        raise Forbidden(
            f"machine {machine_id} is not leased: lease it first (POST /leases with "
            f'{{"machine_id": "{machine_id}"}}) and send the lease\'s token in X-Lease-Token'
        )
    given = auth.hash_token(key.secret)
    current = row.get("lease_id") is not None and row.get("lease_fence") == row["fence"]
    if current and _same(given, row.get("token_hash")):
        holder = row.get("owner_token_id")
    elif current and _same(given, row.get("claim_hash")):
        holder = row.get("claimed_by")
    else:
        raise StaleLease(
            f"X-Lease-Token is not the token of machine {machine_id}'s current lease "
            "(the lease ended, or the token was never granted); lease the machine again",
            state=state.value,
            fence=row["fence"],
        )
    if not ops and holder != key.caller.id:
        raise Forbidden(
            f"the lease on machine {machine_id} belongs to another API token; "
            "only that token (or an ops token) may use its token"
        )


def _same(given_hash: str, stored_hash: str | None) -> bool:
    """Constant time, on hashes of the secrets."""
    return stored_hash is not None and hmac.compare_digest(given_hash, stored_hash)


def _get_machine(machine: Machine | None, machine_id: str) -> Machine:
    if machine is None:
        raise NotFound(f"no machine {machine_id}")
    return machine


# ---------------------------------------------------------------- the channels


class MachineAccess:
    """Every live channel into the controller's machines, by machine and fence."""

    def __init__(
        self, *, db: Engine, provider: Provider, settings: Settings, limits: Limits | None = None
    ) -> None:
        self.db = db
        self.provider = provider
        self.settings = settings
        self.limits = limits or Limits(settings)
        self.ssh = SshPool(provider, settings.data_dir, timeout_s=settings.ssh_connect_timeout_s)
        """One SSH connection per machine (direct or through the engine)."""
        self.sessions = sessions.SessionRegistry()
        self.forwards = ForwardRegistry(self.ssh)
        self.commands = CommandRunner(self.ssh, provider)
        """One-shot commands: over SSH where the machine has sshd, else the engine's exec."""
        self._reviving = threading.Lock()
        self._opening: dict[str, int] = {}
        """Sessions being opened now, by machine (counted against the limit too)."""
        self._opening_guard = threading.Lock()

    # ------------------------------------------------------------ sessions

    def open_session(self, *, machine_id: str, key: Key) -> sessions.Session:
        """A new shell session, if the machine has fewer than ``sessions_per_machine``
        open (429 otherwise: each holds a channel of the machine's one SSH connection, and
        sshd serves 256 at most, for sessions, transfers and commands together)."""
        machine = machine_for_command(db=self.db, machine_id=machine_id, key=key)
        cap = self.settings.sessions_per_machine
        with self._opening_guard:
            open_now = self.sessions.open_count(machine.id) + self._opening.get(machine.id, 0)
            if open_now >= cap:
                raise self.limits.refuse(
                    LimitReached(
                        f"machine {machine.id} has {cap} sessions open, its limit "
                        "(SHOPFLOOR_SESSIONS_PER_MACHINE): close one (DELETE "
                        f"/machines/{machine.id}/sessions/<id>) or run more in one session",
                        limit=SESSIONS,
                        open=open_now,
                    )
                )
            self._opening[machine.id] = self._opening.get(machine.id, 0) + 1
        try:
            return self._start_session(machine, f"s-{secrets.token_hex(8)}", restore=False)
        finally:
            with self._opening_guard:
                self._opening[machine.id] -= 1
                if not self._opening[machine.id]:
                    del self._opening[machine.id]

    async def run_in_session(
        self,
        *,
        machine_id: str,
        session_id: str,
        key: Key,
        cmd: str,
        timeout_s: float,
    ) -> sessions.SessionResult:
        """The hot path: the state and fence check is one plain-SQL read (inline on SQLite),
        and the command waits on the channel from the event loop."""
        fence = await run_read(
            self.db, fence_for_command, db=self.db, machine_id=machine_id, key=key
        )
        session = self.sessions.find(machine_id, session_id)
        if session is None:  # not in this process's memory: in the machine, perhaps
            session = await anyio.to_thread.run_sync(self._known_session, machine_id, session_id)
        if session.fence != fence:
            session.close("it was opened under an earlier lease")
            raise sessions.earlier_lease(session_id, machine_id)
        return await session.run_async(cmd, timeout_s)

    def close_session(self, *, machine_id: str, session_id: str, key: Key) -> None:
        machine_for_command(db=self.db, machine_id=machine_id, key=key)
        self._known_session(machine_id, session_id)
        self.sessions.remove(machine_id, session_id)

    def _start_session(
        self, machine: Machine, session_id: str, *, restore: bool
    ) -> sessions.Session:
        container = machine.container_name
        session = sessions.open_session(
            transport=self.ssh.transport(container),
            session_id=session_id,
            machine_id=machine.id,
            fence=machine.fence,
            workdir=machine.workdir,
            output_cap=self.settings.session_output_cap,
            state_secret=self.ssh.keys().state_secret,
            reopen=lambda: self.ssh.transport(container),
            restore=restore,
        )
        self.sessions.add(session)
        return session

    def _known_session(self, machine_id: str, session_id: str) -> sessions.Session:
        """The session, also one that an earlier controller process opened (this one
        restarted): when that process's connection went, the shell kept its directory and
        exported variables in the machine, and a new shell takes them over, if the machine is
        still under the same lease. Blocking: runs a shell start when the session is not in
        memory."""
        session = self.sessions.find(machine_id, session_id)
        if session is not None:
            return session
        if not SESSION_ID.fullmatch(session_id):
            raise sessions.unknown_session(machine_id, session_id)
        with self._reviving:  # two requests for the same session start one shell
            session = self.sessions.find(machine_id, session_id)
            if session is not None:
                return session
            with unit_of_work(reader(self.db)) as tx:
                machine = _get_machine(tx.get(Machine, machine_id), machine_id)
            try:
                session = self._start_session(machine, session_id, restore=True)
            except sessions.NothingKept:
                raise sessions.unknown_session(machine_id, session_id) from None
            log.info(
                "session %s on %s taken over from an earlier controller", session_id, machine_id
            )
            return session

    # ------------------------------------------------------------ files

    def read_file(self, *, machine_id: str, key: Key, path: str) -> bytes:
        """One of the machine's ``files_in_flight`` places while it reads (429 when none)."""
        machine = machine_for_command(db=self.db, machine_id=machine_id, key=key)
        with (
            self.limits.file_in_flight(machine.id),
            self.sftp(machine) as client,
            _file_errors("read", path),
        ):
            return sftp.read(client, path, cap=self.settings.file_cap_bytes)

    async def write_file(
        self,
        *,
        machine_id: str,
        key: Key,
        path: str,
        body: AsyncIterator[bytes],
        declared_size: int | None,
    ) -> tuple[str, int]:
        """Check the machine, read the body up to the cap, write it; the path written and
        its size. One of the machine's ``files_in_flight`` places is held from the first
        byte read to the last written (429 when none is free)."""
        machine = await anyio.to_thread.run_sync(
            lambda: machine_for_command(db=self.db, machine_id=machine_id, key=key)
        )
        with self.limits.file_in_flight(machine.id):
            data = await _read_capped(body, declared_size, self.settings.file_cap_bytes)

            def write() -> str:
                try:
                    with self.sftp(machine) as client, _file_errors("write", path):
                        return sftp.write(client, path, data)
                except Conflict as exc:
                    raise self._storage_full(machine, path, len(data)) or exc from exc

            return await anyio.to_thread.run_sync(write), len(data)

    def _storage_full(self, machine: Machine, path: str, size: int) -> StorageFull | None:
        """A failed write into a full workspace disk (SFTP says only "Failure"): 507, and
        the partial file is removed."""
        usage = self.provider.disk_usage(machine.volume_name)
        if usage is None or usage[1] - usage[0] > size + FULL_MARGIN:
            return None
        with contextlib.suppress(OSError, ShopfloorError), self.sftp(machine) as client:
            client.remove(sftp.confine(path))
        used, limit = usage
        return StorageFull(
            f"cannot write {path!r}: the machine's workspace disk is full "
            f"({used} of {limit} bytes used); remove files in /workspace",
            used_bytes=used,
            limit_bytes=limit,
        )

    @contextlib.contextmanager
    def sftp(self, machine: Machine) -> Iterator[paramiko.SFTPClient]:
        """An SFTP client on the machine's connection, closed on leaving."""
        transport = self.ssh.transport(machine.container_name)
        try:
            client = paramiko.SFTPClient.from_transport(transport)
        except paramiko.SSHException as exc:
            raise TransportError(f"cannot open SFTP in {machine.id}: {exc}") from exc
        if client is None:
            raise TransportError(f"cannot open SFTP in {machine.id}")
        with client:
            yield client

    # ------------------------------------------------------------ ports

    def open_forward(self, *, machine_id: str, key: Key, port: int) -> tuple[Forward, bool]:
        """The forward (one per machine, port and fence) and whether something listens now."""
        machine = machine_for_command(db=self.db, machine_id=machine_id, key=key)
        if not 1 <= port <= 65535:
            raise InvalidInput(f"port {port} is not a TCP port (1-65535)")
        cap = self.settings.forwards_per_lease
        forward = self.forwards.open(
            machine_id=machine.id,
            container=machine.container_name,
            port=port,
            fence=machine.fence,
            limit=cap,
        )
        if forward is None:  # a new one would pass the limit
            raise self.limits.refuse(
                LimitReached(
                    f"{cap} forwards are open under this lease of machine {machine.id}, its "
                    "limit (SHOPFLOOR_FORWARDS_PER_LEASE): close one (DELETE "
                    f"/machines/{machine.id}/ports/<port>) or serve more through one port",
                    limit=FORWARDS,
                )
            )
        try:  # a lease that ended meanwhile closed channels before ours was registered
            fence_for_command(db=self.db, machine_id=machine_id, key=Key.internal(machine.fence))
        except (Conflict, NotFound):
            self.forwards.close_port(machine.id, port, machine.fence)
            raise
        try:
            forward.open_channel().close()
            listening = True
        except Exception:  # noqa: BLE001 - a probe: any failure means "not listening now"
            listening = False
        return forward, listening

    def close_forward(self, *, machine_id: str, key: Key, port: int) -> None:
        machine = machine_for_command(db=self.db, machine_id=machine_id, key=key)
        if not self.forwards.close_port(machine.id, port, machine.fence):
            raise NotFound(f"port {port} of {machine_id} is not forwarded")

    # ------------------------------------------------------------ one-shot commands

    def run_command(
        self,
        *,
        machine_id: str,
        key: Key,
        cmd: str,
        cwd: str | None,
        env: dict[str, str],
        timeout_s: float,
    ) -> commands.ExecResult:
        runner, container, request = self._command(machine_id, key, cmd, cwd, env, timeout_s)
        return commands.run(runner, container, request, cap=self.settings.exec_output_cap)

    def stream_command(
        self,
        *,
        machine_id: str,
        key: Key,
        cmd: str,
        cwd: str | None,
        env: dict[str, str],
        timeout_s: float,
    ) -> Iterator[str]:
        """NDJSON lines as output arrives; the machine and token are checked before the
        first one."""
        runner, container, request = self._command(machine_id, key, cmd, cwd, env, timeout_s)
        return commands.stream(runner, container, request, cap=self.settings.exec_output_cap)

    def _command(
        self,
        machine_id: str,
        key: Key,
        cmd: str,
        cwd: str | None,
        env: dict[str, str],
        timeout_s: float,
    ) -> tuple[SshCommands | Provider, str, commands.ExecRequest]:
        machine = machine_for_command(db=self.db, machine_id=machine_id, key=key)
        request = commands.ExecRequest(
            cmd=cmd,
            cwd=commands.check_cwd(cwd or machine.workdir),
            env=commands.check_env(env),
            timeout_s=timeout_s,
        )
        container = machine.container_name
        return self.commands.for_container(container), container, request  # SSH when it can

    # ------------------------------------------------------------ closing

    def close_before_fence(self, *, machine_id: str, fence: int, why: str) -> None:
        """The machine's fence moved to ``fence`` (a lease was granted or ended): close the
        channels opened under an older one, so that they never serve the next holder."""
        closed = self.forwards.close_machine(machine_id, before_fence=fence)
        closed += self.sessions.end_machine(machine_id, why, before_fence=fence)
        if closed:
            log.info("closed %d channel(s) into %s: %s", closed, machine_id, why)

    def close_machine(self, *, machine: Machine, why: str) -> None:
        """The machine was reset, stopped, destroyed or lost: close all its channels and its
        SSH connection."""
        self.close_container(machine_id=machine.id, container=machine.container_name, why=why)

    def close_container(self, *, machine_id: str, container: str, why: str) -> None:
        """:meth:`close_machine` by the machine's id and container name."""
        closed = self.forwards.close_machine(machine_id)
        closed += self.sessions.end_machine(machine_id, why)
        self.ssh.drop(container)
        if closed:
            log.info("closed %d channel(s) into %s: %s", closed, machine_id, why)

    def close(self) -> None:
        self.forwards.close()
        self.sessions.close()
        self.ssh.close()


FULL_MARGIN = 1024 * 1024
"""A write that failed with less than its size and this much free is put down to a full disk."""


@contextlib.contextmanager
def _file_errors(doing: str, path: str) -> Iterator[None]:
    """What the machine's SFTP server refused, said in our terms."""
    try:
        yield
    except PermissionError as exc:
        raise Forbidden(f"cannot {doing} {path!r}: the machine's user may not ({exc})") from exc
    except FileNotFoundError as exc:
        raise NotFound(f"cannot {doing} {path!r}: no such file or directory") from exc
    except OSError as exc:
        raise Conflict(f"cannot {doing} {path!r} in the machine: {exc}") from exc


async def _read_capped(body: AsyncIterator[bytes], declared: int | None, cap: int) -> bytes:
    """The body, refused as soon as it is known to be over the cap (declared or read)."""
    if declared is not None and declared > cap:
        raise TooLarge(f"upload of {declared} bytes is over the cap of {cap} bytes")
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) > cap:
            raise TooLarge(f"upload is over the cap of {cap} bytes")
    return bytes(data)
