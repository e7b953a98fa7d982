"""FastAPI's per-request OpenTelemetry hooks are off unless the setting asks for them."""

from __future__ import annotations

from pathlib import Path

from controller.api.app import create_app
from controller.settings import Settings


def test_opentelemetry_is_off_by_default_and_on_when_asked(tmp_path: Path) -> None:
    quiet = create_app(Settings(data_dir=tmp_path), background=False)
    traced = create_app(Settings(data_dir=tmp_path, opentelemetry=True), background=False)
    assert quiet._telemetry["tracing"] is False  # noqa: SLF001 - FastAPI keeps it private
    assert quiet._telemetry["operation_spans"] is False  # noqa: SLF001
    assert traced._telemetry["tracing"] is True  # noqa: SLF001
