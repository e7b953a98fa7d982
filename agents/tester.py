"""``tester``: runs the repo's test command and keeps the log and the JUnit XML it wrote."""

from __future__ import annotations

import shlex

from agents import config
from agents.base import Artifact, Assignment, StageResult
from agents.reviewer import TEXT

MAX_REPORTS = 20


class TesterAgent:
    name = "tester"

    def run(self, work: Assignment) -> StageResult:
        cfg = config.load(work.machine.read_file, work.machine.workdir, work.params)
        if not cfg.test:
            return StageResult(
                "failed",
                "tester needs a test command: 'test' in .shopfloor.toml or the stage's 'with'",
            )
        globs = " ".join(_glob_word(g) for g in cfg.junit)
        if globs:  # results of an earlier attempt must not pass for this one's
            work.machine.run(f"rm -f -- {globs}", timeout_s=60)
        work.log(f"$ {cfg.test}")
        result = work.machine.run(cfg.test, timeout_s=work.timeout_s)
        log = f"$ {cfg.test}\n{result.stdout}{result.stderr}"
        artifacts = [Artifact("log", "test.log", log.encode(), TEXT, {"cmd": cfg.test})]
        reports = self._reports(work, globs)
        for path in reports:
            data = work.machine.read_file(path)
            name = path.replace("/", "_")
            artifacts.append(Artifact("junit", name, data, "application/xml", {"path": path}))
        outputs = {"exit_code": result.exit_code, "junit": reports}
        if result.ok:
            return StageResult(
                "passed", f"tests passed ({len(reports)} JUnit report(s))", outputs, artifacts
            )
        reason = "timed out" if result.timed_out else f"exit {result.exit_code}"
        return StageResult("failed", f"tests failed ({reason})", outputs, artifacts)

    @staticmethod
    def _reports(work: Assignment, globs: str) -> list[str]:
        if not globs:
            return []
        found = work.machine.run(
            f'for f in {globs}; do [ -f "$f" ] && printf "%s\\n" "$f"; done; true', timeout_s=60
        )
        return found.stdout.splitlines()[:MAX_REPORTS]


def _glob_word(pattern: str) -> str:
    """Quote everything but the glob characters, so a pattern expands and nothing else runs."""
    out = []
    for ch in pattern:
        out.append(ch if ch in "*?" else shlex.quote(ch) if not ch.isalnum() else ch)
    return "".join(out)
