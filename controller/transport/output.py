"""Bounded capture of command output: keep the head and the tail, count what was dropped."""

from __future__ import annotations

import codecs
from collections import deque


class HeadTail:
    """Keeps the first and last ``cap // 2`` bytes of a stream of unknown length."""

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_len = 0
        self.total = 0

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        self.tail.append(chunk)
        self.tail_len += len(chunk)
        while self.tail and self.tail_len - len(self.tail[0]) >= self.tail_cap:
            self.tail_len -= len(self.tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > self.head_cap + self.tail_cap

    def getvalue(self) -> bytes:
        tail = b"".join(self.tail)
        if not self.truncated:
            return bytes(self.head) + tail
        tail = tail[-self.tail_cap :]
        dropped = self.total - len(self.head) - len(tail)
        marker = f"\n[... {dropped} bytes omitted ...]\n".encode()
        return bytes(self.head) + marker + tail

    def text(self) -> str:
        return decode(self.getvalue())


def decode(data: bytes) -> str:
    """Output is bytes; JSON wants text. Invalid UTF-8 becomes U+FFFD, never an error."""
    return data.decode("utf-8", errors="replace")


def incremental_decoder() -> codecs.IncrementalDecoder:
    """For streams: a multi-byte character split across chunks still decodes whole."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")
