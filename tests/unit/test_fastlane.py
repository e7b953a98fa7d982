"""The hot routes' short way in: found first, answered like FastAPI would answer them."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from controller.api.deps import parse_body
from controller.api.fastlane import HOT_BODY_LIMIT, ShopfloorAPI, hot
from controller.api.schemas import SessionRunBody
from controller.errors import NotFound, ShopfloorError

router = APIRouter(prefix="/things")
seen: list[str] = []


@router.post("/{thing_id}/run")
@hot
async def run_hot(thing_id: str, request: Request) -> Response:
    seen.append(request.scope["route_kind"] if "route_kind" in request.scope else "lane")
    body = parse_body(SessionRunBody, await request.body())
    if thing_id == "missing":
        raise NotFound("no thing missing")
    if thing_id == "broken":
        raise RuntimeError("a bug")
    return JSONResponse({"thing": thing_id, "cmd": body.cmd})


@router.post("/{thing_id}/cold")
async def run_cold(thing_id: str) -> dict[str, str]:
    return {"thing": thing_id}


@pytest.fixture
def client() -> TestClient:
    app = ShopfloorAPI()

    @app.exception_handler(ShopfloorError)
    async def shopfloor_error(_: Request, exc: ShopfloorError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.middleware("http")
    async def mark(request: Request, call_next):  # type: ignore[no-untyped-def]
        request.scope["route_kind"] = "fastapi"  # only requests through FastAPI's stack
        return await call_next(request)

    app.include_router(router, prefix="/api")
    return TestClient(app, raise_server_exceptions=False)


def test_a_hot_route_is_served_ahead_of_the_middleware(client: TestClient) -> None:
    seen.clear()
    answer = client.post("/api/things/t 1/run", json={"cmd": "true"})
    assert answer.json() == {"thing": "t 1", "cmd": "true"}
    assert seen == ["lane"]
    assert client.post("/api/things/t1/cold").json() == {"thing": "t1"}  # the rest: FastAPI


def test_other_methods_and_paths_go_to_fastapi(client: TestClient) -> None:
    assert client.get("/api/things/t1/run").status_code == 405
    assert client.post("/api/things/t1/run/more", json={"cmd": "x"}).status_code == 404


def test_errors_get_the_apps_own_answers(client: TestClient) -> None:
    missing = client.post("/api/things/missing/run", json={"cmd": "true"})
    assert missing.status_code == 404
    assert missing.json()["detail"] == "no thing missing"
    invalid = client.post("/api/things/t1/run", json={"cmd": ""})
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["cmd"]
    broken = client.post("/api/things/broken/run", json={"cmd": "true"})
    assert broken.status_code == 500
    assert broken.json() == {"error": "internal", "detail": "internal error"}


def test_a_body_over_the_cap_is_refused_with_413(client: TestClient) -> None:
    huge = b'{"cmd": "' + b"x" * HOT_BODY_LIMIT + b'"}'
    answer = client.post("/api/things/t1/run", content=huge)
    assert answer.status_code == 413
    assert answer.json()["error"] == "too_large"
