"""The machine handle the run driver gives agents: commands over the machine's SSH
connection (the engine's exec where it has no sshd), files over SFTP, real port forwards,
all through the controller's machine access (``ctl.access``), under the fence of the lease
the handle was made for: a forward it opens closes when that lease ends.

Agents are trusted code: paths are not confined to /workspace here, only in the API.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Mapping

import paramiko

from agents.base import CommandResult, MachineHandle
from controller.errors import ShopfloorError
from controller.services import access, tracing
from controller.services.runtime import Controller
from controller.store.models import Machine
from controller.transport import exec as commands


class SshMachineHandle:
    def __init__(self, ctl: Controller, machine: Machine) -> None:
        self.access = ctl.access
        self.tracing = ctl.tracing
        self.settings = ctl.settings
        self.machine = machine
        self.machine_id = machine.id
        self.fence = machine.fence
        self.workdir = machine.workdir
        self.container = machine.container_name
        self.commands = ctl.access.commands.for_container(machine.container_name)

    def run(
        self,
        cmd: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 600,
    ) -> CommandResult:
        request = commands.ExecRequest(
            cmd=cmd, cwd=cwd or self.workdir, env=env or {}, timeout_s=timeout_s
        )
        cap = self.settings.exec_output_cap
        attributes = {"machine.id": self.machine_id, "command": tracing.short(cmd)}
        with self.tracing.span("machine.run", attributes) as span:
            result = commands.run(self.commands, self.container, request, cap=cap)
            if span.is_recording():
                if result.exit_code is not None:
                    span.set_attribute("command.exit_code", result.exit_code)
                span.set_attribute("command.timed_out", result.timed_out)
                if result.exit_code != 0:
                    tracing.failed(span, f"exit code {result.exit_code}")
        return CommandResult(**result.__dict__)

    def read_file(self, path: str) -> bytes:
        target = self._absolute(path)
        attributes = {"machine.id": self.machine_id, "file.path": tracing.short(target)}
        with self.tracing.span("machine.read_file", attributes) as span:
            data = self._read(target)
            span.set_attribute("file.bytes", len(data))
            return data

    def _read(self, target: str) -> bytes:
        with self.access.sftp(self.machine) as sftp:
            try:
                with sftp.open(target, "rb") as fh:
                    fh.prefetch()
                    return bytes(fh.read())
            except OSError as exc:
                raise ShopfloorError(f"cannot read {target} in {self.machine_id}: {exc}") from exc

    def write_file(self, path: str, data: bytes) -> None:
        target = self._absolute(path)
        attributes = {
            "machine.id": self.machine_id,
            "file.path": tracing.short(target),
            "file.bytes": len(data),
        }
        with self.tracing.span("machine.write_file", attributes):
            self._write(target, data)

    def write_files(self, files: Mapping[str, bytes]) -> None:
        """All of ``files`` over one SFTP session: opening one costs more than a small file's
        write (the driver's handoff notes: run.json with the lessons, a stage's notes)."""
        if not files:
            return
        with self.access.sftp(self.machine) as sftp:
            made: set[str] = set()
            for path, data in files.items():
                target = self._absolute(path)
                attributes = {
                    "machine.id": self.machine_id,
                    "file.path": tracing.short(target),
                    "file.bytes": len(data),
                }
                with self.tracing.span("machine.write_file", attributes):
                    self._write_in(sftp, target, data, made)

    def _write(self, target: str, data: bytes) -> None:
        with self.access.sftp(self.machine) as sftp:
            self._write_in(sftp, target, data, set())

    def _write_in(
        self, sftp: paramiko.SFTPClient, target: str, data: bytes, made: set[str]
    ) -> None:
        directory = posixpath.dirname(target)
        try:
            if directory not in made:
                _makedirs(sftp, directory)
                made.add(directory)
            with sftp.open(target, "wb") as fh:
                fh.set_pipelined(True)
                fh.write(data)
        except OSError as exc:
            raise ShopfloorError(f"cannot write {target} in {self.machine_id}: {exc}") from exc

    def forward(self, port: int) -> str:
        forward, _ = self.access.open_forward(
            machine_id=self.machine_id, key=access.Key.internal(self.fence), port=port
        )
        return forward.url

    def _absolute(self, path: str) -> str:
        return path if path.startswith("/") else posixpath.join(self.workdir, path)


def handle_for(ctl: Controller, machine: Machine) -> MachineHandle:
    """The one place the run driver gets a handle on a machine (swap the transport here)."""
    return SshMachineHandle(ctl, machine)


def _makedirs(sftp: paramiko.SFTPClient, directory: str) -> None:
    try:
        if stat.S_ISDIR(sftp.stat(directory).st_mode or 0):
            return
    except FileNotFoundError:
        pass
    parent = posixpath.dirname(directory)
    if parent != directory:
        _makedirs(sftp, parent)
    sftp.mkdir(directory)
