"""Failure signatures on real reports and logs (pytest, unittest, Jest-style JUnit): stable
across machines, temp paths and timestamps, different for different failures; the classes;
the quarantine rule."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from evidence.junit import parse_junit
from evidence.signatures import (
    AttemptFacts,
    AttemptRecord,
    classify,
    mask,
    quarantine_verdict,
    signature_of,
)

CAP = 1024 * 1024

PYTEST_SUITE = """
import datetime, time, uuid

def test_ok():
    pass

def test_reads_data(tmp_path):
    path = tmp_path / "data.txt"
    assert path.exists(), f"missing {path} at {datetime.datetime.now().isoformat()}"

def test_token():
    token = uuid.uuid4().hex
    assert token == "expected", f"bad token {token} from {id(object()):#x} after {time.time()}"

def test_sum():
    assert 1 + 1 == {expected}
"""


def pytest_report(folder: Path, *, expected: int = 3) -> bytes:
    """A real pytest run in its own folder and temp root (a different 'machine' each)."""
    folder.mkdir(parents=True)
    (folder / "test_app.py").write_text(PYTEST_SUITE.replace("{expected}", str(expected)))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={folder / 'tmp'}",
            f"--junitxml={folder / 'junit.xml'}",
            "test_app.py",
        ],
        cwd=folder,
        capture_output=True,
        check=False,
    )
    return (folder / "junit.xml").read_bytes()


def junit_facts(data: bytes, stage: str = "test") -> AttemptFacts:
    return AttemptFacts(
        stage=stage,
        summary="'pytest' failed (exit 1)",
        reports=[parse_junit(data, max_bytes=CAP)],
        exit_codes=[1],
    )


def test_pytest_signature_is_stable_across_machines_temp_paths_and_times(tmp_path: Path) -> None:
    one = pytest_report(tmp_path / "machine-a")
    two = pytest_report(tmp_path / "elsewhere" / "machine-b")
    assert one != two  # temp paths, tokens, addresses and times really differ
    first, second = signature_of(junit_facts(one)), signature_of(junit_facts(two))
    assert first.kind == "test"
    assert first.signature == second.signature
    assert "test_app::test_reads_data" in first.normalized
    assert "test_app::test_sum" in first.normalized
    assert "machine-a" not in first.normalized
    assert "test_sum" in first.sample
    assert "1 + 1" in first.sample


def test_pytest_signature_differs_for_a_different_failure(tmp_path: Path) -> None:
    base = signature_of(junit_facts(pytest_report(tmp_path / "a")))
    other = signature_of(junit_facts(pytest_report(tmp_path / "b", expected=2)))
    assert other.kind == "test"
    assert base.signature != other.signature  # test_sum passes now: another set failed


UNITTEST_SUITE = """
import os, tempfile, unittest

class Orders(unittest.TestCase):
    def test_total(self):
        folder = tempfile.mkdtemp()
        self.assertEqual({got}, 4, f"total wrong in {{folder}} pid {{os.getpid()}}")

    def test_ok(self):
        pass
