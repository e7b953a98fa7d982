"""``remote``: the stage is done by a program outside the controller.

The agent holds the stage open, on the run's machine and lease, until a remote agent that
claimed it (``POST /runs/{id}/stages/{name}/claim``) reports its result (``…/report``), or
the stage's timeout passes. The remote agent works on the machine through the API with the
claim's lease token (sessions, exec, files, artifacts), so its evidence and its report are
refused once the run no longer holds that machine.
"""

from __future__ import annotations

import time

from agents.base import Assignment, StageResult

POLL_S = 0.5


class RemoteAgent:
    name = "remote"

    def run(self, work: Assignment) -> StageResult:
        base = f"/api/v1/runs/{work.run_id}/stages/{work.stage}"
        work.log(
            f"waiting up to {work.timeout_s:g}s for a remote agent: {base}/claim, then /report"
        )
        deadline = time.monotonic() + work.timeout_s
        while time.monotonic() < deadline:
            report = work.remote_report()
            if report is not None:
                work.log(f"reported {report.status}: {report.summary}")
                return StageResult(report.status, report.summary, dict(report.outputs))
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        return StageResult(
            "failed", f"no remote agent reported within the stage's {work.timeout_s:g}s"
        )
