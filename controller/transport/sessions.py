"""Persistent shell sessions: one long-lived bash per session on an SSH channel.

Protocol (see ``_SHELL``): we send the command text ended by a NUL, then a line with a
fresh random marker. The shell reads the command (``read -d ''``; builtins only, so no
process starts per command), evals it in its own context (``cd`` and ``export`` carry
over) with stdin from /dev/null, then reads the marker line, which the command never saw,
and prints ``<marker> <exit code>``. Output is everything before the marker.

A timeout sends SIGUSR1 to the shell (whose trap returns from the command, even from a
builtin loop; SIGINT is not used because bash mishandles a trap that returns while it
waits for a child) and SIGKILL to the processes the command started, over a second
channel; the session stays usable.

A dropped connection does not lose the session: when its input ends, the shell writes its
directory and exported variables to a file in the machine (``$SF_STATE``, on tmpfs) before
it exits, and the next command opens a new shell on a new connection that loads them
(``Session._reopen_or_lose``). Shell variables that were not exported, functions and background jobs
do not survive; a command in flight when the connection dropped has no known result. A
shell that exits (``exit``), a machine that restarted, or a session closed on purpose is
``lost``. The kept state carries the machine's fence: when the controller itself restarted,
the next process takes a session over from it (``service.known_session``), but only under
the same lease.

The kept state is authenticated: the controller gives each shell, on its input and never in
an argument, a file or the environment, a key of its own (``state_key``: an HMAC of the
session, machine and fence under the install's secret), the shell signs what it keeps with
it (HMAC-SHA256), and a shell that restores checks the signature before it reads anything.
A state that another process of the machine rewrote fails the check: the session is lost
(410, "failed its integrity check") and nothing of that state runs.

A shell writes its state aside and renames it into place, so a restoring shell reads the
whole of one state or none; one that vanished as it was read (its session was closed just
then) is nothing kept, not a forgery. A session closed on purpose keeps nothing, and its
close returns only once that holds (``Session.close_for_good``), so a command after a
``DELETE`` finds no state to restore (404).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NoReturn

import anyio.to_thread
import paramiko

from controller.errors import Conflict, NotFound, SessionLost, ShopfloorError, TransportError
from controller.transport.output import HeadTail

log = logging.getLogger(__name__)

STATE_DIR = "/dev/shm"
"""Where a session's shell keeps its state when its connection drops (tmpfs: gone when the
machine restarts, as the shell is)."""
INTERRUPT_GRACE_S = 5.0
"""How long an interrupted command may take to let go before the session is given up."""
CLOSE_WAIT_S = 2.0
"""How long a closed session's shell may take to remove its kept state and end before the
controller removes that state itself."""

_SHELL = r"""exec 2>&1
umask 077
IFS= read -r __sf_key || exit 0
[ -w "${SF_STATE%/*}" ] || SF_STATE="/tmp/${SF_STATE##*/}"
declare +x SF_STATE SF_FENCE
cd -- "$SF_WORKDIR" 2>/dev/null || cd /workspace 2>/dev/null || cd
unset SF_WORKDIR
__sf_py() { /usr/bin/python3 -I -S -c "$@"; }
if [ -n "$SF_RESTORE" ]; then
  unset SF_RESTORE
  [ -e "$SF_STATE" ] || { printf 'gone\n'; exit 0; }
  __sf_state=$(printf '%s\n' "$__sf_key" | __sf_py '
import hashlib, hmac, sys
key = sys.stdin.buffer.readline().rstrip(b"\n")
try:
    with open(sys.argv[1], "rb") as fh:
        mac, _, body = fh.read(1 << 22).partition(b"\n")
except FileNotFoundError:
    sys.exit(5)
except OSError:
    sys.exit(4)
if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).hexdigest().encode()):
    sys.exit(3)
