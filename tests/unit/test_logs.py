"""Log rendering: colours, escaping, bad bytes, failure lines."""

from __future__ import annotations

from evidence.logs import render, strip_ansi


def test_ansi_colours_become_classes_and_html_is_escaped() -> None:
    log = render(b"\x1b[1;31mred <script>alert(1)</script>\x1b[0m plain\n")
    (line,) = log.lines
    assert (
        line.html == '<span class="fg-red b">red &lt;script&gt;alert(1)&lt;/script&gt;</span> plain'
    )


def test_colour_carries_over_lines_until_reset() -> None:
    log = render(b"\x1b[32mgreen\nstill green\x1b[39m\nplain")
    assert [line.html for line in log.lines] == [
        '<span class="fg-green">green</span>',
        '<span class="fg-green">still green</span>',
        "plain",
    ]


def test_non_utf8_bytes_are_replaced_not_fatal() -> None:
    log = render(b"ok\n\xff\xfe\xc3(bad\x00\n")
    assert log.lines[1].html == "\ufffd\ufffd\ufffd(bad"
    assert len(log.lines) == 2


def test_failure_lines_are_marked() -> None:
    data = (
        b"test_app.py::test_ok PASSED\n"
        b"test_app.py::test_title \x1b[31mFAILED\x1b[0m\n"
        b"E       AssertionError: assert 'Old' == 'New'\n"
        b"Traceback (most recent call last):\n"
        b"no errors here, errors=0\n"
    )
    marked = [line.number for line in render(data).failures]
    assert marked == [2, 3, 4]


def test_cursor_and_osc_escapes_are_dropped() -> None:
    assert strip_ansi("\x1b[2K\x1b]0;title\x07done") == "done"
    assert render(b"10%\r50%\r100%\n").lines[0].html == "100%"


def test_huge_log_is_truncated_for_display() -> None:
    log = render(b"line\n" * 1000, max_bytes=100)
    assert log.truncated
    assert len(log.lines) == 20
