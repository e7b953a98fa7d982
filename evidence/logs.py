"""Logs for people: ANSI colours become HTML, bad bytes become U+FFFD, failures stand out.

The output is escaped HTML per line (the only markup is our own ``<span class=...>``), so
a log that contains ``<script>`` shows it as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape

SGR = re.compile(r"\x1b\[([0-9;]*)m")
OTHER_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
FAILURE = re.compile(
    r"(\bFAILED\b|\bFAIL(?:URE)?\b|\bERROR\b|\bError\b|Traceback \(most recent call last\)|"
    r"\bAssertionError\b|\bException\b|\bpanic:|\bfatal:|\bE\s{3})"
)
COLOURS = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")
SHOWN_BYTES = 2 * 1024 * 1024
"""More than this is not rendered inline; the page links to the raw log instead."""


@dataclass(frozen=True)
class Line:
    number: int
    html: str
    failure: bool


@dataclass(frozen=True)
class RenderedLog:
    lines: list[Line]
    truncated: bool

    @property
    def failures(self) -> list[Line]:
        return [line for line in self.lines if line.failure]


def decode(data: bytes) -> str:
    """UTF-8 with every undecodable byte replaced, never an exception."""
    return data.decode("utf-8", errors="replace")


def strip_ansi(text: str) -> str:
    return OTHER_ESCAPES.sub("", SGR.sub("", text))


def is_failure(plain: str) -> bool:
    return FAILURE.search(plain) is not None


def render(data: bytes, *, max_bytes: int = SHOWN_BYTES) -> RenderedLog:
    truncated = len(data) > max_bytes
    text = decode(data[:max_bytes]).replace("\r\n", "\n")
    state = _Style()
    lines: list[Line] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        raw = raw.rstrip("\r").rsplit("\r", 1)[-1]  # progress bars: the last repaint survives
        html = _line_html(raw, state)
        lines.append(Line(number=number, html=html, failure=is_failure(strip_ansi(raw))))
    if lines and not lines[-1].html and text.endswith("\n"):
        lines.pop()
    return RenderedLog(lines=lines, truncated=truncated)


class _Style:
    """The SGR state that carries across lines, as terminals do."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fg: str | None = None
        self.bg: str | None = None
        self.bold = False
        self.italic = False
        self.underline = False

    def apply(self, params: str) -> None:
        codes = [int(p) for p in params.split(";") if p.isdigit()] or [0]
        i = 0
        while i < len(codes):
            code = codes[i]
            if code in (38, 48) and i + 1 < len(codes):
                i += 3 if codes[i + 1] == 5 else 5  # 256-colour / truecolour: not kept
                continue
            self._one(code)
            i += 1

    def _one(self, code: int) -> None:
        if code == 0:
            self.reset()
        elif code == 1:
            self.bold = True
        elif code == 3:
            self.italic = True
        elif code == 4:
            self.underline = True
        elif code == 22:
            self.bold = False
        elif code == 23:
            self.italic = False
        elif code == 24:
            self.underline = False
        elif 30 <= code <= 37:
            self.fg = COLOURS[code - 30]
        elif 90 <= code <= 97:
            self.fg = "bright-" + COLOURS[code - 90]
        elif code == 39:
            self.fg = None
        elif 40 <= code <= 47:
            self.bg = COLOURS[code - 40]
        elif code == 49:
            self.bg = None

    def classes(self) -> list[str]:
        found = [f"fg-{self.fg}"] if self.fg else []
        found += [f"bg-{self.bg}"] if self.bg else []
        found += [name for name, on in (("b", self.bold), ("i", self.italic)) if on]
        return found + (["u"] if self.underline else [])


def _line_html(raw: str, state: _Style) -> str:
    out: list[str] = []
    position = 0
    for match in SGR.finditer(raw):
        out.append(_span(raw[position : match.start()], state))
        state.apply(match.group(1))
        position = match.end()
    out.append(_span(raw[position:], state))
    return "".join(out)


def _span(chunk: str, state: _Style) -> str:
    text = escape(CONTROL.sub("", OTHER_ESCAPES.sub("", chunk)), quote=False)
    if not text:
        return ""
    classes = state.classes()
    return f'<span class="{" ".join(classes)}">{text}</span>' if classes else text