sys.stdout.buffer.write(body)
' "$SF_STATE")
  case $? in
    0) ;;
    5) printf 'gone\n'; exit 0 ;;
    *) rm -f -- "$SF_STATE"; printf 'forged\n'; exit 0 ;;
  esac
  eval "$__sf_state" >/dev/null 2>&1
  unset __sf_state
  [ "$__sf_restored" = 1 ] || { printf 'gone\n'; exit 0; }
  unset __sf_restored
fi
__sf_save() {
  local body
  body=$(printf 'cd -- %q\n' "$PWD"; export -p; echo "__sf_fence=$SF_FENCE __sf_restored=1")
  printf '%s\n%s' "$__sf_key" "$body" | __sf_py '
import hashlib, hmac, os, sys
key, _, body = sys.stdin.buffer.read().partition(b"\n")
path = sys.argv[1]
temp = path + "." + os.urandom(8).hex()
fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
try:
    with os.fdopen(fd, "wb") as fh:
        fh.write(hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b"\n" + body)
    os.replace(temp, path)
except BaseException:
    os.unlink(temp)
    raise
' "$SF_STATE" || rm -f -- "$SF_STATE"
}
__sf_run() { eval "$__sf_cmd"; }
trap 'return 130 2>/dev/null' USR1
printf 'ready %s %s\n' "$$" "${__sf_fence:-$SF_FENCE}"
unset __sf_fence
while IFS= read -r -d '' __sf_cmd; do
  [ -n "$__sf_cmd" ] || exec rm -f -- "$SF_STATE"
  __sf_run </dev/null
  __sf_rc=$?
  IFS= read -r __sf_id || break
  printf '%s %s\n' "$__sf_id" "$__sf_rc"
done
__sf_save 2>/dev/null
"""
_QUIT = b"\0"
"""An empty command: the shell ends without keeping its state (the session was closed)."""

# Kill what the timed-out command started (descendants of the shell younger than the
# command), and interrupt the shell itself so a builtin loop returns too.
_INTERRUPT = r"""
kill -USR1 {pid} 2>/dev/null
ps -e -o pid=,ppid=,etimes= | awk -v root={pid} -v maxage={age} '
  {{ parent[$1] = $2; age[$1] = $3 }}
  END {{ for (p in parent) {{ q = p
    while ((q in parent) && q != root && q > 1) q = parent[q]
    if (q == root && p != root && age[p] <= maxage) print p }} }}' | xargs -r kill -KILL
