"""``/metrics``: Prometheus text, read from the database at scrape time (no token, like /healthz)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from controller.api.deps import Ctl
from controller.services import flow, limits
from controller.services.runtime import Controller

router = APIRouter(tags=["system"])

WINDOW_H = 24.0


class FlowCollector(Collector):
    """Gauges from the same figures as ``GET /api/v1/flow`` (last 24 h)."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    def collect(self) -> Iterator[GaugeMetricFamily]:
        figures = flow.figures(ctl=self.ctl, window_h=WINDOW_H)
        head = figures["headline"]
        yield _gauge(
            "shopfloor_flow_runs_finished", "Finished runs in the window", head["denominator"]
        )
        yield _gauge(
            "shopfloor_flow_runs_complete",
            "Finished runs that passed plan, implement, test and evidence without re-creation",
            head["numerator"],
        )
        yield _gauge(
            "shopfloor_flow_share", "numerator / denominator of the headline", head["share"]
        )
        yield _gauge(
            "shopfloor_context_recreations",
            "Context re-creations in the window",
            figures["context_recreations"],
        )
        runs = GaugeMetricFamily(
            "shopfloor_runs_finished", "Finished runs by status", labels=["status"]
        )
        for status, count in figures["runs"].items():
            runs.add_metric([status], count)
        yield runs
        machines = figures["machines"]
        states = GaugeMetricFamily("shopfloor_machines", "Machines by state now", labels=["state"])
        for state, count in machines["now"].items():
            states.add_metric([state], count)
        yield states
        yield _gauge(
            "shopfloor_machine_utilization",
            "Leased / live machine-time in the window",
            machines["utilization"],
        )
        waits = figures["lease_wait_ms"]
        wait = GaugeMetricFamily("shopfloor_lease_wait_ms", "Lease wait", labels=["quantile"])
        for q in ("p50", "p95"):
            if waits[q] is not None:
                wait.add_metric([q], waits[q])
        yield wait
        durations = GaugeMetricFamily(
            "shopfloor_stage_duration_ms", "Stage attempt duration", labels=["stage", "quantile"]
        )
        failures = GaugeMetricFamily(
            "shopfloor_stage_failures", "Failed attempts", labels=["stage"]
        )
        retries = GaugeMetricFamily("shopfloor_stage_retries", "Retried attempts", labels=["stage"])
        for stage, fig in figures["stages"].items():
            for q in ("p50", "p95"):
                value = fig[f"duration_ms_{q}"]
                if value is not None:
                    durations.add_metric([stage, q], value)
            failures.add_metric([stage], fig["failures"])
            retries.add_metric([stage], fig["retries"])
        yield durations
        yield failures
        yield retries
        yield from _stuck(figures)
        used = GaugeMetricFamily(
            "shopfloor_machine_disk_used_bytes",
            "Workspace disk used, as reconcile last measured it",
            labels=["machine"],
        )
        limit = GaugeMetricFamily(
            "shopfloor_machine_disk_limit_bytes", "Workspace disk size", labels=["machine"]
        )
        for machine_id, (used_bytes, limit_bytes) in sorted(self.ctl.disk_watch.usage.items()):
            used.add_metric([machine_id], used_bytes)
            limit.add_metric([machine_id], limit_bytes)
        yield used
        yield limit


class LimitsCollector(Collector):
    """What the limits refused since start-up, and what is in use now (this process)."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        refused = CounterMetricFamily(
            "shopfloor_limit_refusals",
            "Requests refused by a limit (429, or 413 for body_size), by limit",
            labels=["limit"],
        )
        for name in limits.KNOWN:
            refused.add_metric([name], self.ctl.limits.refused[name])
        yield refused
        settings = self.ctl.settings
        configured = GaugeMetricFamily(
            "shopfloor_limit", "Each limit's setting (0: none)", labels=["limit"]
        )
        for name, value in (
            (limits.SESSIONS, settings.sessions_per_machine),
            (limits.FORWARDS, settings.forwards_per_lease),
            (limits.FILES, settings.files_in_flight),
            (limits.BODY, settings.body_limit_bytes),
            (limits.RATE, settings.token_rate_per_s),
            (limits.SNAPSHOTS, settings.snapshots_per_token),
            (limits.SNAPSHOT_BYTES, settings.snapshot_bytes_per_token),
            (limits.FORKS, settings.forks_per_token),
        ):
            configured.add_metric([name], value)
        yield configured
        access = self.ctl.access
        yield _gauge(
            "shopfloor_sessions_open", "Shell sessions open now", access.sessions.open_count()
        )
        yield _gauge(
            "shopfloor_forwards_open", "Port forwards open now", access.forwards.open_count()
        )
        yield _gauge(
            "shopfloor_files_in_flight", "File reads and writes now", self.ctl.limits.files_now()
        )


def _stuck(figures: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """Where the flow gets stuck: the same waits as ``GET /api/v1/flow``."""
    waits = figures["waits"]
    run_waits = GaugeMetricFamily(
        "shopfloor_flow_wait_ms",
        "Waits of finished runs: queued -> first stage, finished -> verdict",
        labels=["wait", "quantile"],
    )
    for wait in ("queued_to_first_stage_ms", "finished_to_verdict_ms"):
        for q in ("p50", "p95"):
            if waits[wait][q] is not None:
                run_waits.add_metric([wait.removesuffix("_ms"), q], waits[wait][q])
    yield run_waits
    yield _gauge(
        "shopfloor_runs_waiting_for_verdict",
        "Finished runs in the window without a verdict",
        waits["finished_to_verdict_ms"]["waiting"],
    )
    between = GaugeMetricFamily(
        "shopfloor_stage_wait_ms",
        "Wait between the previous stage's end and this stage's start",
        labels=["stage", "quantile"],
    )
    for stage, spread in waits["between_stages_ms"].items():
        for q in ("p50", "p95"):
            if spread[q] is not None:
                between.add_metric([stage, q], spread[q])
    yield between
    owner_wait = GaugeMetricFamily(
        "shopfloor_owner_wait_ms", "How long owners' items waited", labels=["owner", "quantile"]
    )
    owner_open = GaugeMetricFamily(
        "shopfloor_owner_open_items", "Items open in an owner's queue", labels=["owner"]
    )
    for owner, entry in figures["owners"].items():
        owner_open.add_metric([owner], entry["open"])
        for q in ("p50", "p95"):
            if entry["wait_ms"][q] is not None:
                owner_wait.add_metric([owner, q], entry["wait_ms"][q])
    yield owner_wait
    yield owner_open
    learning = figures["learning"]
    signatures = GaugeMetricFamily(
        "shopfloor_failure_signature_count",
        "The most frequent failure signatures",
        labels=["signature", "kind"],
    )
    for found in learning["signatures"]:
        signatures.add_metric(
            [str(found.get("signature")), str(found.get("kind", ""))], found.get("count", 0)
        )
    yield signatures
    yield _gauge(
        "shopfloor_flaky_tests", "Flaky or quarantined tests", len(learning["flaky_tests"])
    )
    yield _gauge(
        "shopfloor_quarantined_machines",
        "Machines quarantined now",
        len(learning["quarantined_machines"]),
    )


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float("nan") if value is None else value)


@router.get("/metrics", include_in_schema=False)
def metrics(ctl: Ctl) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlowCollector(ctl))
    registry.register(LimitsCollector(ctl))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
