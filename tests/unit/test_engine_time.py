"""The engine's timestamps: RFC 3339 with or without fractions, ``Z`` or an offset."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from controller.providers.docker import _parse_time


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-03T18:38:53Z", datetime(2026, 12, 3, 18, 38, 53, tzinfo=UTC)),
        (
            "2026-12-03T18:38:53.123456789Z",
            datetime(2026, 12, 3, 18, 38, 53, 123456, tzinfo=UTC),
        ),
        (
            "2026-12-03T19:38:53+01:00",
            datetime(2026, 12, 3, 19, 38, 53, tzinfo=timezone(timedelta(hours=1))),
        ),
        ("2026-12-03T18:38:53.5-02:30", datetime(2026, 12, 3, 21, 8, 53, 500000, tzinfo=UTC)),
    ],
)
def test_engine_times_parse_with_and_without_fractions(text: str, expected: datetime) -> None:
    assert _parse_time(text) == expected


def test_volume_time_without_fraction_is_not_now() -> None:
    # The engine's volume CreatedAt has no fraction; it used to parse as "now".
    parsed = _parse_time("2020-01-01T00:00:00Z")
    assert parsed.year == 2020


@pytest.mark.parametrize("text", [None, "", "0001-01-01T00:00:00Z", "garbage"])
def test_missing_or_zero_times_are_none(text: str | None) -> None:
    assert _parse_time(text) is None
