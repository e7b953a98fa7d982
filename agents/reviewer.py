"""``reviewer``: what changed (diff stat and the patch) and, if configured, the linter's say."""

from __future__ import annotations

import json
import posixpath
import shlex
from collections.abc import Sequence

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


MAX_REPORTED = 200


def run_evidence(work: Assignment, junit: Sequence[str]) -> list[str]:
    """What the run's own stages write as evidence, which is no change of the run: the JUnit
    globs of the config (``junit`` of the repo's file and this stage's ``with``), the JUnit
    files earlier stages reported (a test stage's ``with`` may name other globs) and the
    handoff folder."""
    return [*junit, *_reported_junit(work), work.handoff_dir]


def _reported_junit(work: Assignment) -> list[str]:
    """``outputs.junit`` of the run's stages in the handoff folder's run.json (the tester's)."""
    try:
        stages = json.loads(work.machine.read_file(f"{work.handoff_dir}/run.json"))["stages"]
    except Exception:  # noqa: BLE001 - no run.json (a stage run alone): the config's globs
        return []
    found: list[str] = []
    for stage in stages if isinstance(stages, list) else []:
        outputs = stage.get("outputs") if isinstance(stage, dict) else None
        reports = outputs.get("junit") if isinstance(outputs, dict) else None
        if isinstance(reports, list):
            found += [r for r in reports if isinstance(r, str) and r]
    return found[:MAX_REPORTED]


def git_diff(
    machine: MachineHandle, base: str, *, stat: bool = False, exclude: Sequence[str] = ()
) -> str:
    """Working tree against ``base``, new files included, ``exclude`` left out.

    New files are marked intent-to-add in a throwaway copy of the index, so the repo's own
    index (what the agent staged) is left as it was. ``exclude`` holds globs (``*``, ``?``)
    relative to the checkout, as the tester expands them, or absolute paths (the handoff
    folder); each becomes a ``:(exclude)`` pathspec relative to the repo's top, after ``--``
    and quoted, so no pattern runs anything. One that lies outside the repo is dropped (git
    would refuse it, and nothing outside is in the diff anyway).
    """
    flag = "--stat" if stat else "--binary"
    paths = " ".join(
        shlex.quote(posixpath.normpath(posixpath.join(machine.workdir, p))) for p in exclude
    )
    result = machine.run(
        'tmp=$(mktemp) && cp "$(git rev-parse --git-path index)" "$tmp" 2>/dev/null; '
        'export GIT_INDEX_FILE="$tmp"; git add --all --intent-to-add >/dev/null 2>&1; '
        "top=$(git rev-parse --show-toplevel 2>/dev/null); set --; "
        f"for p in {paths}; do "
        'case "$p" in "$top"/?*) set -- "$@" ":(top,exclude,glob)${p#"$top"/}";; esac; done; '
        f'git diff {flag} {shlex.quote(base)} -- "$@"; rc=$?; rm -f "$tmp"; exit $rc',
        timeout_s=120,
    )
    return result.stdout


class ReviewerAgent:
    name = "reviewer"

    def run(self, work: Assignment) -> StageResult:
        cfg = config.load(work.machine.read_file, work.machine.workdir, work.params)
        base = str(work.params.get("base") or diff_base(work.machine, work.ref))
        exclude = run_evidence(work, cfg.junit)
        stat = git_diff(work.machine, base, stat=True, exclude=exclude)
        patch = git_diff(work.machine, base, exclude=exclude)
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
