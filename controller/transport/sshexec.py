"""One-shot commands over the pooled SSH connection: the engine's exec, only faster.

:class:`SshCommands` has the ``exec`` method of a provider, so ``transport.exec.run`` and
``stream`` (timeouts, caps, NDJSON) work on it unchanged. A new channel on an open
connection costs a few milliseconds where a ``docker exec`` costs tens. Machines whose
image has no sshd fall back to the engine (:func:`runner_for`).
"""

from __future__ import annotations

import selectors
import shlex
import time
from collections.abc import Iterator

import paramiko

from controller.errors import TransportError
from controller.providers.base import Provider, StreamName
from controller.transport.ssh import SshPool

# sshd gives sessions its own PATH; the image's ENV has the sbin folders too.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NO_SSH_RETRY_S = 60.0
EXIT_QUIET_S = 0.1
"""After the command exits, stop reading once its output has been quiet this long..."""
EXIT_DRAIN_MAX_S = 2.0
"""...or this long at most (a background child that keeps printing is not waited for)."""
_BUFFER = 65536


class SshExec:
    """A started command on a channel: demultiplexed output, then the exit code."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel

    def __iter__(self) -> Iterator[tuple[StreamName, bytes]]:
        """Output until end-of-file, or shortly after the command exits.

        sshd sends end-of-file only when every holder of the output pipes closed them, so
        ``server &`` without redirections would keep the channel open for as long as the
        server lives. Like ``docker exec``, we end with the command: after its exit
        status, what still arrives within a short quiet period is kept, then we stop.
        """
        channel = self.channel
        exited_at: float | None = None
        quiet_since = time.monotonic()
        # epoll, not select(): a busy controller holds descriptors numbered over 1,024.
        with selectors.DefaultSelector() as waiting:
            waiting.register(channel, selectors.EVENT_READ)
            yield from self._read(waiting, exited_at, quiet_since)

    def _read(
        self, waiting: selectors.BaseSelector, exited_at: float | None, quiet_since: float
    ) -> Iterator[tuple[StreamName, bytes]]:
        channel = self.channel
        while True:
            waiting.select(EXIT_QUIET_S if exited_at else 1.0)
            got = False
            while channel.recv_ready():
                got = True
                yield "stdout", channel.recv(_BUFFER)
            while channel.recv_stderr_ready():
                got = True
                yield "stderr", channel.recv_stderr(_BUFFER)
            drained = not channel.recv_ready() and not channel.recv_stderr_ready()
            if drained and (channel.eof_received or channel.closed):
                return
            now = time.monotonic()
            if got:
                quiet_since = now
            if exited_at is None and channel.exit_status_ready():
                exited_at = now
            if exited_at is not None and (
                now - quiet_since >= EXIT_QUIET_S or now - exited_at >= EXIT_DRAIN_MAX_S
            ):
                return

    def exit_code(self) -> int | None:
        try:
            if not self.channel.status_event.wait(30):
                return None
            code = self.channel.recv_exit_status()
            return None if code < 0 else code
        finally:
            self.channel.close()


def command_line(argv: list[str], workdir: str | None, env: dict[str, str] | None) -> str:
    """What sshd's shell runs: cd, then exec the argv with the image's PATH and ``env``."""
    assignments = [f"PATH={IMAGE_PATH}", *(f"{k}={v}" for k, v in (env or {}).items())]
    run = f"exec env -- {shlex.join(assignments)} {shlex.join(argv)}"
    return f"cd -- {shlex.quote(workdir)} && {run}" if workdir else run


class SshCommands:
    """The ``exec`` part of a provider, over SSH (as ``runner``, the engine path's user)."""

    def __init__(self, pool: SshPool) -> None:
        self.pool = pool

    def exec(
        self,
        name_or_id: str,
        argv: list[str],
        *,
        user: str = "runner",
        workdir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> SshExec:
        transport = self.pool.transport(name_or_id)
        try:
            channel = transport.open_session(timeout=30)
            channel.exec_command(command_line(argv, workdir, env))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TransportError(f"cannot start a command in {name_or_id} over SSH: {exc}") from exc
        return SshExec(channel)


class CommandRunner:
    """Chooses SSH where the machine has sshd, else the engine, remembering which for a while."""

    def __init__(self, pool: SshPool, provider: Provider) -> None:
        self.ssh = SshCommands(pool)
        self.provider = provider
        self._no_ssh: dict[str, float] = {}

    def for_container(self, container: str) -> SshCommands | Provider:
        failed_at = self._no_ssh.get(container)
        if failed_at is not None and time.monotonic() - failed_at < NO_SSH_RETRY_S:
            return self.provider
        try:
            self.ssh.pool.get(container)
        except TransportError:
            self._no_ssh[container] = time.monotonic()
            return self.provider
        return self.ssh
