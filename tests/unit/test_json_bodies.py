"""JSON bodies under /api/v1 whatever the Content-Type (``curl -d`` sends a form's, some
clients none), while raw-bytes, multipart and HTML-form routes keep theirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import pytest
from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from controller.api.app import create_app
from controller.api.deps import parse_body
from controller.api.fastlane import hot
from controller.api.schemas import SessionRunBody
from controller.services import auth
from controller.settings import Settings
from controller.store.db import make_engine, unit_of_work
from controller.store.models import Role

FORM = "application/x-www-form-urlencoded"  # what curl -d sends


class Thing(BaseModel):
    name: str
    size: int = 1


api = APIRouter(prefix="/things")
gallery = APIRouter(prefix="/gallery")


@api.post("")
def make_thing(body: Thing) -> dict[str, object]:
    return {"name": body.name, "size": body.size}


@api.put("/{thing_id}/raw")
async def put_raw(thing_id: str, request: Request) -> dict[str, object]:
    return {"raw": (await request.body()).decode(), "type": request.headers.get("content-type")}


@api.post("/{thing_id}/upload")
async def upload(thing_id: str, request: Request) -> dict[str, object]:
    async with request.form() as form:
        file = form.get("file")
        assert isinstance(file, UploadFile)
        return {"file": (await file.read()).decode(), "kind": form.get("kind")}


@api.post("/{thing_id}/run")
@hot
async def run_hot(thing_id: str, request: Request) -> Response:
    body = parse_body(SessionRunBody, await request.body())
    return JSONResponse({"cmd": body.cmd})


@gallery.post("/test-form")
def login(token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/") -> dict[str, str]:  # noqa: A002
    return {"token": token, "next": next}


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The real app (its middleware and error handlers), with test routes of each kind of body."""
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("json")), background=False)
    app.include_router(api, prefix="/api/v1")
    app.include_router(gallery)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": FORM}, {}, {"Content-Type": "text/plain"}],
    ids=["form-content-type", "no-content-type", "text-plain"],
)
def test_a_json_body_is_read_as_json_whatever_its_content_type(
    app_client: TestClient, headers: dict[str, str]
) -> None:
    answer = app_client.post(
        "/api/v1/things", content=b'{"name": "lamp", "size": 3}', headers=headers
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"name": "lamp", "size": 3}


def test_a_json_body_is_still_validated(app_client: TestClient) -> None:
    answer = app_client.post(
        "/api/v1/things", content=b'{"size": "big"}', headers={"Content-Type": FORM}
    )
    assert answer.status_code == 422
    fields = {p["field"] for p in answer.json()["problems"]}
    assert fields == {"name", "size"}


@pytest.mark.parametrize("headers", [{"Content-Type": FORM}, {}], ids=["form", "none"])
def test_a_body_that_is_not_json_gets_a_422_that_says_so(
    app_client: TestClient, headers: dict[str, str]
) -> None:
    answer = app_client.post("/api/v1/things", content=b"name=lamp&size=3", headers=headers)
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"] == "invalid_input"
    assert "must be JSON" in body["detail"], body
    assert "line 1 column 1" in body["detail"]


def test_an_empty_body_is_a_missing_body(app_client: TestClient) -> None:
    answer = app_client.post("/api/v1/things", headers={"Content-Type": FORM})
    assert answer.status_code == 422
    assert "Field required" in answer.json()["detail"]


def test_raw_multipart_and_html_form_routes_keep_their_bodies(app_client: TestClient) -> None:
    raw = app_client.put(
        "/api/v1/things/t1/raw", content=b"a=1&not json", headers={"Content-Type": FORM}
    )
    assert raw.json() == {"raw": "a=1&not json", "type": FORM}
    bare = app_client.put("/api/v1/things/t1/raw", content=b"\x00not json")
    assert bare.status_code == 200
    assert bare.json()["raw"] == "\x00not json"
    uploaded = app_client.post(
        "/api/v1/things/t1/upload", files={"file": ("a.txt", b"hello")}, data={"kind": "log"}
    )
    assert uploaded.json() == {"file": "hello", "kind": "log"}
    form = app_client.post("/gallery/test-form", data={"token": "sf_x", "next": "/gallery/runs"})
    assert form.json() == {"token": "sf_x", "next": "/gallery/runs"}


def test_hot_routes_read_json_whatever_the_content_type(app_client: TestClient) -> None:
    for headers in ({"Content-Type": FORM}, {}):
        answer = app_client.post(
            "/api/v1/things/t1/run", content=b'{"cmd": "true"}', headers=headers
        )
        assert answer.json() == {"cmd": "true"}
    bad = app_client.post(
        "/api/v1/things/t1/run", content=b"cmd=true", headers={"Content-Type": FORM}
    )
    assert bad.status_code == 422
    assert "JSON" in bad.json()["detail"]


def test_the_apps_own_routes_take_curl_bodies(tmp_path: Path) -> None:
    """POST /api/v1/machines as ``curl -d`` sends it: the body reaches the model's checks."""
    settings = Settings(data_dir=tmp_path)
    with TestClient(create_app(settings, background=False)) as client:
        with unit_of_work(make_engine(settings.sqlalchemy_url)) as tx:
            token = auth.create_token(tx=tx, role=Role.ops)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": FORM}
        answer = client.post("/api/v1/machines", content=b'{"cpus": 99}', headers=headers)
        assert answer.status_code == 422
        assert [p["field"] for p in answer.json()["problems"]] == ["cpus"], answer.text
        pool = client.put("/api/v1/pools/py", content=b"min_ready=3", headers=headers)
        assert pool.status_code == 422
        assert "must be JSON" in pool.json()["detail"]