"""


@dataclass(frozen=True)
class SessionResult:
    exit_code: int | None
    output: str
    duration_ms: float
    truncated: bool
    timed_out: bool


@dataclass
class Session:
    """One bash on one channel. Commands run one at a time."""

    id: str
    machine_id: str
    fence: int
    channel: paramiko.Channel
    transport: paramiko.Transport
    shell_pid: int
    output_cap: int
    workdir: str = "/workspace"
    state_key: str = ""
    """The key this session's shells sign and check their kept state with (``state_key``)."""
    reopen: Callable[[], paramiko.Transport] | None = None
    """A live connection to the machine, to reopen the session on after its own dropped."""
    lost_reason: str | None = None
    lost_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def alive(self) -> bool:
        return self.lost_reason is None and not self.channel.closed and self.transport.is_active()

    async def run_async(self, cmd: str, timeout_s: float) -> SessionResult:
        """Run from the event loop: wait on the channel's file descriptor, not in a thread.

        A short command answers in well under a millisecond, so the hop to a worker thread
        and back would cost more than the command (see bench/exec.py).
        """
        with self._turn(cmd):
            command = await self._send(cmd, timeout_s)
            chunks = 0
            while not command.reader.done:
                now = time.monotonic()
                if now >= command.deadline:
                    self._on_deadline(command, now)
                    await anyio.to_thread.run_sync(self._interrupt, now - command.started)
                    continue
                channel = self.channel
                if channel.recv_ready() or channel.eof_received or channel.closed:
                    chunk = channel.recv(65536)  # does not block: data, EOF or closed
                    if not chunk:
                        await self._ended_mid_command(channel)
                    command.reader.feed(chunk)
                    chunks += 1
                    if chunks % 16 == 0:
                        await asyncio.sleep(0)  # a flood of output must not starve the loop
                    continue
                await _readable(channel, min(command.deadline - now, 1.0))
            return command.result()

    @contextmanager
    def _turn(self, cmd: str) -> Iterator[None]:
        if "\x00" in cmd:
            raise ShopfloorError("a command cannot contain a NUL byte")
        if not self._lock.acquire(blocking=False):
            raise Conflict(f"session {self.id} is busy with another command; wait for it")
        try:
            yield
        finally:
            self._lock.release()

    async def _reopen_or_lose(self) -> None:
        """The shell or its connection is gone: reopen it where its state was kept."""
        if self.lost_reason is not None or self.reopen is None:
            self._lose(self.lost_reason or "its shell or the connection to the machine is gone")
        await self._lose_if_the_shell_exited(self.channel)
        try:
            await anyio.to_thread.run_sync(self._reopen)
        except SessionLost as exc:
            self._mark_lost(
                exc.message.removeprefix("session lost: ").removesuffix("; open a new session")
            )
            raise
        except (ShopfloorError, paramiko.SSHException, OSError, EOFError) as exc:
            self._lose(f"its connection dropped and it could not be reopened: {exc}")

    def _reopen(self) -> None:
        assert self.reopen is not None
        transport = self.reopen()
        self.channel, self.shell_pid = _start_shell(
            transport,
            self.id,
            self.machine_id,
            self.workdir,
            self.fence,
            restore=True,
            state_key=self.state_key,
        )
        self.transport = transport
        log.info("session %s reopened on %s after its connection dropped", self.id, self.machine_id)

    async def _ended_mid_command(self, channel: paramiko.Channel) -> None:
        """The channel ended while a command ran: the shell exited, or the connection dropped."""
        await self._lose_if_the_shell_exited(channel)
        raise TransportError(
            f"the connection to {self.machine_id} dropped while the command ran, so its result "
            "is unknown; the session kept its directory and exported variables, and the next "
            "command reopens it"
        )

    async def _lose_if_the_shell_exited(self, channel: paramiko.Channel) -> None:
        status = await anyio.to_thread.run_sync(_exit_status, channel)
        if status is not None:
            self._lose(f"the shell exited with status {status}")

    async def _send(self, cmd: str, timeout_s: float) -> _Command:
        """Send the command, reopening the session first if its connection dropped (also
        when the drop is only noticed by this send: the command did not reach the shell)."""
        if not self.alive:
            await self._reopen_or_lose()
        try:
            return self._start(cmd, timeout_s)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if self.transport.is_active():
                self._lose(f"cannot send to the shell: {exc}")
        await self._reopen_or_lose()
        try:
            return self._start(cmd, timeout_s)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._lose(f"cannot send to the shell: {exc}")

    def _start(self, cmd: str, timeout_s: float) -> _Command:
        marker = f"__sf_{secrets.token_hex(12)}__ ".encode()
        started = time.monotonic()
        self.channel.sendall(cmd.encode() + b"\0" + marker[:-1] + b"\n")
        reader = _MarkerReader(marker, HeadTail(self.output_cap))
        return _Command(reader, started, timeout_s, deadline=started + timeout_s)

    def _on_deadline(self, command: _Command, now: float) -> None:
        """The first deadline interrupts (the caller does); the second gives the shell up."""
        if command.timed_out:
            self._mark_lost(
                f"the command ignored the interrupt for {INTERRUPT_GRACE_S:g}s after "
                f"its {command.timeout_s:g}s timeout, so the shell was closed"
            )
            self.close()
            self._lose("")
        command.timed_out = True
        command.deadline = now + INTERRUPT_GRACE_S

    def _interrupt(self, age_s: float) -> None:
        script = _INTERRUPT.format(pid=self.shell_pid, age=int(age_s) + 2)
        try:
            channel = self.transport.open_session(timeout=10)
            channel.exec_command(f"sh -c {shlex.quote(script)}")
            channel.recv_exit_status()
            channel.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            log.warning("could not interrupt session %s: %s", self.id, exc)

    def _mark_lost(self, reason: str) -> None:
        if self.lost_reason is None:
            self.lost_reason, self.lost_at = reason, time.monotonic()

    def _lose(self, reason: str) -> NoReturn:
        self._mark_lost(reason)
        raise SessionLost(f"session lost: {self.lost_reason}; open a new session", session=self.id)

    def close(self, reason: str = "it was closed", *, wait_s: float = 0) -> bool:
        """Tell the shell to remove its kept state and end, and close its channel. With
        ``wait_s``, wait that long for it to have ended (after the removal); answer whether
        it did."""
        self._mark_lost(reason)
        channel, ended = self.channel, False
        try:
            if not channel.closed:
                channel.sendall(_QUIT)  # the shell removes its kept state and ends
                if wait_s > 0:
                    channel.shutdown_write()
                    ended = channel.status_event.wait(wait_s) and channel.recv_exit_status() == 0
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            try:
                channel.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass
        return ended

    def close_for_good(self) -> None:
        """Closed on purpose (``DELETE``): once this returns, the machine holds no state of
        the session, so no later command (of this controller process or the next) loads it.
        The shell removes it and ends; a shell that does not end in time (busy with a
        command, or its connection dropped after it kept its state) has it removed over a
        channel of its own."""
        was_open = self.lost_reason is None
        if self.close(wait_s=CLOSE_WAIT_S):
            return
        try:
            if self.transport.is_active():
                transport = self.transport
            elif was_open and self.reopen is not None:
                transport = self.reopen()
            else:
                return  # lost already: closed with its state, or its machine is gone
            discard_kept_state(transport, self.id)
        except (ShopfloorError, paramiko.SSHException, OSError, EOFError) as exc:
            log.warning("session %s: could not remove its kept state: %s", self.id, exc)


