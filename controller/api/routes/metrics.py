"""``/metrics``: Prometheus text, read from the database at scrape time (no token, like /healthz)."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from controller.api.deps import Ctl
from controller.services import flow
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


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float("nan") if value is None else value)


@router.get("/metrics", include_in_schema=False)
def metrics(ctl: Ctl) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlowCollector(ctl))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
