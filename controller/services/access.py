"""Machine access: who may reach into a machine now, and every live channel into it.

One :class:`MachineAccess` per controller (``ctl.access``) owns the SSH connections, shell
sessions, SFTP, port forwards and one-shot commands. Each call that opens or uses a channel
checks the machine's state and the caller's lease token first (:func:`machine_for_command`:
a leased machine needs its current token, a stale one is 409), and each channel is
registered with the machine and the fence (lease token) it was opened under.

Channels never outlive what they were opened under: when a machine's fence moves (a lease
is granted or ends: :meth:`MachineAccess.close_before_fence`) the channels of older fences
close, and when a machine is reset, stopped, destroyed or lost
(:meth:`MachineAccess.close_machine`) all of them do. A closed forward's URL refuses
connections and ends those it relayed; a closed session answers 410 (``SessionLost``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
from collections.abc import AsyncIterator, Iterator

import anyio.to_thread
import paramiko
from sqlalchemy.engine import Engine

from controller.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    StaleLease,
    TooLarge,
    TransportError,
)
from controller.providers.base import Provider
from controller.settings import Settings
from controller.store.db import reader, run_read, unit_of_work
from controller.store.models import Machine, MachineState
from controller.store.rawsql import Sql, transaction
from controller.transport import exec as commands
from controller.transport import sessions, sftp
from controller.transport.forward import Forward, ForwardRegistry
from controller.transport.ssh import SshPool
from controller.transport.sshexec import CommandRunner, SshCommands

log = logging.getLogger(__name__)

EXEC_READY = (MachineState.ready, MachineState.leased)
"""The states in which commands and channels may reach a machine."""
SESSION_ID = re.compile(r"s-[0-9a-f]{16}")
STATE_AND_FENCE = Sql("SELECT state, fence FROM machines WHERE id = :machine_id")
"""A machine's state and fence (the lease paths ask it too)."""


# ---------------------------------------------------------------- who may reach in


def machine_for_command(*, db: Engine, machine_id: str, lease_token: int | None) -> Machine:
    """The machine, if commands may run in it now. A leased machine needs its current token."""
    with unit_of_work(reader(db)) as tx:  # a read: takes no write lock
        machine = _get_machine(tx.get(Machine, machine_id), machine_id)
    check_command(machine_id, machine.state, machine.fence, lease_token)
    return machine


def fence_for_command(*, db: Engine, machine_id: str, lease_token: int | None) -> int:
    """The same check as :func:`machine_for_command` as one plain-SQL read (see ``rawsql``):
    a session's command already knows its container, so only state and fence are needed."""
    with transaction(db, write=False) as tx:
        row = tx.one(STATE_AND_FENCE, machine_id=machine_id)
    if row is None:
        raise NotFound(f"no machine {machine_id}")
    check_command(machine_id, MachineState(row["state"]), row["fence"], lease_token)
    return int(row["fence"])


def check_command(
    machine_id: str, state: MachineState, fence: int, lease_token: int | None
) -> None:
    if state not in EXEC_READY:
        raise Conflict(
            f"machine {machine_id} is {state.value}; commands need it ready or leased",
            state=state.value,
        )
    if state == MachineState.leased and lease_token is None:
        raise Conflict(
            f"machine {machine_id} is leased: send the lease's token in X-Lease-Token",
            state="leased",
        )
    if lease_token is not None and lease_token != fence:
        raise StaleLease(
            f"lease token {lease_token} is stale: machine {machine_id} is at token {fence}",
            state=state.value,
            current_token=fence,
        )


def _get_machine(machine: Machine | None, machine_id: str) -> Machine:
    if machine is None:
        raise NotFound(f"no machine {machine_id}")
    return machine


# ---------------------------------------------------------------- the channels


