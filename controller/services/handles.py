"""Machine handles for agents: commands through an executor (SSH or the engine), files via exec.

The base handle works on any machine; `handle_for` gives the SSH-backed one where it can.
"""

from __future__ import annotations

import base64
import shlex
from typing import TYPE_CHECKING

from agents.base import CommandResult, MachineHandle
from controller.errors import ShopfloorError
from controller.store.models import Machine
from controller.transport import exec as commands

if TYPE_CHECKING:
    from controller.services.runtime import Controller


class ExecMachineHandle:
    def __init__(self, provider: commands.Executor, machine: Machine, *, output_cap: int) -> None:
        self.provider = provider
        self.machine_id = machine.id
        self.workdir = machine.workdir
        self.container = machine.container_name
        self.output_cap = output_cap

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
        result = commands.run(self.provider, self.container, request, cap=self.output_cap)
        return CommandResult(**result.__dict__)

    def read_file(self, path: str) -> bytes:
        result = self.run(f"base64 -w0 -- {shlex.quote(path)}", timeout_s=120)
        if not result.ok:
            raise ShopfloorError(
                f"cannot read {path} in {self.machine_id}: {result.stderr.strip()}"
            )
        return base64.b64decode(result.stdout)

    def write_file(self, path: str, data: bytes) -> None:
        encoded = base64.b64encode(data).decode()
        quoted = shlex.quote(path)
        cmd = f'mkdir -p -- "$(dirname -- {quoted})" && printf %s {encoded} | base64 -d > {quoted}'
        result = self.run(cmd, timeout_s=120)
        if not result.ok:
            raise ShopfloorError(
                f"cannot write {path} in {self.machine_id}: {result.stderr.strip()}"
            )

    def forward(self, port: int) -> str:
        raise ShopfloorError("port forwarding needs the SSH transport")


def handle_for(ctl: Controller, machine: Machine) -> MachineHandle:
    """The one place the run driver gets a handle on a machine (swap the transport here).

    Commands go through the engine's exec; files and forwards over the machine's pooled
    SSH connection (:mod:`controller.services.ssh_handles`).
    """
    from controller.services.ssh_handles import SshMachineHandle  # imports the context

    return SshMachineHandle(ctl, machine)
