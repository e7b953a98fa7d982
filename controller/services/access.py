"""What the routes and agents ask of a machine's SSH channel: sessions, files, ports.

Callers first get the machine through ``machines.machine_for_command`` (state and lease token
checked); these functions take it from there.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
from collections.abc import Iterator

import anyio.to_thread
import paramiko

from controller.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    TransportError,
)
from controller.services import machines
from controller.services.runtime import Controller
from controller.store.db import unit_of_work
from controller.store.models import Machine
from controller.transport import sessions, sftp
from controller.transport.forward import Forward

log = logging.getLogger(__name__)


SESSION_ID = re.compile(r"s-[0-9a-f]{16}")
_reviving = threading.Lock()


def open_session(*, ctl: Controller, machine: Machine) -> sessions.Session:
    return _start_session(ctl, machine, f"s-{secrets.token_hex(8)}", restore=False)


def _start_session(
    ctl: Controller, machine: Machine, session_id: str, *, restore: bool
) -> sessions.Session:
    container = machine.container_name
    session = sessions.open_session(
        transport=ctl.ssh.transport(container),
        session_id=session_id,
        machine_id=machine.id,
        fence=machine.fence,
        workdir=machine.workdir,
        output_cap=ctl.settings.session_output_cap,
        reopen=lambda: ctl.ssh.transport(container),
        restore=restore,
    )
    ctl.sessions.add(session)
    return session


def known_session(ctl: Controller, machine_id: str, session_id: str) -> sessions.Session:
    """The session, also one that an earlier controller process opened (this one restarted):
    when that process's connection went, the shell kept its directory and exported variables
    in the machine, and a new shell takes them over, if the machine is still under the same
    lease. Blocking: runs a shell start when the session is not in memory."""
    session = ctl.sessions.find(machine_id, session_id)
    if session is not None:
        return session
    if not SESSION_ID.fullmatch(session_id):
        raise sessions.unknown_session(machine_id, session_id)
    with _reviving:  # two requests for the same session start one shell
        session = ctl.sessions.find(machine_id, session_id)
        if session is not None:
            return session
        with unit_of_work(ctl.reader) as tx:
            machine = machines.get_machine(tx, machine_id)
        try:
            session = _start_session(ctl, machine, session_id, restore=True)
        except sessions.NothingKept:
            raise sessions.unknown_session(machine_id, session_id) from None
        log.info("session %s on %s taken over from an earlier controller", session_id, machine_id)
        return session


async def run_in_session(
    *, ctl: Controller, machine_id: str, fence: int, session_id: str, cmd: str, timeout_s: float
) -> sessions.SessionResult:
    """``fence``: the machine's current one (see ``machines.fence_for_command``)."""
    session = ctl.sessions.find(machine_id, session_id)
    if session is None:  # not in this process's memory: in the machine, perhaps
        session = await anyio.to_thread.run_sync(known_session, ctl, machine_id, session_id)
    if session.fence != fence:
        session.close()
        raise sessions.earlier_lease(session_id, machine_id)
    return await session.run_async(cmd, timeout_s)


def close_session(*, ctl: Controller, machine: Machine, session_id: str) -> None:
    known_session(ctl, machine.id, session_id)
    ctl.sessions.remove(machine.id, session_id)


@contextlib.contextmanager
def sftp_client(ctl: Controller, machine: Machine) -> Iterator[paramiko.SFTPClient]:
    transport = ctl.ssh.transport(machine.container_name)
    try:
        client = paramiko.SFTPClient.from_transport(transport)
    except paramiko.SSHException as exc:
        raise TransportError(f"cannot open SFTP in {machine.id}: {exc}") from exc
    if client is None:
        raise TransportError(f"cannot open SFTP in {machine.id}")
    with client:
        yield client


def read_file(*, ctl: Controller, machine: Machine, path: str) -> bytes:
    with sftp_client(ctl, machine) as client, _file_errors("read", path):
        return sftp.read(client, path, cap=ctl.settings.file_cap_bytes)


def write_file(*, ctl: Controller, machine: Machine, path: str, data: bytes) -> str:
    with sftp_client(ctl, machine) as client, _file_errors("write", path):
        return sftp.write(client, path, data)


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


def open_forward(*, ctl: Controller, machine: Machine, port: int) -> tuple[Forward, bool]:
    """The forward (made once per machine and port) and whether something listens now."""
    if not 1 <= port <= 65535:
        raise InvalidInput(f"port {port} is not a TCP port (1-65535)")
    forward = ctl.forwards.open(machine_id=machine.id, container=machine.container_name, port=port)
    try:
        forward.open_channel().close()
        listening = True
    except Exception:  # noqa: BLE001 - a probe: any failure means "not listening now"
        listening = False
    return forward, listening
