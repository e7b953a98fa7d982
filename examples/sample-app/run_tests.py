"""Run the unittest suite and write JUnit XML, with nothing but the standard library.

Machines have python3 but no pytest and often no network, so this is the test command:
``python3 run_tests.py [--junit test-results/junit.xml] [TEST ...]``, where a TEST is a
unittest name (``test_app.GreetingTest.test_greets_by_name``, as the JUnit's classname and
name give it) and none means every test found. Exit status 0 means all passed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path
from types import TracebackType

ExcInfo = tuple[type[BaseException], BaseException, TracebackType]


class RecordingResult(unittest.TextTestResult):
    """A text result that also remembers each test's outcome and duration."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.records: list[tuple[unittest.TestCase, str, str, float]] = []
        self._started = 0.0

    def startTest(self, test: unittest.TestCase) -> None:  # noqa: N802 - unittest's name
        self._started = time.perf_counter()
        super().startTest(test)

    def _record(self, test: unittest.TestCase, outcome: str, detail: str = "") -> None:
        self.records.append((test, outcome, detail, time.perf_counter() - self._started))

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:  # noqa: N802
        super().addFailure(test, err)
        self._record(test, "failure", "".join(traceback.format_exception(*err)))

    def addError(self, test: unittest.TestCase, err: ExcInfo) -> None:  # noqa: N802
        super().addError(test, err)
        self._record(test, "error", "".join(traceback.format_exception(*err)))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)


def junit_xml(result: RecordingResult, elapsed: float) -> bytes:
    count = {
        k: sum(1 for r in result.records if r[1] == k) for k in ("failure", "error", "skipped")
    }
    suite = ET.Element(
        "testsuite",
        name="unittest",
        tests=str(len(result.records)),
        failures=str(count["failure"]),
        errors=str(count["error"]),
        skipped=str(count["skipped"]),
        time=f"{elapsed:.3f}",
    )
    for test, outcome, detail, seconds in result.records:
        cls, _, name = test.id().rpartition(".")
        case = ET.SubElement(suite, "testcase", classname=cls, name=name, time=f"{seconds:.3f}")
        if outcome != "passed":
            child = ET.SubElement(
                case,
                outcome,
                message=detail.strip().splitlines()[-1] if detail.strip() else outcome,
            )
            child.text = detail
    suites = ET.Element("testsuites")
    suites.append(suite)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--junit", default="test-results/junit.xml")
    parser.add_argument("--start", default=".")
    parser.add_argument("tests", nargs="*", help="unittest names to run (default: all)")
    args = parser.parse_args()
    loader = unittest.defaultTestLoader
    sys.path.insert(0, str(Path(args.start).resolve()))
    suite = loader.loadTestsFromNames(args.tests) if args.tests else loader.discover(args.start)
    runner = unittest.TextTestRunner(resultclass=RecordingResult, verbosity=2)
    started = time.perf_counter()
    result = runner.run(suite)
    assert isinstance(result, RecordingResult)
    out = Path(args.junit)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(junit_xml(result, time.perf_counter() - started))
    sys.stderr.write(f"JUnit XML written to {out}\n")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
