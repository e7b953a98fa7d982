"""Limits without an engine: the token bucket, files in flight, and body caps on every route."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from controller.api.body_limits import BodyLimits, body_cap
from controller.api.deps import parse_body
from controller.api.fastlane import ShopfloorAPI, hot
from controller.api.json_bodies import JsonBodies
from controller.api.schemas import SessionRunBody
from controller.errors import LimitReached, ShopfloorError
from controller.services import limits
from controller.services.limits import Limits, TokenBuckets
from controller.settings import Settings

# ---------------------------------------------------------------- the token bucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(limits.time, "monotonic", fake)
    return fake


def test_a_bucket_lets_a_burst_through_then_its_rate(clock: Clock) -> None:
    buckets = TokenBuckets(rate=10, burst=5)
    assert [buckets.take("a") for _ in range(5)] == [0.0] * 5
    wait = buckets.take("a")
    assert wait == pytest.approx(0.1)
    assert buckets.take("b") == 0.0  # another token has a bucket of its own
    clock.now += 0.1
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    clock.now += 60  # refills up to the burst, not past it
    assert [buckets.take("a") for _ in range(5)] == [0.0] * 5
    assert buckets.take("a") > 0


def test_rate_zero_is_no_limit() -> None:
    buckets = TokenBuckets(rate=0, burst=1)
    assert all(buckets.take("a") == 0.0 for _ in range(1000))


def test_idle_buckets_are_forgotten(clock: Clock) -> None:
    buckets = TokenBuckets(rate=1, burst=1)
    buckets.take("old")
    clock.now += 3600
    buckets.take("new")
    assert set(buckets._buckets) == {"new"}


def test_a_refusal_says_the_limit_and_when_to_retry(clock: Clock, tmp_path: Path) -> None:
    lim = Limits(Settings(data_dir=tmp_path, token_rate_per_s=2, token_rate_burst=1))
    lim.check_rate("t-1", "ci")
    with pytest.raises(LimitReached) as refused:
        lim.check_rate("t-1", "ci")
    assert refused.value.status_code == 429
    assert refused.value.headers == {"Retry-After": "1"}
    assert "SHOPFLOOR_TOKEN_RATE_PER_S" in refused.value.message
    assert "'ci'" in refused.value.message
    assert lim.refused[limits.RATE] == 1


def test_the_bucket_costs_microseconds() -> None:
    buckets = TokenBuckets(rate=1e9, burst=10**9)
    started = time.perf_counter()
    for _ in range(100_000):
        buckets.take("agent")
    assert (time.perf_counter() - started) / 100_000 < 5e-6


def test_files_in_flight_per_machine(tmp_path: Path) -> None:
    lim = Limits(Settings(data_dir=tmp_path, files_in_flight=2))
    with lim.file_in_flight("m-1"), lim.file_in_flight("m-1"):
        with pytest.raises(LimitReached, match="SHOPFLOOR_FILES_IN_FLIGHT"):
            with lim.file_in_flight("m-1"):
                pass
        with lim.file_in_flight("m-2"):  # another machine's places are its own
            assert lim.files_now() == 3
    assert lim.files_now() == 0
    with lim.file_in_flight("m-1"):
        pass
    assert lim.refused[limits.FILES] == 1


# ---------------------------------------------------------------- body caps


class Thing(BaseModel):
    text: str = ""


router = APIRouter()


@router.post("/api/json")
async def json_route(body: Thing) -> dict[str, int]:
    return {"length": len(body.text)}


@router.put("/api/upload")
@body_cap("SHOPFLOOR_FILE_CAP_BYTES", lambda settings: settings.file_cap_bytes)
async def upload(request: Request) -> dict[str, int]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return {"size": size}


@router.post("/api/hot")
@hot
async def hot_route(request: Request) -> Response:
    body = parse_body(SessionRunBody, await request.body())
    return JSONResponse({"cmd": len(body.cmd)})


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = Settings(data_dir=tmp_path, body_limit_bytes=1000, file_cap_bytes=5000)
    app = ShopfloorAPI()

    @app.exception_handler(ShopfloorError)
    async def shopfloor_error(_: Request, exc: ShopfloorError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimits, settings=settings)
    app.body_limit = settings.body_limit_bytes
    app.include_router(router)
    return TestClient(app, raise_server_exceptions=False)


def chunks(total: int, size: int = 100) -> Iterator[bytes]:
    """A body without Content-Length (chunked)."""
    sent = 0
    while sent < total:
        sent += size
        yield b"x" * size


def test_a_json_body_over_the_default_cap_is_413(client: TestClient) -> None:
    assert client.post("/api/json", json={"text": "x" * 900}).json() == {"length": 900}
    refused = client.post("/api/json", json={"text": "x" * 1000})
    assert refused.status_code == 413
    assert "1000 bytes" in refused.json()["detail"]
    assert "SHOPFLOOR_BODY_LIMIT_BYTES" in refused.json()["detail"]
    # Not declared JSON (curl -d): JsonBodies would read it all; the cap comes first.
    form = client.post("/api/json", content=b'{"text": "' + b"x" * 2000 + b'"}')
    assert form.status_code == 413


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_cap(client: TestClient) -> None:
    """Driven as ASGI (TestClient reads a whole body before the app sees it): the client
    has 100,000 bytes to send in 100-byte messages; the app pulls a little over 1,000."""
    app = client.app
    client.get("/nothing")  # the app builds its middleware stack on its first request
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/json",
        "raw_path": b"/api/json",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("test", 80),
        "client": ("test", 1),
    }
    pulled = 0
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        nonlocal pulled
        pulled += 100
        return {"type": "http.request", "body": b"x" * 100, "more_body": pulled < 100_000}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 413
    assert pulled <= 1100
    assert b"SHOPFLOOR_BODY_LIMIT_BYTES" in b"".join(m.get("body", b"") for m in sent)  # type: ignore[misc]


def test_a_route_with_its_own_cap(client: TestClient) -> None:
    assert client.put("/api/upload", content=b"x" * 4000).json() == {"size": 4000}
    assert client.put("/api/upload", content=chunks(4000)).json() == {"size": 4000}
    refused = client.put("/api/upload", content=b"x" * 6000)
    assert refused.status_code == 413
    assert "SHOPFLOOR_FILE_CAP_BYTES" in refused.json()["detail"]
    assert client.put("/api/upload", content=chunks(6000)).status_code == 413


def test_the_hot_lane_takes_the_same_cap(client: TestClient) -> None:
    assert client.post("/api/hot", json={"cmd": "x" * 900}).json() == {"cmd": 900}
    assert client.post("/api/hot", json={"cmd": "x" * 1000}).status_code == 413
    streamed = client.post("/api/hot", content=chunks(5000))
    assert streamed.status_code == 413