"""


def unittest_log(folder: Path, *, got: int = 3, name: str = "test_total") -> str:
    folder.mkdir(parents=True)
    source = UNITTEST_SUITE.format(got=got).replace("test_total", name)
    (folder / "test_orders.py").write_text(textwrap.dedent(source))
    done = subprocess.run(
        [sys.executable, "-m", "unittest", "-v", "test_orders"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    return f"$ python -m unittest\n{done.stdout}{done.stderr}"


def log_facts(log: str, **extra: object) -> AttemptFacts:
    return AttemptFacts(
        stage="test",
        summary="'python -m unittest' failed (exit 1)",
        log=log,
        exit_codes=[1],
        **extra,  # type: ignore[arg-type]
    )


def test_unittest_log_signature_is_stable_and_tells_failures_apart(tmp_path: Path) -> None:
    one = signature_of(log_facts(unittest_log(tmp_path / "a")))
    two = signature_of(log_facts(unittest_log(tmp_path / "deeper" / "b")))
    assert one.kind == "test"
    assert one.signature == two.signature
    assert "AssertionError" in one.sample
    other_test = signature_of(log_facts(unittest_log(tmp_path / "c", name="test_grand_total")))
    assert other_test.signature != one.signature


JEST = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="jest tests" tests="2" failures="1" errors="0" time="{time}">
  <testsuite name="sum" errors="0" failures="1" skipped="0" timestamp="{stamp}" time="{time}" tests="2">
    <testcase classname="sum adds numbers" name="sum adds numbers" time="0.004">
      <failure>Error: expect(received).toBe(expected) // Object.is equality

Expected: 3
Received: 4
    at Object.&lt;anonymous&gt; ({root}/sum.test.js:5:19)
    at Promise.then.completed ({root}/node_modules/jest-circus/build/utils.js:298:28)</failure>
    </testcase>
    <testcase classname="sum {other}" name="sum {other}" time="0.001"/>
  </testsuite>
</testsuites>
"""


def jest(root: str, stamp: str, time: str, other: str = "keeps zero") -> bytes:
    return JEST.format(root=root, stamp=stamp, time=time, other=other).encode()


def test_jest_style_junit_signature_masks_paths_and_timestamps() -> None:
    one = signature_of(
        junit_facts(jest("/workspace/app", "2026-12-03T19:00:01", "1.234"), stage="qa")
    )
    two = signature_of(
        junit_facts(jest("/tmp/jest_rs/app-7f3a9c", "2027-01-09T08:12:44", "0.811"), stage="qa")
    )
    assert one.kind == "test"
    assert one.signature == two.signature
    assert "sum adds numbers::sum adds numbers | Error | Error: expect(received)" in one.normalized
    failing_other = jest("/workspace/app", "2026-12-03T19:00:01", "1.234").replace(
        b'name="sum keeps zero" time="0.001"/>',
        b'name="sum keeps zero" time="0.001"><failure>TypeError: x is undefined</failure>'
        b"</testcase>",
    )
    assert signature_of(junit_facts(failing_other)).signature != one.signature


def test_mask_leaves_what_identifies_the_failure() -> None:
    masked = mask(
        "2026-12-03 19:01:02,123 ERROR /workspace/sample-app/app.py:12 KeyError 'user_42' "
        "at 0x7f3a9c0b1d20 in /tmp/pytest-of-runner/pytest-7/test_x0/f.txt r-0123456789 "
        "after 12.5s id 3f2a8c1e-1b2c-4d5e-8f90-123456789abc sha deadbeef1234"
    )
    assert masked == (
        "<ts> ERROR <ws>/app.py:<n> KeyError 'user_42' at <hex> in <tmp> <id> "
        "after <dur> id <id> sha <hex>"
    )


@pytest.mark.parametrize(
    ("facts", "kind"),
    [
        (
            AttemptFacts("test", "the machine was lost during the attempt", machine_lost=True),
            "infra",
        ),
        (AttemptFacts("test", "'make' failed (exit 137)", exit_codes=[0, 137]), "infra"),
        (AttemptFacts("test", "'make' failed (exit None)", exit_codes=[0, None]), "infra"),
        (
            AttemptFacts("test", "'make' failed (exit 2)", log="write: No space left on device"),
            "infra",
        ),
        (
            AttemptFacts("test", "agent command raised: ssh gone", error_type="TransportError"),
            "infra",
        ),
        (
            AttemptFacts("test", "agent tester raised: KeyError: 'x'", error_type="KeyError"),
            "agent",
        ),
        (AttemptFacts("test", "timed out after 5s and was killed", timed_out=True), "timeout"),
        (AttemptFacts("test", "'pytest' failed (timed out)", exit_codes=[124]), "timeout"),
        (AttemptFacts("test", "'pytst' failed (exit 127)", exit_codes=[127]), "setup"),
        (
            AttemptFacts(
                "test",
                "'pytest' failed (exit 2)",
                log="E   ModuleNotFoundError: No module named 'flask'",
            ),
            "setup",
        ),
        (AttemptFacts("test", "'pytest' failed (exit 1)", exit_codes=[1]), "test"),
    ],
)
def test_classes(facts: AttemptFacts, kind: str) -> None:
    assert classify(facts) == kind
    assert signature_of(facts).kind == kind