@dataclass
class _Command:
    """One command in flight: its output so far and its clock."""

    reader: _MarkerReader
    started: float
    timeout_s: float
    deadline: float
    timed_out: bool = False

    def result(self) -> SessionResult:
        output = self.reader.captured.text()
        if self.timed_out:
            output += (
                f"\n[shopfloor: command timed out after {self.timeout_s:g}s and was interrupted]"
            )
        return SessionResult(
            exit_code=self.reader.exit_code,
            output=output,
            duration_ms=round((time.monotonic() - self.started) * 1000, 2),
            truncated=self.reader.captured.truncated,
            timed_out=self.timed_out,
        )


async def _readable(channel: paramiko.Channel, timeout_s: float) -> None:
    """Until the channel has data, EOF or closes (its pipe is set then), or the timeout."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = channel.fileno()
    loop.add_reader(fd, _wake, ready)
    timer = loop.call_later(timeout_s, _wake, ready)  # not wait_for: its task costs more
    try:
        await ready
    finally:
        timer.cancel()
        loop.remove_reader(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _exit_status(channel: paramiko.Channel) -> int | None:
    """The shell's exit status, or None when the connection dropped first. sshd sends the
    status just after end-of-file; on a live connection, give it a moment to arrive."""
    transport = channel.get_transport()
    live = transport is not None and transport.is_active()
    if not channel.status_event.wait(2 if live else 0):
        return None
    status = channel.recv_exit_status()
    return None if status == -1 else status  # -1: paramiko closed it, the shell never said


def _exit_reason(channel: paramiko.Channel) -> str:
    status = _exit_status(channel)
    return "the connection dropped" if status is None else f"the shell exited with status {status}"


class _MarkerReader:
    """Feeds output into a capture until the marker line, which may arrive split."""

    def __init__(self, marker: bytes, captured: HeadTail) -> None:
        self.marker = marker
        self.captured = captured
        self.pending = bytearray()
        self.after: bytearray | None = None
        self.exit_code: int | None = None
        self.done = False

    def feed(self, chunk: bytes) -> None:
        if self.after is not None:
            self.after += chunk
        else:
            self.pending += chunk
            at = self.pending.find(self.marker)
            if at < 0:
                keep = len(self.marker) - 1
                flush = len(self.pending) - keep
                if flush > 0:
                    self.captured.write(bytes(self.pending[:flush]))
                    del self.pending[:flush]
                return
            self.captured.write(bytes(self.pending[:at]))
            self.after = self.pending[at + len(self.marker) :]
            self.pending = bytearray()
        line, newline, _ = bytes(self.after).partition(b"\n")
        if newline:
            self.exit_code = int(line.strip() or b"-1")
            self.done = True


class NothingKept(SessionLost):
    """The machine holds no state for the session: it was closed, never opened there, or
    the machine restarted or was reset."""


def unknown_session(machine_id: str, session_id: str) -> NotFound:
    return NotFound(f"no session {session_id} on machine {machine_id}")


def earlier_lease(session_id: str, machine_id: str) -> SessionLost:
    return SessionLost(
        f"session lost: {session_id} was opened under an earlier lease of {machine_id}; "
        "open a new session",
        session=session_id,
    )


def state_key(secret: bytes, *, machine_id: str, session_id: str, fence: int) -> str:
    """The key one session's shells sign their kept state with: bound to the machine, the
    session and the lease (fence), derived from the install's secret, which never leaves
    the controller."""
    what = f"{machine_id}\0{session_id}\0{fence}".encode()
    return hmac.new(secret, what, hashlib.sha256).hexdigest()


def discard_kept_state(transport: paramiko.Transport, session_id: str) -> None:
    """Remove what a session's shells keep in the machine (wherever ``_SHELL`` keeps it)."""
    name = shlex.quote(f".shopfloor-session-{session_id}")
    channel = transport.open_session(timeout=10)
    try:
        channel.exec_command(f"rm -f -- {STATE_DIR}/{name} /tmp/{name}")
        if not channel.status_event.wait(10) or channel.recv_exit_status() != 0:
            raise TransportError(f"removing the kept state of session {session_id} failed")
    finally:
        channel.close()


