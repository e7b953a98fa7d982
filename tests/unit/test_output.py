from __future__ import annotations

from controller.transport.output import HeadTail, decode, incremental_decoder


def test_small_output_is_kept_whole() -> None:
    capture = HeadTail(100)
    for chunk in (b"hello ", b"world"):
        capture.write(chunk)
    assert capture.getvalue() == b"hello world"
    assert not capture.truncated


def test_large_output_keeps_head_and_tail_exactly() -> None:
    capture = HeadTail(10)
    data = bytes(range(256)) * 40
    for start in range(0, len(data), 7):
        capture.write(data[start : start + 7])
    value = capture.getvalue()
    assert capture.truncated
    assert value.startswith(data[:5])
    assert value.endswith(data[-5:])
    assert f"{len(data) - 10} bytes omitted".encode() in value


def test_output_exactly_at_cap_is_not_truncated() -> None:
    capture = HeadTail(8)
    capture.write(b"12345678")
    assert not capture.truncated
    assert capture.getvalue() == b"12345678"


def test_invalid_utf8_is_replaced() -> None:
    assert decode(b"a\xfeb") == "a\ufffdb"


def test_split_multibyte_character_decodes_whole() -> None:
    decoder = incremental_decoder()
    snowman = "☃".encode()
    assert decoder.decode(snowman[:1]) + decoder.decode(snowman[1:]) == "☃"
