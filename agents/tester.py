"""``tester``: runs the repo's test command and keeps the log and the JUnit XML it wrote.

It also says what was tested, so the history can tell a flaky test from a broken one: each
JUnit artifact's meta carries the checkout's ``commit`` and whether the tree was ``clean``
(``git status --porcelain`` empty). With what the factory already knows of the repo's tests
(``Assignment.known_tests``):

- when every failed test is a known flaky (or quarantined) one, it reruns only those tests
  once — ``--lf`` for pytest, the test names for the sample app's ``run_tests.py``, the
  whole command otherwise — and keeps the rerun's reports with ``"retry": true``;
- failures of quarantined tests (the run's policy says ``flaky = "quarantine"``) do not fail
  the stage: the summary and ``outputs["quarantined"]`` name them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as safe_etree

from agents import config
from agents.base import Artifact, Assignment, CommandResult, StageResult
from agents.reviewer import TEXT

MAX_REPORTS = 20
MAX_LISTED = 50
"""Test ids kept per list in the stage's outputs (they go into every later run.json)."""
_PYTEST = re.compile(r"(^|[\s/])(py\.test|pytest)(\s|$)|-m\s+pytest\b")
_RUN_TESTS = re.compile(r"(^|[\s/])run_tests\.py(\s|$)")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass
class _Pass:
    """One run of the test command: its result, its reports and the cases they name."""

    result: CommandResult
    reports: list[tuple[str, bytes]]
    cases: dict[str, str] = field(default_factory=dict)
    """test id -> passed | failed | error | skipped (the last word when a report repeats one)."""
    names: dict[str, tuple[str, str]] = field(default_factory=dict)
    """test id -> (classname, name)."""

    @property
    def failed(self) -> list[str]:
        return [t for t, status in self.cases.items() if status in ("failed", "error")]


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
        tree = self._tree(work)
        first = self._run(work, cfg.test, globs)
        artifacts = self._artifacts(first, cfg.test, tree, retry=False)
        outputs: dict[str, object] = {
            "exit_code": first.result.exit_code,
            "junit": [path for path, _ in first.reports],
            **tree,
        }
        if first.result.ok:
            return StageResult(
                "passed",
                f"tests passed ({len(first.reports)} JUnit report(s))",
                outputs,
                artifacts,
            )
        reason = "timed out" if first.result.timed_out else f"exit {first.result.exit_code}"
        failed = first.failed
        known = work.known_tests
        still = list(failed)
        notes: list[str] = []
        if failed:
            outputs["failed"] = failed[:MAX_LISTED]
        if (
            failed
            and not first.result.timed_out
            and all(t in known.flaky or t in known.quarantined for t in failed)
        ):
            cmd = rerun_command(cfg.test, [first.names[t] for t in failed])
            work.log(f"every failure is a known flaky test: rerunning {len(failed)} once")
            again = self._run(work, cmd, globs)
            artifacts += self._artifacts(again, cmd, tree, retry=True)
            still = [t for t in failed if again.cases.get(t) != "passed"]
            recovered = [t for t in failed if t not in still]
            outputs["rerun"] = {"cmd": cmd, "exit_code": again.result.exit_code}
            outputs["passed_on_retry"] = recovered[:MAX_LISTED]
            if recovered:
                notes.append(f"passed on a rerun: {_listed(recovered)}")
        quarantined = [t for t in still if t in known.quarantined]
        blocking = [t for t in still if t not in known.quarantined]
        if quarantined:
            outputs["quarantined"] = quarantined[:MAX_LISTED]
            notes.append(
                f"failures of quarantined tests, not counted: {_listed(quarantined, ' [quarantined]')}"
            )
        tail = f"; {'; '.join(notes)}" if notes else ""
        if failed and not blocking:
            return StageResult(
                "passed",
                f"tests passed ({len(first.reports)} JUnit report(s)){tail}",
                outputs,
                artifacts,
            )
        if blocking:
            outputs["failing"] = blocking[:MAX_LISTED]
            tail = f": {_listed(blocking)}{tail}"
        return StageResult("failed", f"tests failed ({reason}){tail}", outputs, artifacts)

    def _run(self, work: Assignment, cmd: str, globs: str) -> _Pass:
        if globs:  # results of an earlier run must not pass for this one's
            work.machine.run(f"rm -f -- {globs}", timeout_s=60)
        work.log(f"$ {cmd}")
        result = work.machine.run(cmd, timeout_s=work.timeout_s)
        reports = [(path, work.machine.read_file(path)) for path in self._reports(work, globs)]
        done = _Pass(result, reports)
        for _path, data in reports:
            _read_cases(data, done)
        return done

    @staticmethod
    def _tree(work: Assignment) -> dict[str, object]:
        """The checkout's commit and whether it differs from it (``clean``): what makes two
        results of a test comparable."""
        found = work.machine.run(
            "git rev-parse HEAD && git status --porcelain | head -c 1 | wc -c", timeout_s=60
        )
        lines = found.stdout.split()
        if not found.ok or len(lines) != 2 or not re.fullmatch(r"[0-9a-f]{40,64}", lines[0]):
            return {}
        return {"commit": lines[0], "clean": lines[1] == "0"}

    @staticmethod
    def _artifacts(
        done: _Pass, cmd: str, tree: dict[str, object], *, retry: bool
    ) -> list[Artifact]:
        prefix = "rerun-" if retry else ""
        log = f"$ {cmd}\n{done.result.stdout}{done.result.stderr}"
        extra = {"retry": True} if retry else {}
        artifacts = [
            Artifact("log", f"{prefix}test.log", log.encode(), TEXT, {"cmd": cmd, **extra})
        ]
        for path, data in done.reports:
            name = prefix + path.replace("/", "_")
            meta = {"path": path, **tree, **extra}
            artifacts.append(Artifact("junit", name, data, "application/xml", meta))
        return artifacts

    @staticmethod
    def _reports(work: Assignment, globs: str) -> list[str]:
        if not globs:
            return []
        found = work.machine.run(
            f'for f in {globs}; do [ -f "$f" ] && printf "%s\\n" "$f"; done; true', timeout_s=60
        )
        return found.stdout.splitlines()[:MAX_REPORTS]


