"""Flaky tests: the JUnit history, the score and state rules, and the tester's policy."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from agents.base import Assignment, CommandResult, KnownTests
from agents.tester import TesterAgent, rerun_command
from controller.domain import CaseHealth
from controller.services import flaky
from controller.services.runtime import Controller
from controller.store.db import unit_of_work
from controller.store.models import CaseResult, Run
from evidence.store import ArtifactStore, save_artifact
from tests.unit.evidence_db import engine, make_run, store

__all__ = ["engine", "store"]

C1, C2 = "a" * 40, "b" * 40
COIN = "test_app.FactoryTest::test_coin"


def junit(*cases: tuple[str, str]) -> bytes:
    """A report of ``(name, status)`` cases of class ``test_app.FactoryTest``."""
    body = []
    for name, status in cases:
        inner = {
            "passed": "",
            "failed": '<failure message="boom">trace</failure>',
            "error": '<error message="oops"/>',
            "skipped": "<skipped/>",
        }[status]
        body.append(f'<testcase classname="test_app.FactoryTest" name="{name}">{inner}</testcase>')
    return f'<testsuite name="s" tests="{len(cases)}">{"".join(body)}</testsuite>'.encode()


def save(engine: Engine, store: ArtifactStore, data: bytes, **meta: Any) -> None:
    with unit_of_work(engine) as tx:
        run = make_run(tx, repo="/repos/app", stages=("test",))
        save_artifact(
            tx=tx, store=store, run_id=run.id, stage="test", attempt=1, machine_id="m",
            commit=C1, kind="junit", name="junit.xml", data=data, meta=meta,
        )  # fmt: skip


def ctl(engine: Engine, *, learning: bool = True) -> Controller:
    settings = SimpleNamespace(learning=learning)
    return cast(Controller, SimpleNamespace(reader=engine, db=engine, settings=settings))


def state_of(engine: Engine, test: str = COIN) -> CaseHealth:
    (found,) = [t for t in flaky.list_tests(ctl=ctl(engine), repo="/repos/app") if t.test == test]
    return found


# ---------------------------------------------------------------- the rules


def test_ten_failures_in_ten_are_broken_never_flaky(engine: Engine, store: ArtifactStore) -> None:
    for _ in range(10):
        save(engine, store, junit(("test_coin", "failed")), commit=C1, clean=True)
        assert state_of(engine).state == "broken"
    found = state_of(engine)
    assert (found.runs, found.failures, found.passes, found.clean_failures) == (10, 10, 0, 10)
    assert found.score == pytest.approx(11 / 12, abs=1e-4)
    assert found.score < found.score_upper < 1
    assert flaky.known_flaky(ctl=ctl(engine), repo="/repos/app") == []


def test_a_pass_and_a_failure_on_one_clean_tree_are_flaky(
    engine: Engine, store: ArtifactStore
) -> None:
    save(engine, store, junit(("test_coin", "failed")), commit=C1, clean=True)
    assert state_of(engine).state == "broken"  # one failure: nothing shows it is not
    save(engine, store, junit(("test_coin", "passed")), commit=C1, clean=True)
    found = state_of(engine)
    assert (found.state, found.same_tree) == ("flaky", True)
    assert found.score == pytest.approx(0.5)
    save(engine, store, junit(("test_coin", "failed")), commit=C1, clean=True)
    assert state_of(engine).state == "flaky"  # failing now, but known to flip
    assert [t.test for t in flaky.known_flaky(ctl=ctl(engine), repo="/repos/app")] == [COIN]


def test_passing_only_on_the_testers_retry_is_flaky(engine: Engine, store: ArtifactStore) -> None:
    save(engine, store, junit(("test_coin", "failed")), commit=C1, clean=False)
    save(engine, store, junit(("test_coin", "passed")), commit=C1, clean=False, retry=True)
    found = state_of(engine)
    assert (found.state, found.retry_passes, found.same_tree) == ("flaky", 1, False)


def test_a_retry_inside_the_report_is_a_pass_on_retry(engine: Engine, store: ArtifactStore) -> None:
    save(engine, store, junit(("test_coin", "failed"), ("test_coin", "passed")))
    assert state_of(engine).state == "flaky"


def test_different_commits_or_a_changed_tree_do_not_make_flaky(
    engine: Engine,
    store: ArtifactStore,
) -> None:
    save(engine, store, junit(("test_coin", "passed")), commit=C1, clean=True)
    save(engine, store, junit(("test_coin", "failed")), commit=C2, clean=True)
    assert state_of(engine).state == "broken"
    save(engine, store, junit(("test_coin", "failed")), commit=C1, clean=False)
    save(engine, store, junit(("test_coin", "passed")), commit=C1, clean=False)
    found = state_of(engine)
    assert (found.state, found.same_tree) == ("healthy", False)
    assert (found.clean_passes, found.clean_failures) == (1, 1)  # changed trees don't count


def test_a_flaky_test_that_starts_failing_every_time_is_broken(
    engine: Engine,
    store: ArtifactStore,
) -> None:
    save(engine, store, junit(("test_coin", "failed")), commit=C1, clean=True)
    save(engine, store, junit(("test_coin", "passed")), commit=C1, clean=True)
    for n in range(flaky.BROKEN_STREAK):
        assert state_of(engine).state == "flaky", n
        save(engine, store, junit(("test_coin", "failed")), commit=C2, clean=True)
    assert state_of(engine).state == "broken"


def test_a_repo_that_quarantines_makes_its_flaky_tests_quarantined(
    engine: Engine,
    store: ArtifactStore,
) -> None:
    save(
        engine, store, junit(("test_coin", "failed"), ("test_ok", "passed")), commit=C1, clean=True
    )
    save(
        engine, store, junit(("test_coin", "passed"), ("test_ok", "passed")), commit=C1, clean=True
    )
    with unit_of_work(engine) as tx:
        make_run(tx, repo="/repos/app", policy={"verify": {"flaky": "quarantine"}})
    assert state_of(engine).state == "quarantined"
    assert state_of(engine, "test_app.FactoryTest::test_ok").state == "healthy"
    listed = flaky.list_tests(ctl=ctl(engine), repo="/repos/app", state="quarantined")
    assert [t.test for t in listed] == [COIN]
    known = flaky.known_flaky(ctl=ctl(engine), repo="/repos/app", quarantine=False)
    assert [(t.test, t.state) for t in known] == [(COIN, "flaky")]
    # learning off: the history still says flaky, but nothing is quarantined
    off = ctl(engine, learning=False)
    assert [t.state for t in flaky.list_tests(ctl=off, repo="/repos/app") if t.test == COIN] == [
        "flaky"
    ]
    assert [t.state for t in flaky.known_flaky(ctl=off, repo="/repos/app")] == ["flaky"]


def test_the_score_is_a_beta_posterior_not_a_counter() -> None:
    assert flaky.score(0, 0) == (0.5, pytest.approx(0.95, abs=1e-6))
    mean, upper = flaky.score(0, 1)  # Beta(1, 2): F(x) = 1 - (1 - x)^2
    assert mean == pytest.approx(1 / 3)
    assert upper == pytest.approx(1 - 0.05**0.5, abs=1e-6)
    assert flaky.score(1, 0)[1] == pytest.approx(0.95**0.5, abs=1e-6)
    few, many = flaky.score(1, 4), flaky.score(100, 400)  # same share, more evidence
    assert few[1] > many[1] > many[0]
    assert flaky.beta_cdf(0.3, 7.0, 3.0) + flaky.beta_cdf(0.7, 3.0, 7.0) == pytest.approx(1.0)


def test_skipped_and_unknown_trees_do_not_count_as_evidence(
    engine: Engine,
    store: ArtifactStore,
) -> None:
    save(engine, store, junit(("test_coin", "skipped")))
    save(engine, store, junit(("test_coin", "failed")), commit="not-a-commit", clean="yes")
    save(engine, store, junit(("test_coin", "passed")))
    found = state_of(engine)
    assert (found.state, found.skipped, found.clean_passes, found.clean_failures) == (
        "healthy", 1, 0, 0,
    )  # fmt: skip


# ---------------------------------------------------------------- ingest at scale


def test_a_report_of_100k_cases_is_ingested_in_batches(engine: Engine, tmp_path: Any) -> None:
    big = ArtifactStore(tmp_path / "big", junit_cap_bytes=20 * 1024 * 1024)
    cases = "".join(
        f'<testcase classname="pkg.mod{i % 100}" name="test_{i}"'
        + ("><failure message='x'/></testcase>" if i % 1000 == 0 else "/>")
        for i in range(100_000)
    )
    data = f'<testsuite name="big" tests="100000">{cases}</testsuite>'.encode()
    assert len(data) < big.junit_cap_bytes
    for round_ in range(2):  # the first inserts every test's figures, the second updates them
        started = time.monotonic()
        with unit_of_work(engine) as tx:
            run = make_run(tx, repo="/repos/big", stages=("test",))
            artifact = save_artifact(
                tx=tx, store=big, run_id=run.id, stage="test", attempt=1, machine_id="m",
                commit=C1, kind="junit", name="junit.xml", data=data, meta={"clean": True},
            )  # fmt: skip
        took = time.monotonic() - started
        assert took < 90, f"round {round_}: {took:.1f}s"
        assert artifact.facts["history"] == 100_000
    with unit_of_work(engine) as tx:
        assert _count(tx, "/repos/big") == 200_000
    tests = flaky.list_tests(ctl=ctl(engine), repo="/repos/big", state="broken", limit=10_000)
    assert len(tests) == 100
    assert all(t.failures == 2 and t.runs == 2 for t in tests)


def _count(tx: Session, repo: str) -> int:
    return tx.exec(
        select(func.count()).select_from(CaseResult).where(CaseResult.repo == repo)
    ).one()


def test_the_api_lists_tests_and_refuses_an_unknown_state(engine: Engine) -> None:
    with pytest.raises(Exception, match="state must be one of"):
        flaky.list_tests(ctl=ctl(engine), state="sometimes")
    assert Run  # the table the policy is read from


# ---------------------------------------------------------------- the tester's policy


@dataclass
class Suite:
    """A machine whose test command writes the next of ``reports`` to test-results/j.xml."""

    reports: list[bytes]
    clean: bool = True
    ran: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    machine_id: str = "m-fake"
    workdir: str = "/workspace/app"

    def run(self, cmd: str, **_: Any) -> CommandResult:
        self.ran.append(cmd)
        if cmd.startswith("git rev-parse"):
            return CommandResult(0, f"{C1}\n{0 if self.clean else 1}\n", "", 1.0)
        if cmd.startswith("for f in"):
            found = "test-results/j.xml\n" if "test-results/j.xml" in self.files else ""
            return CommandResult(0, found, "", 1.0)
        if cmd.startswith("rm -f"):
            self.files.pop("test-results/j.xml", None)
            return CommandResult(0, "", "", 1.0)
        report = self.reports.pop(0)
        self.files["test-results/j.xml"] = report
        return CommandResult(1 if b"<failure" in report else 0, "ran\n", "", 1.0)

    def read_file(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]

    def write_file(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def forward(self, port: int) -> str:
        return ""


def run_tester(suite: Suite, known: KnownTests, cmd: str = "python3 run_tests.py") -> Any:
    work = Assignment(
        run_id="r", task="t", repo="app", ref="HEAD", stage="test", attempt=1,
        params={"test": cmd, "junit": ["test-results/*.xml"]}, machine=suite, timeout_s=30,
        known_tests=known,
    )  # fmt: skip
    return TesterAgent().run(work)


def test_the_tester_says_which_tree_it_tested() -> None:
    result = run_tester(Suite([junit(("test_coin", "passed"))], clean=False), KnownTests())
    assert result.status == "passed"
    (report,) = [a for a in result.artifacts if a.kind == "junit"]
    assert report.meta == {"path": "test-results/j.xml", "commit": C1, "clean": False}


def test_the_tester_reruns_only_known_flaky_failures_once() -> None:
    suite = Suite(
        [junit(("test_coin", "failed"), ("test_ok", "passed")), junit(("test_coin", "passed"))]
    )
    result = run_tester(suite, KnownTests(flaky=frozenset({COIN})))
    assert result.status == "passed", result.summary
    assert suite.ran[-2] == "python3 run_tests.py test_app.FactoryTest.test_coin"
    assert result.outputs["passed_on_retry"] == [COIN]
    assert "passed on a rerun" in result.summary
    rerun = [a for a in result.artifacts if a.meta.get("retry")]
    assert {a.kind for a in rerun} == {"log", "junit"}


def test_the_tester_does_not_rerun_when_a_failure_is_not_known_flaky() -> None:
    suite = Suite([junit(("test_coin", "failed"), ("test_new", "failed"))])
    result = run_tester(suite, KnownTests(flaky=frozenset({COIN}), quarantined=frozenset({COIN})))
    assert result.status == "failed"
    assert sum(cmd.startswith("python3") for cmd in suite.ran) == 1
    assert result.outputs["failing"] == ["test_app.FactoryTest::test_new"]
    assert result.outputs["quarantined"] == [COIN]
    assert f"{COIN} [quarantined]" in result.summary


def test_quarantined_failures_do_not_fail_the_stage() -> None:
    suite = Suite([junit(("test_coin", "failed")), junit(("test_coin", "failed"))])
    result = run_tester(suite, KnownTests(flaky=frozenset({COIN}), quarantined=frozenset({COIN})))
    assert result.status == "passed", result.summary
    assert result.outputs["quarantined"] == [COIN]
    assert f"{COIN} [quarantined]" in result.summary
    suite = Suite([junit(("test_coin", "failed")), junit(("test_coin", "failed"))])
    result = run_tester(suite, KnownTests(flaky=frozenset({COIN})))  # flaky, policy "fail"
    assert result.status == "failed"


def test_a_failure_without_a_report_still_fails() -> None:
    suite = Suite([b"<testsuite name='s'><testcase name='x'><failure/></testcase></testsuite>"])
    suite.reports = [b"not xml <failure"]
    result = run_tester(suite, KnownTests(flaky=frozenset({"x"}), quarantined=frozenset({"x"})))
    assert result.status == "failed"


def test_rerun_commands_per_runner() -> None:
    tests = [("tests.test_a.TestX", "test_y"), ("tests.test_b", "test_z")]
    assert rerun_command("pytest -q --junitxml=r.xml", tests) == "pytest -q --junitxml=r.xml --lf"
    assert rerun_command("python -m pytest", tests) == "python -m pytest --lf"
    assert (
        rerun_command("X=1 python3 run_tests.py --junit r.xml", tests)
        == "X=1 python3 run_tests.py --junit r.xml tests.test_a.TestX.test_y tests.test_b.test_z"
    )
    assert rerun_command("python3 run_tests.py", [("a", "test[1]")]) == "python3 run_tests.py"
    assert rerun_command("make test", tests) == "make test"
