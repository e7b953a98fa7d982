"""``external``: a coding-agent CLI (Claude Code, Codex, Aider...) run inside the machine.

The command template names placeholders that are replaced by shell-quoted values, so a
task with quotes, ``$`` or newlines reaches the CLI as one argument and runs nothing:
``{task}``, ``{handoff_dir}``, ``{workdir}``, ``{plan}`` (the plan file's path), ``{lessons}``
(the path of ``lessons.md``: earlier runs' recurring failures, their fixes, flaky tests).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from agents import config
from agents.base import Artifact, Assignment, StageResult
from agents.reviewer import TEXT, diff_base, git_diff, run_evidence

NOT_FOUND = 127


def render(template: str, values: dict[str, str]) -> str:
    """``template`` with each ``{name}`` replaced by the quoted value; other braces stay."""
    command = template
    for name, value in values.items():
        command = command.replace("{" + name + "}", shlex.quote(value))
    return command


def program(template: str) -> str:
    try:
        words = shlex.split(template)
    except ValueError:
        return template.split()[0] if template.split() else ""
    while words and "=" in words[0] and not words[0].startswith("="):
        words.pop(0)  # leading VAR=value assignments
    return words[0] if words else ""


class ExternalAgent:
    name = "external"

    def run(self, work: Assignment) -> StageResult:
        cfg = config.load(work.machine.read_file, work.machine.workdir, work.params)
        template = str(work.params.get("command") or cfg.agent or "")
        if not template.strip():
            return StageResult(
                "failed",
                "external agent needs a command template: 'command' in its 'with' block "
                "or 'agent' in .shopfloor.toml (e.g. \"claude -p {task}\")",
            )
        exclude = run_evidence(work, cfg.junit)
        return run_external(work, template, prompt=work.task, name="external", exclude=exclude)


def run_external(
    work: Assignment, template: str, *, prompt: str, name: str, exclude: Sequence[str] = ()
) -> StageResult:
    """Shared with the planner: run the CLI, keep its transcript, record the diff it made
    (without ``exclude``: the run's own evidence, see :func:`agents.reviewer.run_evidence`)."""
    exe = program(template)
    check = work.machine.run(f"command -v -- {shlex.quote(exe)}", timeout_s=30)
    if not check.ok:
        return StageResult(
            "failed",
            f"the external agent command {exe!r} is not installed in the machine "
            "(install it in the template's setup or the image)",
            outputs={"exit_code": NOT_FOUND, "command": exe},
        )
    values = {
        "task": prompt,
        "handoff_dir": work.handoff_dir,
        "workdir": work.machine.workdir,
        "plan": f"{work.handoff_dir}/plan.md",
        "lessons": work.lessons_path,
    }
    command = render(template, values)
    base = diff_base(work.machine, work.ref)
    work.log(f"$ {command}")
    result = work.machine.run(
        command, env={"SHOPFLOOR_CONTEXT_DIR": work.handoff_dir}, timeout_s=work.timeout_s
    )
    transcript = f"$ {command}\n{result.stdout}{result.stderr}"
    patch = git_diff(work.machine, base, exclude=exclude)
    artifacts = [
        Artifact("log", f"{name}-transcript.log", transcript.encode(), TEXT, {"cmd": template}),
        Artifact("diff", f"{name}.patch", patch.encode(), "text/x-diff", {"base": base}),
    ]
    outputs = {"exit_code": result.exit_code, "base": base, "diff_bytes": len(patch)}
    if result.exit_code == NOT_FOUND:
        return StageResult(
            "failed", f"{exe!r} or a command it runs was not found (exit 127)", outputs, artifacts
        )
    if not result.ok:
        reason = "timed out" if result.timed_out else f"exit {result.exit_code}"
        return StageResult("failed", f"{exe} failed ({reason})", outputs, artifacts)
    changed = "changed files" if patch.strip() else "made no changes"
    return StageResult("passed", f"{exe} finished and {changed}", outputs, artifacts)
