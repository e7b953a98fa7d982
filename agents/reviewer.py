"""``reviewer``: what changed (diff stat and the patch) and, if configured, the linter's say."""

from __future__ import annotations

import shlex

from agents import config
from agents.base import Artifact, Assignment, MachineHandle, StageResult

TEXT = "text/plain; charset=utf-8"


def diff_base(machine: MachineHandle, ref: str) -> str:
    """The commit the machine started from: the ref as cloned (``origin/<ref>``), else HEAD."""
    candidates = [f"refs/remotes/origin/{ref}", ref, "HEAD"] if ref else ["HEAD"]
    probe = " || ".join(
        f"git rev-parse --verify --quiet {shlex.quote(c + '^{commit}')}" for c in candidates
    )
    result = machine.run(probe, timeout_s=60)
    return result.stdout.strip().splitlines()[0] if result.ok and result.stdout.strip() else "HEAD"


def git_diff(machine: MachineHandle, base: str, *, stat: bool = False) -> str:
    """Working tree against ``base``, new files included.

    New files are marked intent-to-add in a throwaway copy of the index, so the repo's own
    index (what the agent staged) is left as it was.
    """
    flag = "--stat" if stat else "--binary"
    result = machine.run(
        'tmp=$(mktemp) && cp "$(git rev-parse --git-path index)" "$tmp" 2>/dev/null; '
        'export GIT_INDEX_FILE="$tmp"; git add --all --intent-to-add >/dev/null 2>&1; '
        f'git diff {flag} {shlex.quote(base)} --; rc=$?; rm -f "$tmp"; exit $rc',
        timeout_s=120,
    )
    return result.stdout


class ReviewerAgent:
    name = "reviewer"

    def run(self, work: Assignment) -> StageResult:
        cfg = config.load(work.machine.read_file, work.machine.workdir, work.params)
        base = str(work.params.get("base") or diff_base(work.machine, work.ref))
        stat = git_diff(work.machine, base, stat=True)
        patch = git_diff(work.machine, base)
        artifacts = [
            Artifact("diff", "changes.patch", patch.encode(), "text/x-diff", {"base": base}),
            Artifact("log", "diffstat.txt", stat.encode(), TEXT, {"base": base}),
        ]
        outputs: dict[str, object] = {"base": base, "files_changed": _files_changed(stat)}
        work.log(f"diff against {base}: {outputs['files_changed']} file(s) changed")
        if not cfg.lint:
            return StageResult(
                "passed", f"{outputs['files_changed']} file(s) changed", outputs, artifacts
            )
        lint = work.machine.run(cfg.lint, timeout_s=work.timeout_s)
        outputs["lint_exit_code"] = lint.exit_code
        artifacts.append(
            Artifact(
                "log", "lint.log", (lint.stdout + lint.stderr).encode(), TEXT, {"cmd": cfg.lint}
            )
        )
        if not lint.ok:
            reason = "timed out" if lint.timed_out else f"exit {lint.exit_code}"
            return StageResult("failed", f"lint failed ({reason})", outputs, artifacts)
        return StageResult(
            "passed", f"{outputs['files_changed']} file(s) changed; lint clean", outputs, artifacts
        )


def _files_changed(stat: str) -> int:
    lines = [line for line in stat.splitlines() if "|" in line]
    return len(lines)
