"""The hot routes read their own bodies (routes/deps.py); their OpenAPI text must still say what
they take and answer, as the other routes' does."""

from __future__ import annotations

from pathlib import Path

from controller.api.app import create_app
from controller.settings import Settings


def test_hot_routes_document_body_headers_and_answer(tmp_path: Path) -> None:
    spec = create_app(Settings(data_dir=tmp_path), background=False).openapi()
    paths = spec["paths"]
    run = paths["/api/v1/machines/{machine_id}/sessions/{session_id}/run"]["post"]
    grant = paths["/api/v1/leases"]["post"]
    renew = paths["/api/v1/leases/{lease_id}/renew"]["post"]
    release = paths["/api/v1/leases/{lease_id}"]["delete"]

    def body_title(operation: dict) -> str:  # type: ignore[type-arg]
        return str(operation["requestBody"]["content"]["application/json"]["schema"]["title"])

    def answer_ref(operation: dict, status: str) -> str:  # type: ignore[type-arg]
        return str(operation["responses"][status]["content"]["application/json"]["schema"]["$ref"])

    assert body_title(run) == "SessionRunBody"
    assert body_title(grant) == "LeaseBody"
    assert body_title(renew) == "RenewBody"
    assert answer_ref(run, "200").endswith("/SessionRunAnswer")
    assert answer_ref(grant, "201").endswith("/LeaseGranted")
    assert answer_ref(release, "200").endswith("/LeasePublic")
    schemas = spec["components"]["schemas"]
    assert {"token", "fence"} <= set(schemas["LeaseGranted"]["properties"])
    assert "token" not in schemas["LeasePublic"]["properties"]  # a secret, shown once
    assert "lease_token" not in schemas["MachinePublic"]["properties"]
    assert "x-lease-token" in [p["name"] for p in run["parameters"]]