def test_a_fixture_error_in_junit_is_setup() -> None:
    report = b"""<testsuite name="pytest"><testcase classname="t" name="test_db">
      <error message="failed on setup with &quot;ConnectionRefusedError: [Errno 111]&quot;">
      trace</error></testcase></testsuite>"""
    assert classify(junit_facts(report)) == "setup"


def test_oom_kill_signature_is_the_same_whatever_the_command_printed() -> None:
    one = signature_of(
        AttemptFacts("build", "'make' failed (exit 137)", log="$ make\ncc -c a.c", exit_codes=[137])
    )
    two = signature_of(
        AttemptFacts("build", "'make' failed (exit 137)", log="$ make\n", exit_codes=[137])
    )
    assert one.kind == two.kind == "infra"
    assert one.signature == two.signature


# ---------------------------------------------------------------- the quarantine rule

NOW = datetime(2026, 12, 3, 19, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def fail(
    machine: str, minutes_ago: float, kind: str = "infra", stage: str = "build"
) -> AttemptRecord:
    return AttemptRecord(
        machine, stage, False, NOW - timedelta(minutes=minutes_ago), kind, "sig-oom"
    )


def ok(machine: str, minutes_ago: float, stage: str = "build") -> AttemptRecord:
    return AttemptRecord(machine, stage, True, NOW - timedelta(minutes=minutes_ago))


def verdict(attempts: list[AttemptRecord], threshold: int = 3) -> object:
    return quarantine_verdict(
        attempts, machine_id="m-bad", now=NOW, threshold=threshold, window=HOUR
    )


def test_three_infra_failures_while_others_pass_quarantine() -> None:
    found = quarantine_verdict(
        [fail("m-bad", 30), fail("m-bad", 20), fail("m-bad", 1), ok("m-good", 40)],
        machine_id="m-bad",
        now=NOW,
        threshold=3,
        window=HOUR,
    )
    assert found is not None
    assert (found.count, found.signature, found.stages) == (3, "sig-oom", ("build",))
    assert found.passed_elsewhere == ("m-good",)
    assert "3 infra failures in 1 h" in found.reason
    assert "sig-oom" in found.reason


def test_no_quarantine_below_threshold_outside_window_or_without_passes_elsewhere() -> None:
    assert verdict([fail("m-bad", 2), fail("m-bad", 1), ok("m-good", 3)]) is None
    assert (
        verdict([fail("m-bad", 90), fail("m-bad", 80), fail("m-bad", 1), ok("m-good", 3)]) is None
    )
    assert (
        verdict([fail("m-bad", 3), fail("m-bad", 2), fail("m-bad", 1)]) is None
    )  # fails everywhere
    assert verdict([fail("m-bad", 3), fail("m-bad", 2), fail("m-bad", 1), ok("m-bad", 4)]) is None
    assert (
        verdict([fail("m-bad", 3), fail("m-bad", 2), fail("m-bad", 1), ok("m-good", 4, "lint")])
        is None
    )


def test_only_infra_failures_count() -> None:
    test_failures = [fail("m-bad", n, kind="test") for n in (1, 2, 3, 4)]
    assert verdict([*test_failures, ok("m-good", 5)]) is None
    assert verdict([*test_failures, fail("m-bad", 6), ok("m-good", 5)], threshold=1) is not None
