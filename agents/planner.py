"""``planner``: leaves ``plan.md`` in the handoff folder for the stages after it.

With an external agent configured it asks that agent to write the plan; without one it
writes a plan skeleton from the task and the repo's layout, so the next stage always finds
a plan file and knows what it is working on.
"""

from __future__ import annotations

import posixpath

from agents import config
from agents.base import Artifact, Assignment, StageResult
from agents.external import run_external
from agents.reviewer import run_evidence

MARKDOWN = "text/markdown; charset=utf-8"
MAX_FILES = 200

PROMPT = (
    "Write an implementation plan (markdown) for this task into {plan_path}, "
    "without changing any other file.\n\nTask:\n{task}"
)
LESSONS_PROMPT = (
    "\n\nEarlier runs of this repo left lessons in {lessons_path} (recurring failures, the "
    "fixes that resolved them, flaky tests): read it and plan around them."
)
LESSONS_CAP = 16 * 1024
"""At most this much of lessons.md goes into plan.md."""


def read_lessons(work: Assignment) -> str:
    """The run's lessons.md, or "" when the driver wrote none."""
    try:
        text = work.machine.read_file(work.lessons_path).decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - no lessons (learning off, an older controller)
        return ""
    return text[:LESSONS_CAP].strip()


def with_lessons(plan: bytes, lessons: str) -> bytes:
    """``plan`` with the lessons appended as their own section (headings one level down)."""
    if not lessons:
        return plan
    body = "\n".join(
        ("#" + line) if line.startswith("#") else line for line in lessons.splitlines()
    )
    return plan.rstrip() + b"\n\n" + body.encode() + b"\n"


def template_plan(task: str, files: list[str]) -> str:
    listed = files[:MAX_FILES]
    more = f"\n- ... and {len(files) - MAX_FILES} more" if len(files) > MAX_FILES else ""
    layout = "\n".join(f"- `{name}`" for name in listed) or "- (no tracked files)"
    return (
        "# Plan\n\n## Task\n\n"
        f"{task.strip()}\n\n"
        f"## Repository layout ({len(files)} tracked files)\n\n{layout}{more}\n\n"
        "## Steps\n\n"
        "1. Read the files the task touches.\n"
        "2. Make the change and add or update tests for it.\n"
        "3. Run the test command; the tester stage runs it again and keeps the results.\n"
    )


class PlannerAgent:
    name = "planner"

    def run(self, work: Assignment) -> StageResult:
        cfg = config.load(work.machine.read_file, work.machine.workdir, work.params)
        plan_path = posixpath.join(work.handoff_dir, "plan.md")
        template = str(work.params.get("command") or cfg.agent or "")
        lessons = read_lessons(work)
        if template.strip():
            prompt = PROMPT.format(plan_path=plan_path, task=work.task)
            if lessons:
                prompt += LESSONS_PROMPT.format(lessons_path=work.lessons_path)
            exclude = run_evidence(work, cfg.junit)
            result = run_external(work, template, prompt=prompt, name="planner", exclude=exclude)
            if result.status != "passed":
                return result
            try:
                plan = work.machine.read_file(plan_path)
            except Exception:  # noqa: BLE001 - the agent printed its plan instead of saving it
                transcript = next(a for a in result.artifacts if a.kind == "log").data
                plan = transcript
            plan = with_lessons(plan, lessons)
            work.machine.write_file(plan_path, plan)
            result.artifacts.append(Artifact("plan", "plan.md", plan, MARKDOWN))
            result.outputs["plan"] = plan_path
            result.summary = f"plan written by {template.split()[0]} to {plan_path}"
            return result
        listing = work.machine.run("git ls-files", timeout_s=60)
        files = listing.stdout.splitlines() if listing.ok else []
        plan_text = with_lessons(template_plan(work.task, files).encode(), lessons)
        work.machine.write_file(plan_path, plan_text)
        work.log(f"wrote {plan_path} from the template ({len(files)} files listed)")
        return StageResult(
            "passed",
            f"plan written to {plan_path} (template; no external agent configured)",
            outputs={"plan": plan_path, "files": len(files)},
            artifacts=[Artifact("plan", "plan.md", plan_text, MARKDOWN)],
        )
