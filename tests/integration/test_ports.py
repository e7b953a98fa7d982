"""Port forwards over SSH (machines have no network): a real server, and nothing listening."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

SERVE = (
    "mkdir -p /tmp/site && echo 'hello from the machine' > /tmp/site/index.html && "
    "cd /tmp/site && setsid nohup python3 -m http.server {port} --bind 127.0.0.1 "
    ">/tmp/http.log 2>&1 & for i in $(seq 100); do "
    "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))' "
    "2>/dev/null && exit 0; sleep 0.1; done; exit 1"
)


def forward(client: TestClient, machine_id: str, port: int) -> dict[str, object]:
    response = client.post(f"/api/v1/machines/{machine_id}/ports", json={"port": port})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_forward_reaches_a_server_in_a_machine_without_network(
    module_client: TestClient, module_machine: str
) -> None:
    machine = module_client.get(f"/api/v1/machines/{module_machine}").json()
    assert machine["network"] == "none"
    started = module_client.post(
        f"/api/v1/machines/{module_machine}/exec", json={"cmd": SERVE.format(port=8123)}
    )
    assert started.json()["exit_code"] == 0, started.text
    answer = forward(module_client, module_machine, 8123)
    assert answer["listening"] is True
    assert str(answer["url"]).startswith("http://127.0.0.1:")
    for _ in range(3):  # several connections through one forward
        page = httpx.get(f"{answer['url']}/index.html", timeout=10)
        assert page.status_code == 200
        assert page.text == "hello from the machine\n"
    assert forward(module_client, module_machine, 8123)["url"] == answer["url"]  # reused


def test_forward_to_a_port_nothing_listens_on_says_so(
    module_client: TestClient, module_machine: str
) -> None:
    answer = forward(module_client, module_machine, 8999)
    assert answer["listening"] is False
    response = httpx.get(str(answer["url"]), timeout=10)
    assert response.status_code == 502
    assert f"cannot reach port 8999 in machine {module_machine}" in response.text
    assert "nothing listens on port 8999" in response.text


def test_bad_ports_and_closing(module_client: TestClient, module_machine: str) -> None:
    base = f"/api/v1/machines/{module_machine}/ports"
    for port in (0, 70000, "x"):
        assert module_client.post(base, json={"port": port}).status_code == 422
    answer = forward(module_client, module_machine, 8998)
    assert module_client.delete(f"{base}/8998").status_code == 204
    assert module_client.delete(f"{base}/8998").status_code == 404
    try:
        httpx.get(str(answer["url"]), timeout=5)
        raise AssertionError("a closed forward still answers")
    except httpx.TransportError:
        pass
