"""JUnit parsing: statuses, retries and flaky tests, and refusal of hostile XML."""

from __future__ import annotations

import pytest

from controller.errors import InvalidInput, TooLarge
from evidence.junit import parse_junit

CAP = 1024 * 1024

REPORT = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites>
  <testsuite name="pytest" tests="7">
    <testcase classname="test_app" name="test_ok" time="0.01"/>
    <testcase classname="test_app" name="test_title" time="0.02">
      <failure message="AssertionError: assert 'Old' == 'New'">def test_title():
&gt;       assert title() == "New"
E       AssertionError</failure>
    </testcase>
    <testcase classname="test_app" name="test_db"><error message="ConnectionError"/></testcase>
    <testcase classname="test_app" name="test_slow"><skipped message="slow"/></testcase>
    <testcase classname="test_app" name="test_rerun"><failure message="timing"/></testcase>
    <testcase classname="test_app" name="test_rerun"/>
    <testcase classname="test_app" name="test_marked">
      <flakyFailure message="race">first try failed</flakyFailure>
    </testcase>
  </testsuite>
</testsuites>
"""


def test_cases_get_their_status_and_failure_text() -> None:
    report = parse_junit(REPORT, max_bytes=CAP)
    by_name = {case.name: case for case in report.cases}
    assert report.counts() == {
        "tests": 6,
        "passed": 1,
        "failed": 1,
        "error": 1,
        "skipped": 1,
        "flaky": 2,
    }
    assert by_name["test_title"].status == "failed"
    assert 'assert title() == "New"' in by_name["test_title"].text
    assert by_name["test_title"].message.startswith("AssertionError")
    assert by_name["test_db"].status == "error"
    assert [c.name for c in report.problems] == ["test_title", "test_db"]


def test_retry_that_passes_is_flaky_and_keeps_the_first_failure() -> None:
    rerun = {c.name: c for c in parse_junit(REPORT, max_bytes=CAP).cases}["test_rerun"]
    assert (rerun.status, rerun.attempts, rerun.message) == ("flaky", 2, "timing")
    marked = {c.name: c for c in parse_junit(REPORT, max_bytes=CAP).cases}["test_marked"]
    assert marked.status == "flaky"


def test_single_testsuite_root_is_accepted() -> None:
    report = parse_junit(b'<testsuite name="s"><testcase name="a"/></testsuite>', max_bytes=CAP)
    assert report.counts()["passed"] == 1


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<testsuites><testsuite name="&lol3;"/></testsuites>
"""

EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<testsuites><testsuite name="&x;"/></testsuites>
"""


@pytest.mark.parametrize("data", [BILLION_LAUGHS, EXTERNAL])
def test_entities_and_dtds_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="DTD or entities"):
        parse_junit(data, max_bytes=CAP)


@pytest.mark.parametrize(
    "data",
    [b"", b"<testsuites>", b"not xml at all", b"<html><body/></html>", b"\xff\xfe<\x00"],
)
def test_malformed_reports_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_junit(data, max_bytes=CAP)


def test_enormous_report_is_refused_before_parsing() -> None:
    case = b'<testcase classname="c" name="n"/>'
    huge = b"<testsuite>" + case * (CAP // len(case) + 1) + b"</testsuite>"
    with pytest.raises(TooLarge, match="at most"):
        parse_junit(huge, max_bytes=CAP)


def test_failure_text_is_bounded() -> None:
    data = (
        b'<testsuite><testcase name="n"><failure>'
        + b"x" * 100_000
        + b"</failure></testcase></testsuite>"
    )
    (case,) = parse_junit(data, max_bytes=CAP).cases
    assert len(case.text) == 20_000
