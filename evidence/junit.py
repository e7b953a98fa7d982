"""JUnit XML into test cases a reviewer can read: passed, failed, error, skipped, flaky.

The XML comes from code under test, so it is hostile until parsed: defusedxml refuses
DTDs and entities (no billion laughs, no external fetches) and a size cap bounds the
rest. junitparser then reads the tree (its xunit2 flavour knows rerun/flaky elements).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as safe_etree
from defusedxml import DefusedXmlException
from junitparser import JUnitXmlError
from junitparser.xunit2 import JUnitXml, TestCase

from controller.errors import InvalidInput, TooLarge

CaseStatus = Literal["passed", "failed", "error", "skipped", "flaky"]
TEXT_CAP = 20_000
"""Failure text kept per case: enough for a traceback, not a whole log."""


@dataclass(frozen=True)
class Case:
    suite: str
    classname: str
    name: str
    status: CaseStatus
    time_s: float
    message: str
    text: str
    attempts: int = 1
    type: str = ""
    """The failure's or error's ``type`` attribute (an exception class, often)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.classname, self.name)


@dataclass(frozen=True)
class Report:
    cases: list[Case]

    def counts(self) -> dict[str, int]:
        tally: Counter[str] = Counter(case.status for case in self.cases)
        statuses = ("passed", "failed", "error", "skipped", "flaky")
        return {"tests": len(self.cases), **{s: tally[s] for s in statuses}}

    @property
    def problems(self) -> list[Case]:
        return [c for c in self.cases if c.status in ("failed", "error")]

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts(), "cases": [asdict(c) for c in self.cases]}


def parse_junit(data: bytes, *, max_bytes: int) -> Report:
    """Parse a JUnit report; refuse one that is too big, malformed or uses DTD tricks."""
    if len(data) > max_bytes:
        raise TooLarge(
            f"the JUnit report is {len(data)} bytes; at most {max_bytes} bytes are parsed"
        )
    root = _safe_root(data)
    try:
        xml = JUnitXml.fromroot(root)  # type: ignore[arg-type]
        raw = [_case(suite.name or "", case) for suite in xml for case in suite]  # type: ignore[arg-type]
    except (JUnitXmlError, ValueError, TypeError) as exc:
        raise InvalidInput(f"the JUnit report is not valid JUnit XML: {exc}") from exc
    return Report(cases=_fold_retries(raw))


def _safe_root(data: bytes) -> Element:
    try:
        root: Element = safe_etree.fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException as exc:
        raise InvalidInput(
            "the JUnit report uses a DTD or entities, which are refused; send plain JUnit XML"
        ) from exc
    except ParseError as exc:
        raise InvalidInput(f"the JUnit report is not well-formed XML: {exc}") from exc
    if root.tag not in ("testsuites", "testsuite"):
        raise InvalidInput(
            f"the JUnit report's root element is <{root.tag}>; expected <testsuites> or <testsuite>"
        )
    return root


def _case(suite: str, case: TestCase) -> Case:
    results = case.result
    status: CaseStatus = "passed"
    message = text = failure_type = ""
    if results:
        first = results[0]
        failure_type = str(getattr(first, "type", None) or "")
        status = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            first._tag or "", "failed"
        )  # type: ignore[assignment]
        message, text = first.message or "", first.text or ""
    elif case.is_flaky:
        status = "flaky"
        interim = case.interim_result[0]
        message, text = interim.message or "", interim.text or ""
        failure_type = str(getattr(interim, "type", None) or "")
    return Case(
        suite=suite,
        classname=case.classname or "",
        name=case.name or "",
        status=status,
        time_s=float(case.time or 0.0),
        message=message[:TEXT_CAP],
        text=text[:TEXT_CAP],
        type=failure_type[:200],
    )


def _fold_retries(cases: list[Case]) -> list[Case]:
    """Repeated cases are retries: the last attempt decides; a pass after a failure is flaky."""
    by_key: dict[tuple[str, str], list[Case]] = {}
    for case in cases:
        by_key.setdefault(case.key, []).append(case)
    folded: list[Case] = []
    for attempts in by_key.values():
        last = replace(attempts[-1], attempts=len(attempts))
        failed_before = next((a for a in attempts[:-1] if a.status in ("failed", "error")), None)
        if last.status == "passed" and failed_before is not None:
            last = replace(
                last, status="flaky", message=failed_before.message, text=failed_before.text
            )
        folded.append(last)
    return folded
