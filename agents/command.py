"""``command``: runs the shell commands it is given, in order, stopping at the first failure."""

from __future__ import annotations

from agents.base import Artifact, Assignment, StageResult


class CommandAgent:
    name = "command"

    def run(self, work: Assignment) -> StageResult:
        commands = work.params.get("commands") or (
            [work.params["cmd"]] if "cmd" in work.params else []
        )
        if not commands:
            return StageResult(
                "failed", "command agent needs 'cmd' or 'commands' in its 'with' block"
            )
        log: list[str] = []
        exit_codes: list[int | None] = []
        for cmd in commands:
            work.log(f"$ {cmd}")
            result = work.machine.run(str(cmd), timeout_s=work.timeout_s)
            exit_codes.append(result.exit_code)
            log += [f"$ {cmd}", result.stdout, result.stderr]
            if not result.ok:
                reason = "timed out" if result.timed_out else f"exit {result.exit_code}"
                return StageResult(
                    "failed",
                    f"{cmd!r} failed ({reason})",
                    outputs={"exit_codes": exit_codes},
                    artifacts=[_log(log)],
                )
        return StageResult(
            "passed",
            f"{len(commands)} command(s) passed",
            outputs={"exit_codes": exit_codes},
            artifacts=[_log(log)],
        )


def _log(lines: list[str]) -> Artifact:
    return Artifact("log", "command.log", "\n".join(lines).encode(), "text/plain; charset=utf-8")
