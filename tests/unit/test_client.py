"""The client's error mapping and lease life cycle over a mock transport (no controller)."""

from __future__ import annotations

import time

import httpx
import pytest

from agents.client import ERRORS, Client, raise_for
from controller import errors


def answer(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("GET", "http://x/"))


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (409, "stale_lease", errors.StaleLease),
        (409, "conflict", errors.Conflict),
        (410, "session_lost", errors.SessionLost),
        (413, "too_large", errors.TooLarge),
        (404, "not_found", errors.NotFound),
        (502, "transport_error", errors.TransportError),
        (422, "invalid_input", errors.InvalidInput),
    ],
)
def test_error_codes_become_the_controllers_classes(
    status: int, code: str, cls: type[errors.ShopfloorError]
) -> None:
    with pytest.raises(cls) as caught:
        raise_for(answer(status, {"error": code, "detail": "what to fix", "fence": 7}))
    assert type(caught.value) is cls
    assert caught.value.message == "what to fix"
    assert caught.value.status_code == status


def test_unknown_answers_still_raise_a_shopfloor_error() -> None:
    with pytest.raises(errors.InvalidInput):
        raise_for(answer(422, {"detail": [{"loc": "x"}]}))
    with pytest.raises(errors.ShopfloorError, match="gateway"):
        raise_for(
            httpx.Response(502, text="gateway down", request=httpx.Request("GET", "http://x/"))
        )
    raise_for(answer(200, {}))  # success raises nothing


def test_every_error_class_is_known() -> None:
    assert ERRORS["stale_lease"] is errors.StaleLease
    assert ERRORS["internal"] is errors.ShopfloorError


def test_lease_renews_in_the_background_and_releases_on_exit() -> None:
    calls: list[tuple[str, str, dict[str, str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path, dict(request.headers)))
        if request.url.path == "/api/v1/leases":
            return httpx.Response(
                201, json={"id": "l-1", "machine_id": "m-1", "token": "s3cret", "fence": 5}
            )
        if request.url.path.endswith("/exec"):
            return httpx.Response(
                200,
                json={
                    "exit_code": 0,
                    "stdout": "hi\n",
                    "stderr": "",
                    "duration_ms": 1.0,
                    "truncated": False,
                    "timed_out": False,
                },
            )
        return httpx.Response(200, json={})

    http = httpx.Client(base_url="http://controller", transport=httpx.MockTransport(handler))
    client = Client("http://controller", "tok", http=http)
    with client.lease(pool="py", ttl_s=0.6) as machine:
        assert machine.exec("echo hi").stdout == "hi\n"
        time.sleep(0.7)
    paths = [(m, p) for m, p, _ in calls]
    assert paths[0] == ("POST", "/api/v1/leases")
    assert ("POST", "/api/v1/leases/l-1/renew") in paths
    assert paths[-1] == ("DELETE", "/api/v1/leases/l-1")
    exec_headers = next(h for m, p, h in calls if p.endswith("/exec"))
    assert exec_headers["x-lease-token"] == "s3cret"
    assert exec_headers["authorization"] == "Bearer tok"