def forged(session_id: str) -> SessionLost:
    return SessionLost(
        "session lost: the state its shell kept in the machine failed its integrity check "
        "(a process of the machine changed it), so it was refused and not loaded; "
        "open a new session",
        session=session_id,
    )


def open_session(
    *,
    transport: paramiko.Transport,
    session_id: str,
    machine_id: str,
    fence: int,
    workdir: str,
    output_cap: int,
    state_secret: bytes,
    reopen: Callable[[], paramiko.Transport] | None = None,
    restore: bool = False,
) -> Session:
    """Start a bash on a new channel and wait for it to say it is ready. With ``restore``,
    one that takes over the state an earlier shell of this session kept in the machine
    (another controller process opened it)."""
    key = state_key(state_secret, machine_id=machine_id, session_id=session_id, fence=fence)
    channel, shell_pid = _start_shell(
        transport, session_id, machine_id, workdir, fence, restore=restore, state_key=key
    )
    return Session(
        id=session_id,
        machine_id=machine_id,
        fence=fence,
        channel=channel,
        transport=transport,
        shell_pid=shell_pid,
        output_cap=output_cap,
        workdir=workdir,
        state_key=key,
        reopen=reopen,
    )


def _start_shell(
    transport: paramiko.Transport,
    session_id: str,
    machine_id: str,
    workdir: str,
    fence: int,
    *,
    restore: bool,
    state_key: str,
) -> tuple[paramiko.Channel, int]:
    """A session's bash on a new channel, once it says it is ready, and its pid. With
    ``restore``, one that loads the state the session's last shell kept when its
    connection dropped, if that shell ran under the same lease (``fence``)."""
    channel = transport.open_session(timeout=30)
    env = {
        "SF_WORKDIR": workdir,
        "SF_STATE": f"{STATE_DIR}/.shopfloor-session-{session_id}",
        "SF_FENCE": str(fence),
    }
    if restore:
        env["SF_RESTORE"] = "1"
    assigned = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    command = f"{assigned} exec bash --noprofile --norc -c {shlex.quote(_SHELL)}"
    channel.exec_command(command)
    channel.sendall(state_key.encode() + b"\n")  # its input: never in argv, env or a file
    channel.settimeout(30)
    banner = b""
    while not banner.endswith(b"\n"):
        chunk = channel.recv(256)
        if not chunk:
            raise SessionLost(f"session lost: the shell did not start ({_exit_reason(channel)})")
        banner += chunk
    word, pid, kept_fence = (banner.decode(errors="replace").split() + ["", "", ""])[:3]
    if word == "forged":
        channel.close()
        raise forged(session_id)
    if word == "gone":
        channel.close()
        raise NothingKept(
            "session lost: its connection dropped and the machine no longer holds its state "
            "(it restarted or was reset); open a new session",
            session=session_id,
        )
    if word != "ready" or not pid.isdigit():
        channel.close()
        raise ShopfloorError(f"the session shell said {banner[:200]!r} instead of ready")
    if kept_fence != str(fence):
        channel.sendall(_QUIT)  # its state belongs to an earlier lease: remove it
        channel.close()
        raise earlier_lease(session_id, machine_id)
    return channel, int(pid)


