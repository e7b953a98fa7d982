"""A run's lessons as markdown: what the factory learned about the repo before this run.

``doc`` is ``lessons.json`` (``controller.services.learning.lessons_for``): the most
frequent open failure signatures with their samples, the runs that fixed similar ones
(with the start of their diff) and the flaky and quarantined tests.
"""

from __future__ import annotations

from typing import Any

SAMPLE_LINES = 12


def render_markdown(doc: dict[str, Any]) -> str:
    out = [f"# Lessons from earlier runs of {doc.get('repo', 'this repo')}", ""]
    failures = doc.get("open_failures") or []
    fixes = doc.get("fixes") or []
    flaky = doc.get("flaky_tests") or []
    quarantined = doc.get("quarantined_tests") or []
    if not (failures or fixes or flaky or quarantined):
        out += ["Nothing learned yet: no earlier failures of this repo are on record.", ""]
        return "\n".join(out)
    if failures:
        out += ["## Failures that keep happening (still open)", ""]
        for item in failures:
            out += [
                f"### {item['stage']}: {item['kind']} failure, seen {item['count']} time(s) "
                f"(signature `{item['signature'][:12]}`)",
                "",
                *_block(item.get("sample") or ""),
                "",
            ]
    if fixes:
        out += ["## Fixes that resolved similar failures", ""]
        for item in fixes:
            out.append(
                f"- {item['stage']} ({item['kind']}, `{item['signature'][:12]}`, seen "
                f"{item['count']} time(s)) was fixed by run `{item['fixed_by']}`; the failure "
                f"was: {_first(item.get('sample') or '')}"
            )
            if item.get("diff_excerpt"):
                out += ["", *_block(item["diff_excerpt"], "diff"), ""]
        out.append("")
    if flaky:
        out += ["## Flaky tests (a failure here may not be yours)", ""]
        out += [f"- `{t.get('test')}` (score {t.get('score')})" for t in flaky] + [""]
    if quarantined:
        out += ["## Quarantined tests (their failures do not fail the stage)", ""]
        out += [f"- `{t.get('test')}`" for t in quarantined] + [""]
    return "\n".join(out)


def _block(text: str, lang: str = "text") -> list[str]:
    lines = text.replace("```", "'''").splitlines()[:SAMPLE_LINES]
    return [f"```{lang}", *lines, "```"]


def _first(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]
