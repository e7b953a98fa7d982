"""Screenshots: proof that a PNG is one, thumbnails, and comparison with the baseline.

Everything works on bytes in and bytes out so the store can keep the results as blobs.
Decoding is bounded by a pixel limit: a tiny PNG can claim a huge canvas.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageOps

from controller.errors import InvalidInput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THUMB_SIZE = (320, 240)
DIFF_MARK = (230, 0, 90)


@dataclass(frozen=True)
class Comparison:
    identical: bool
    changed_pixels: int
    total_pixels: int
    bbox: tuple[int, int, int, int] | None
    """left, top, right, bottom of the changed area (right/bottom exclusive)."""
    diff_png: bytes | None
    """Baseline faded to grey with the changed pixels marked; None when identical."""
    size_changed: bool

    @property
    def changed_share(self) -> float:
        return self.changed_pixels / self.total_pixels if self.total_pixels else 0.0


def verify_png(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height) if ``data`` really is a PNG within the pixel limit."""
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidInput("a screenshot must be a PNG file (its first bytes are not PNG's)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "PNG":
                    raise InvalidInput("a screenshot must be a PNG file")
                width, height = image.size
                _check_pixels(width, height, max_pixels)
                image.verify()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"the screenshot is too large to decode: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for corrupt files
        raise InvalidInput(f"the screenshot is not a valid PNG: {exc}") from exc
    return width, height


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InvalidInput(
            f"the screenshot is {width}x{height} pixels; at most {max_pixels} pixels are allowed"
        )


def _load_rgb(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        image.load()
    if image.mode in ("RGBA", "LA", "P"):
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def thumbnail(data: bytes, size: tuple[int, int] = THUMB_SIZE) -> bytes:
    """A small PNG that keeps the aspect ratio, for lists and run pages."""
    image = _load_rgb(data)
    image.thumbnail(size, Image.Resampling.LANCZOS)
    return _png_bytes(image)


def compare(actual: bytes, baseline: bytes) -> Comparison:
    """Pixel comparison on the union canvas: area present in only one image counts as changed."""
    new = _load_rgb(actual)
    old = _load_rgb(baseline)
    width, height = max(new.width, old.width), max(new.height, old.height)
    new_canvas = _pad(new, width, height)
    old_canvas = _pad(old, width, height)
    mask = _changed_mask(new_canvas, old_canvas, new.size, old.size)
    changed = mask.histogram()[255]
    bbox = mask.getbbox()
    diff_png = None if changed == 0 else _png_bytes(_diff_picture(old_canvas, mask))
    return Comparison(
        identical=changed == 0,
        changed_pixels=changed,
        total_pixels=width * height,
        bbox=bbox,
        diff_png=diff_png,
        size_changed=new.size != old.size,
    )


def _pad(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(image, (0, 0))
    return canvas


def _changed_mask(
    new: Image.Image, old: Image.Image, new_size: tuple[int, int], old_size: tuple[int, int]
) -> Image.Image:
    """255 where any channel differs (or only one image covers the pixel), else 0."""
    red, green, blue = ImageChops.difference(new, old).split()
    strongest = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    mask = strongest.point(lambda v: 255 if v else 0)
    coverage = Image.new("L", new.size, 255)
    coverage.paste(0, (0, 0, *new_size))
    outside_old = Image.new("L", new.size, 255)
    outside_old.paste(0, (0, 0, *old_size))
    return ImageChops.lighter(mask, ImageChops.lighter(coverage, outside_old))


def _diff_picture(old: Image.Image, mask: Image.Image) -> Image.Image:
    faded = ImageOps.grayscale(old).point(lambda v: 160 + v * 95 // 255).convert("RGB")
    marks = Image.new("RGB", old.size, DIFF_MARK)
    faded.paste(marks, mask=mask)
    return faded