class SessionRegistry:
    """Open sessions of this controller process, by id; each belongs to one machine."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._guard = threading.Lock()

    def add(self, session: Session) -> None:
        with self._guard:
            self._sweep()
            self._sessions[session.id] = session

    def find(self, machine_id: str, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        return session if session is not None and session.machine_id == machine_id else None

    def get(self, machine_id: str, session_id: str) -> Session:
        session = self.find(machine_id, session_id)
        if session is None:
            raise unknown_session(machine_id, session_id)
        return session

    def remove(self, machine_id: str, session_id: str) -> None:
        session = self.get(machine_id, session_id)
        with self._guard:
            self._sessions.pop(session_id, None)
        session.close_for_good()

    def for_machine(self, machine_id: str) -> list[Session]:
        with self._guard:
            return [s for s in self._sessions.values() if s.machine_id == machine_id]

    def open_count(self, machine_id: str | None = None) -> int:
        """Sessions not closed nor lost (of one machine, or all): those that hold a shell,
        or will reopen one after a dropped connection."""
        with self._guard:
            return sum(
                1
                for s in self._sessions.values()
                if s.lost_reason is None and (machine_id is None or s.machine_id == machine_id)
            )

    def end_machine(self, machine_id: str, reason: str, *, before_fence: int | None = None) -> int:
        """Close the machine's sessions (only those opened under a fence older than
        ``before_fence``, when given) but remember them, lost with ``reason``, so that their
        next command is answered 410 rather than 404; answer how many were closed."""
        ending = [
            s
            for s in self.for_machine(machine_id)
            if s.lost_reason is None and (before_fence is None or s.fence < before_fence)
        ]
        for session in ending:
            session.close(reason)
        return len(ending)

    def _sweep(self) -> None:
        """Forget sessions that died long ago, so a busy controller does not grow forever."""
        for sid, session in list(self._sessions.items()):
            if not session.alive and session.lost_at and time.monotonic() - session.lost_at > 600:
                del self._sessions[sid]

    def close(self) -> None:
        with self._guard:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()