class MachineAccess:
    """Every live channel into the controller's machines, by machine and fence."""

    def __init__(self, *, db: Engine, provider: Provider, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.ssh = SshPool(provider, settings.data_dir, timeout_s=settings.ssh_connect_timeout_s)
        """One SSH connection per machine (direct or through the engine)."""
        self.sessions = sessions.SessionRegistry()
        self.forwards = ForwardRegistry(self.ssh)
        self.commands = CommandRunner(self.ssh, provider)
        """One-shot commands: over SSH where the machine has sshd, else the engine's exec."""
        self._reviving = threading.Lock()

    # ------------------------------------------------------------ sessions

    def open_session(self, *, machine_id: str, lease_token: int | None) -> sessions.Session:
        machine = machine_for_command(db=self.db, machine_id=machine_id, lease_token=lease_token)
        return self._start_session(machine, f"s-{secrets.token_hex(8)}", restore=False)

    async def run_in_session(
        self,
        *,
        machine_id: str,
        session_id: str,
        lease_token: int | None,
        cmd: str,
        timeout_s: float,
    ) -> sessions.SessionResult:
        """The hot path: the state and fence check is one plain-SQL read (inline on SQLite),
        and the command waits on the channel from the event loop."""
        fence = await run_read(
            self.db, fence_for_command, db=self.db, machine_id=machine_id, lease_token=lease_token
        )
        session = self.sessions.find(machine_id, session_id)
        if session is None:  # not in this process's memory: in the machine, perhaps
            session = await anyio.to_thread.run_sync(self._known_session, machine_id, session_id)
        if session.fence != fence:
            session.close("it was opened under an earlier lease")
            raise sessions.earlier_lease(session_id, machine_id)
        return await session.run_async(cmd, timeout_s)

    def close_session(self, *, machine_id: str, session_id: str, lease_token: int | None) -> None:
        machine_for_command(db=self.db, machine_id=machine_id, lease_token=lease_token)
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

    def read_file(self, *, machine_id: str, lease_token: int | None, path: str) -> bytes:
        machine = machine_for_command(db=self.db, machine_id=machine_id, lease_token=lease_token)
        with self.sftp(machine) as client, _file_errors("read", path):
            return sftp.read(client, path, cap=self.settings.file_cap_bytes)

    async def write_file(
        self,
        *,
        machine_id: str,
        lease_token: int | None,
        path: str,
        body: AsyncIterator[bytes],
        declared_size: int | None,
    ) -> tuple[str, int]:
        """Check the machine, read the body up to the cap, write it; the path written and
        its size."""
        machine = await anyio.to_thread.run_sync(
            lambda: machine_for_command(db=self.db, machine_id=machine_id, lease_token=lease_token)
        )
        data = await _read_capped(body, declared_size, self.settings.file_cap_bytes)

        def write() -> str:
            with self.sftp(machine) as client, _file_errors("write", path):
                return sftp.write(client, path, data)

        return await anyio.to_thread.run_sync(write), len(data)

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

    def open_forward(
        self, *, machine_id: str, lease_token: int | None, port: int
    ) -> tuple[Forward, bool]:
        """The forward (one per machine, port and fence) and whether something listens now."""
        machine = machine_for_command(db=self.db, machine_id=machine_id, lease_token=lease_token)
        if not 1 <= port <= 65535:
            raise InvalidInput(f"port {port} is not a TCP port (1-65535)")
        forward = self.forwards.open(
            machine_id=machine.id, container=machine.container_name, port=port, fence=machine.fence
        )
        try:  # a lease that ended meanwhile closed channels before ours was registered
            fence_for_command(db=self.db, machine_id=machine_id, lease_token=machine.fence)
        except (Conflict, NotFound):
            self.forwards.close_port(machine.id, port, machine.fence)
            raise
        try:
            forward.open_channel().close()
            listening = True
        except Exception:  # noqa: BLE001 - a probe: any failure means "not listening now"
            listening = False
        return forward, listening

    def close_forward(self, *, machine_id: str, lease_token: int | None, port: int) -> None:
        machine = machine_for_command(db=self.db, machine_id=machine_id, lease_token=lease_token)
        if not self.forwards.close_port(machine.id, port, machine.fence):
            raise NotFound(f"port {port} of {machine_id} is not forwarded")

    # ------------------------------------------------------------ one-shot commands

    def run_command(
        self,
        *,
        machine_id: str,
        lease_token: int | None,
        cmd: str,
        cwd: str | None,
        env: dict[str, str],
        timeout_s: float,
    ) -> commands.ExecResult:
        runner, container, request = self._command(
            machine_id, lease_token, cmd, cwd, env, timeout_s
        )
        return commands.run(runner, container, request, cap=self.settings.exec_output_cap)

    def stream_command(
        self,
        *,
        machine_id: str,
        lease_token: int | None,
        cmd: str,
        cwd: str | None,
        env: dict[str, str],
        timeout_s: float,
    ) -> Iterator[str]:
        """NDJSON lines as output arrives; the machine and token are checked before the
        first one."""
        runner, container, request = self._command(
            machine_id, lease_token, cmd, cwd, env, timeout_s
        )
        return commands.stream(runner, container, request, cap=self.settings.exec_output_cap)

    def _command(
        self,
        machine_id: str,
        lease_token: int | None,
        cmd: str,
        cwd: str | None,
        env: dict[str, str],
        timeout_s: float,
    ) -> tuple[SshCommands | Provider, str, commands.ExecRequest]:
        machine = machine_for_command(db=self.db, machine_id=machine_id, lease_token=lease_token)
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
        closed = self.forwards.close_machine(machine.id)
        closed += self.sessions.end_machine(machine.id, why)
        self.ssh.drop(machine.container_name)
        if closed:
            log.info("closed %d channel(s) into %s: %s", closed, machine.id, why)

    def close(self) -> None:
        self.forwards.close()
        self.sessions.close()
        self.ssh.close()


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
