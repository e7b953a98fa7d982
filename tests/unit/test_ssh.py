"""Pure parts of the SSH transport: the engine stream's demultiplexer, keys, exec command lines."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from controller.providers.docker import DemuxedStream
from controller.transport.keys import load_or_create
from controller.transport.sshexec import command_line


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


class FakeSocket:
    """Hands out prepared pieces; a ``None`` piece is a timeout."""

    def __init__(self, pieces: list[bytes | None]) -> None:
        self.pieces = pieces
        self.sent = b""
        self.closed = False

    def recv(self, _n: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if piece is None:
            raise TimeoutError("timed out")
        return piece

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)

    def settimeout(self, _t: float | None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def read_all(stream: DemuxedStream) -> bytes:
    out = b""
    while chunk := stream.recv(5):
        out += chunk
    return out


def test_frames_split_anywhere_give_stdout_only_and_keep_stderr() -> None:
    wire = frame(1, b"SSH-2.0-x\r\n") + frame(2, b"log line\n") + frame(1, b"payload")
    pieces: list[bytes | None] = [wire[i : i + 3] for i in range(0, len(wire), 3)]
    stream = DemuxedStream(FakeSocket(pieces))
    assert read_all(stream) == b"SSH-2.0-x\r\npayload"
    assert stream.stderr_tail() == b"log line\n"


def test_a_timeout_mid_frame_loses_nothing() -> None:
    wire = frame(1, b"abcdefgh")
    stream = DemuxedStream(FakeSocket([wire[:6], None, wire[6:10], None, wire[10:]]))
    got = b""
    while True:
        try:
            chunk = stream.recv(100)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += chunk
    assert got == b"abcdefgh"


def test_empty_frames_and_stderr_cap() -> None:
    noise = b"e" * (DemuxedStream.STDERR_KEEP + 100)
    stream = DemuxedStream(FakeSocket([frame(1, b""), frame(2, noise), frame(1, b"x")]))
    assert read_all(stream) == b"x"
    assert len(stream.stderr_tail()) == DemuxedStream.STDERR_KEEP


def test_send_and_close_reach_the_socket() -> None:
    raw = FakeSocket([])
    stream = DemuxedStream(raw)
    assert stream.send(b"go\n") == 3
    stream.close()
    stream.close()
    assert raw.sent == b"go\n"
    assert raw.closed
    assert stream._closed


def test_key_pair_is_made_once_with_private_mode(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    key_file = tmp_path / "ssh" / "id_ed25519"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert first.public_line.startswith("ssh-ed25519 ")
    key_file.chmod(0o644)  # someone loosened it: fixed on the next load
    again = load_or_create(tmp_path)
    assert again.public_line == first.public_line
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def made_at_once(data_dir: Path, makers: int) -> tuple[list[str], list[BaseException]]:
    """``makers`` threads load (or make) the key of ``data_dir`` at the same moment."""
    start = threading.Barrier(makers)
    found: list[str] = []
    errors: list[BaseException] = []

    def make() -> None:
        start.wait()
        try:
            found.append(load_or_create(data_dir).public_line)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(makers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return found, errors


def test_key_pair_made_by_many_threads_at_once_is_one_key(tmp_path: Path) -> None:
    """Seen in bench/factory.py: a run's driver and a hand-over made the key at once; both
    wrote one ``.tmp`` file and the second rename failed (FileNotFoundError: the run failed
    with a driver error). Every caller must get the one key that is on disk."""
    for attempt in range(5):
        data_dir = tmp_path / str(attempt)
        found, errors = made_at_once(data_dir, 8)
        assert errors == []
        on_disk = load_or_create(data_dir).public_line
        assert found == [on_disk] * 8
        assert [p.name for p in (data_dir / "ssh").iterdir()] == ["id_ed25519"]


@pytest.mark.parametrize(
    ("argv", "workdir", "env", "expected"),
    [
        (["true"], None, None, "exec env -- PATH="),
        (["bash", "-c", "echo 'x'"], "/work dir", {"A": "b c"}, "cd -- '/work dir' && exec env"),
    ],
)
def test_exec_command_line_quotes_everything(
    argv: list[str], workdir: str | None, env: dict[str, str] | None, expected: str
) -> None:
    line = command_line(argv, workdir, env)
    assert line.startswith(expected)
    if env:
        assert "'A=b c'" in line
        assert line.endswith("bash -c 'echo '\"'\"'x'\"'\"''")


def test_commands_fall_back_to_the_engine_when_a_machine_has_no_sshd() -> None:
    from controller.errors import TransportError
    from controller.transport.sshexec import CommandRunner

    class NoSsh:
        calls = 0

        def get(self, container: str) -> None:
            NoSsh.calls += 1
            raise TransportError(f"no sshd in {container}")

    engine = object()
    runner = CommandRunner(NoSsh(), engine)  # type: ignore[arg-type]
    assert runner.for_container("c1") is engine
    assert runner.for_container("c1") is engine  # remembered: no second connect attempt
    assert NoSsh.calls == 1


def test_without_a_direct_way_in_only_the_engines_way_is_tried(tmp_path: Path) -> None:
    """A controller that cannot enter the machine's namespace (remote engine, no root) pays
    no exec for the direct way: it goes straight to ``sshd -i`` through the engine."""
    from controller.errors import EngineError
    from controller.transport.ssh import connect

    class EngineOnly:
        asked: list[str] = []

        def connect_loopback(self, container: str, port: int, *, timeout_s: float) -> None:
            self.asked.append(f"loopback {container}:{port}")

        def exec(self, *_: object, **__: object) -> None:
            self.asked.append("exec")
            raise AssertionError("no exec for the direct way")

        def open_stream(self, container: str, argv: list[str], **_: object) -> None:
            self.asked.append(f"stream {argv[-1].split()[-1]}")
            raise EngineError(f"{container} is gone")

    provider = EngineOnly()
    with pytest.raises(EngineError):
        connect(provider, "c1", load_or_create(tmp_path), timeout_s=1)  # type: ignore[arg-type]
    assert provider.asked == ["loopback c1:22", "stream MaxSessions=256"]
