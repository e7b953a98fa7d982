"""A run is one OpenTelemetry trace: its stages' attempts, commands, lease wait and evidence
uploads as a span tree, recorded with the SDK's in-memory exporter on a real run."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from controller.services import tracing
from tests.integration.test_leases import put_pool, wait_ready
from tests.integration.test_runs import CTX, cmd, create_run, wait_run


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
        key=lambda s: s.start_time or 0,
    )


def test_a_run_is_one_trace_with_a_span_per_attempt(
    live_client: TestClient, sample_repo: Path
) -> None:
    client = live_client
    exporter = InMemorySpanExporter()
    client.app.state.controller.tracing = tracing.in_memory(exporter)  # type: ignore[attr-defined]
    put_pool(client, "traced", template={"repo": str(sample_repo)}, min_ready=1, max_machines=1)
    wait_ready(client, "traced", 1)
    flaky = f"if [ -f {CTX}/tried ]; then echo second; else touch {CTX}/tried; exit 7; fi"
    run = create_run(
        client,
        task="traced",
        repo=str(sample_repo),
        pool="traced",
        stages=[cmd("build", "echo built"), cmd("check", flaky, retries=1)],
    )
    ended = wait_run(client, run["id"])
    assert ended["status"] == "passed", ended
    machine_id = ended["machine_id"]

    spans = list(exporter.get_finished_spans())
    trace_id, root_id = tracing.run_ids(run["id"])
    assert {s.context.trace_id for s in spans if s.context} == {trace_id}  # one trace

    (root,) = [s for s in spans if s.parent is None]
    assert root.name == "run"
    assert root.context is not None
    assert root.context.span_id == root_id
    attributes = dict(root.attributes or {})
    assert attributes["run.id"] == run["id"]
    assert attributes["repo"] == str(sample_repo)
    assert attributes["status"] == "passed"
    assert attributes["machine.id"] == machine_id
    assert len(str(attributes["commit"])) == 40

    top = _children(spans, root)
    assert [s.name for s in top] == [
        "lease.wait",
        "machine.read_file",  # the repo's .shopfloor.toml, read once when the run starts
        "stage build",
        "stage check",
        "stage check",
    ]
    wait, policy, build, check1, check2 = top
    assert str((policy.attributes or {})["file.path"]).endswith(".shopfloor.toml")
    assert (wait.attributes or {})["machine.id"] == machine_id

    for span, attempt, status in (
        (build, 1, "passed"),
        (check1, 1, "failed"),
        (check2, 2, "passed"),
    ):
        a = dict(span.attributes or {})
        assert (a["run.id"], a["stage.attempt"], a["status"]) == (run["id"], attempt, status)
        assert a["stage.name"] == span.name.removeprefix("stage ")
        assert (a["machine.id"], a["commit"], a["repo"]) == (
            machine_id,
            attributes["commit"],
            str(sample_repo),
        )
    assert check1.status.status_code == StatusCode.ERROR
    assert check2.status.status_code != StatusCode.ERROR
    assert len(str((check1.attributes or {})["failure.signature"])) > 8  # learning gave one
    assert (check1.attributes or {})["failure.kind"] == "test"
    assert "failure.signature" not in (check2.attributes or {})

    for stage, commands in ((build, ["echo built"]), (check1, [flaky]), (check2, [flaky])):
        kids = _children(spans, stage)
        names = [s.name for s in kids]
        assert "machine.write_file" in names  # run.json and the handoff notes
        runs_ = [s for s in kids if s.name == "machine.run"]
        assert [(s.attributes or {})["command"] for s in runs_] == commands
        assert all((s.attributes or {})["machine.id"] == machine_id for s in runs_)
        uploads = [s for s in kids if s.name == "evidence.upload"]
        assert uploads, names  # the agent's log and the driver's
        assert {(s.attributes or {})["stage.name"] for s in uploads} == {
            stage.name.removeprefix("stage ")
        }
    failed_cmd = [s for s in _children(spans, check1) if s.name == "machine.run"][0]
    assert (failed_cmd.attributes or {})["command.exit_code"] == 7
    assert failed_cmd.status.status_code == StatusCode.ERROR
