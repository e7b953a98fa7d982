"""The machine handle the run driver gives agents: commands over the machine's SSH
connection (the engine's exec where it has no sshd), files over SFTP, real port forwards.

Agents are trusted code: paths are not confined to /workspace here, only in the API.
"""

from __future__ import annotations

import posixpath
import stat

import paramiko

from agents.base import CommandResult, MachineHandle
from controller.errors import ShopfloorError
from controller.services.runtime import Controller
from controller.store.models import Machine
from controller.transport import exec as commands


class SshMachineHandle:
    def __init__(self, ctl: Controller, machine: Machine) -> None:
        self.ctl = ctl
        self.machine_id = machine.id
        self.workdir = machine.workdir
        self.container = machine.container_name
        self.commands = ctl.commands.for_container(machine.container_name)

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
        cap = self.ctl.settings.exec_output_cap
        result = commands.run(self.commands, self.container, request, cap=cap)
        return CommandResult(**result.__dict__)

    def read_file(self, path: str) -> bytes:
        target = self._absolute(path)
        with self._sftp() as sftp:
            try:
                with sftp.open(target, "rb") as fh:
                    fh.prefetch()
                    return bytes(fh.read())
            except OSError as exc:
                raise ShopfloorError(f"cannot read {target} in {self.machine_id}: {exc}") from exc

    def write_file(self, path: str, data: bytes) -> None:
        target = self._absolute(path)
        with self._sftp() as sftp:
            try:
                _makedirs(sftp, posixpath.dirname(target))
                with sftp.open(target, "wb") as fh:
                    fh.set_pipelined(True)
                    fh.write(data)
            except OSError as exc:
                raise ShopfloorError(f"cannot write {target} in {self.machine_id}: {exc}") from exc

    def forward(self, port: int) -> str:
        forward = self.ctl.forwards.open(
            machine_id=self.machine_id, container=self.container, port=port
        )
        return forward.url

    def _sftp(self) -> paramiko.SFTPClient:
        client = paramiko.SFTPClient.from_transport(self.ctl.ssh.transport(self.container))
        if client is None:
            raise ShopfloorError(f"cannot open SFTP in {self.machine_id}")
        return client

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
