"""Screenshot checks, thumbnails and comparison against a baseline."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from controller.errors import InvalidInput
from evidence.images import compare, thumbnail, verify_png
from tests.unit.evidence_db import png


def test_verify_accepts_png_and_reports_size() -> None:
    assert verify_png(png((30, 20)), max_pixels=10_000) == (30, 20)


@pytest.mark.parametrize(
    "data",
    [
        b"GIF89a....",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,
        b"",
    ],
)
def test_verify_refuses_what_is_not_png(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        verify_png(data, max_pixels=10_000)


def test_verify_refuses_jpeg_named_png() -> None:
    out = io.BytesIO()
    Image.new("RGB", (5, 5)).save(out, format="JPEG")
    with pytest.raises(InvalidInput, match="PNG"):
        verify_png(out.getvalue(), max_pixels=10_000)


def test_thumbnail_keeps_aspect_ratio() -> None:
    small = Image.open(io.BytesIO(thumbnail(png((1280, 720)))))
    assert small.format == "PNG"
    assert small.size == (320, 180)


def test_identical_screenshots_have_no_diff() -> None:
    result = compare(png(box=(5, 5, 10, 10)), png(box=(5, 5, 10, 10)))
    assert result.identical
    assert result.diff_png is None
    assert result.bbox is None
    assert result.changed_share == 0.0


def test_changed_pixels_share_and_bbox() -> None:
    result = compare(png((100, 100), box=(10, 20, 19, 29)), png((100, 100)))
    assert not result.identical
    assert result.changed_pixels == 100
    assert result.changed_share == pytest.approx(0.01)
    assert result.bbox == (10, 20, 20, 30)
    assert result.diff_png is not None
    diff = Image.open(io.BytesIO(result.diff_png)).convert("RGB")
    assert diff.getpixel((15, 25)) == (230, 0, 90)
    assert diff.getpixel((50, 50)) != (230, 0, 90)


def test_one_channel_step_counts_as_change() -> None:
    result = compare(png((4, 4), colour=(255, 255, 254)), png((4, 4)))
    assert result.changed_pixels == 16


def test_size_change_marks_the_uncovered_area() -> None:
    result = compare(png((10, 12)), png((10, 10)))
    assert result.size_changed
    assert result.changed_pixels == 20
    assert result.bbox == (0, 10, 10, 12)
