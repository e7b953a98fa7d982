"""Session protocol parsing and the workspace confinement of file paths (no engine)."""

from __future__ import annotations

import pytest

from controller.errors import InvalidInput
from controller.transport.output import HeadTail
from controller.transport.sessions import _MarkerReader
from controller.transport.sftp import confine

MARKER = b"__sf_0123456789abcdef__ "


def feed_in_pieces(data: bytes, size: int, cap: int = 1000) -> _MarkerReader:
    reader = _MarkerReader(MARKER, HeadTail(cap))
    for i in range(0, len(data), size):
        reader.feed(data[i : i + size])
    return reader


@pytest.mark.parametrize("size", [1, 2, 7, 64, 10_000])
def test_marker_found_however_the_output_is_split(size: int) -> None:
    reader = feed_in_pieces(b"hello\nno newline" + MARKER + b"42\n", size)
    assert reader.done
    assert reader.exit_code == 42
    assert reader.captured.getvalue() == b"hello\nno newline"


def test_not_done_until_the_exit_code_line_ends() -> None:
    reader = feed_in_pieces(b"out" + MARKER + b"1", 4)
    assert not reader.done
    reader.feed(b"30\n")
    assert reader.done
    assert reader.exit_code == 130


def test_a_partial_marker_in_the_output_is_output() -> None:
    lookalike = MARKER[:-3] + b"xyz "
    reader = feed_in_pieces(lookalike + b"tail" + MARKER + b"0\n", 5)
    assert reader.captured.getvalue() == lookalike + b"tail"


def test_big_output_is_capped() -> None:
    reader = feed_in_pieces(b"A" * 5000 + b"Z" + MARKER + b"0\n", 333, cap=100)
    assert reader.captured.truncated
    value = reader.captured.getvalue()
    assert value.startswith(b"A" * 50)
    assert value.endswith(b"Z")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.txt", "/workspace/a.txt"),
        ("repo/./src//x.py", "/workspace/repo/src/x.py"),
        ("/workspace/repo/x", "/workspace/repo/x"),
        ("/workspace", "/workspace"),
        ("%2e%2e/x", "/workspace/%2e%2e/x"),
        ("..foo/x", "/workspace/..foo/x"),
    ],
)
def test_confine_accepts_paths_inside(path: str, expected: str) -> None:
    assert confine(path) == expected


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("/etc/passwd", "outside /workspace"),
        ("/workspace2/x", "outside /workspace"),
        ("/workspace/../etc", "'..'"),
        ("", "empty"),
        ("a\x00b", "control characters"),
        ("a\rb", "control characters"),
        ("x" * 5000, "too long"),
    ],
)
def test_confine_refuses_paths_outside_with_a_reason(path: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        confine(path)