def rerun_command(cmd: str, tests: list[tuple[str, str]]) -> str:
    """The test command narrowed to ``tests`` ((classname, name) pairs) where the runner
    can: pytest reruns its last failures, ``run_tests.py`` takes unittest names; any other
    command runs whole again."""
    if _PYTEST.search(cmd):
        return f"{cmd} --lf"
    names = [f"{cls}.{name}" for cls, name in tests]
    if _RUN_TESTS.search(cmd) and names and all(_NAME.match(n) for n in names):
        return f"{cmd} {' '.join(shlex.quote(n) for n in names)}"
    return cmd


def _read_cases(data: bytes, into: _Pass) -> None:
    """The test cases of one JUnit report; a report that does not parse names none."""
    try:
        root: Element = safe_etree.fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except Exception:  # noqa: BLE001 - hostile or broken XML: the store says why on save
        return
    for case in root.iter("testcase"):
        classname, name = case.get("classname") or "", case.get("name") or ""
        test = f"{classname}::{name}" if classname else name
        tags = {child.tag for child in case}
        status = (
            "failed"
            if "failure" in tags
            else "error"
            if "error" in tags
            else "skipped"
            if "skipped" in tags
            else "passed"
        )
        into.cases[test] = status
        into.names[test] = (classname, name)


def _listed(tests: list[str], mark: str = "") -> str:
    shown = ", ".join(t + mark for t in tests[:10])
    return shown + (f" and {len(tests) - 10} more" if len(tests) > 10 else "")


def _glob_word(pattern: str) -> str:
    """Quote everything but the glob characters, so a pattern expands and nothing else runs."""
    out = []
    for ch in pattern:
        out.append(ch if ch in "*?" else shlex.quote(ch) if not ch.isalnum() else ch)
    return "".join(out)
