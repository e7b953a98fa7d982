"""`make demo`: a controller on the embedded defaults, the sample repo through the factory.

It provisions a machine from examples/sample-app and runs a command in it, then submits a
run that takes the same repo through plan, implement, test, review and QA on one machine,
and prints where the API, its docs and the run's page in the gallery are.

Everything lives in .demo/ (SQLite database, keys, evidence, the sample repo, the log);
the controller keeps running after the demo so you can use the API, the docs and the
gallery. `make stop` stops it; its machines live on, as machines do, until `make clean`
(``--clean``) removes them with .demo/.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from make_repo import SAMPLE_CHANGE_STAGES, make_sample_repo  # noqa: E402

from controller.providers.disks import unmount_under  # noqa: E402
from controller.providers.docker import DockerProvider  # noqa: E402

DEMO = ROOT / ".demo"
DATA = DEMO / "data"
PIDFILE = DEMO / "controller.pid"
LOG = DEMO / "controller.log"
PORT = int(os.environ.get("SHOPFLOOR_DEMO_PORT", "8765"))
URL = f"http://127.0.0.1:{PORT}"
DEMO_LABEL = "shopfloor.demo"
DEMO_ID = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
"""``DEMO_LABEL=DEMO_ID`` is on everything this checkout's demo controller makes: `make
clean` removes that, and never another checkout's machines."""
console = Console()


def stop() -> None:
    if not PIDFILE.exists():
        return
    pid = int(PIDFILE.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    except ProcessLookupError:
        pass
    PIDFILE.unlink(missing_ok=True)
    console.print(f"stopped the demo controller (pid {pid})")


def clean() -> None:
    """Stop the controller and remove what its machines left: containers, volumes, snapshot
    images, and the disks mounted under .demo/ (which `rm -rf` could not remove)."""
    stop()
    engine = DockerProvider(None)
    try:
        machines = engine.remove_labelled({DEMO_LABEL: DEMO_ID})
    finally:
        engine.close()
    unmount_under(DATA)
    console.print(f"removed the demo's {machines} machine(s)")


def shopfloor(*args: str) -> str:
    env = {**os.environ, "SHOPFLOOR_DATA_DIR": str(DATA)}
    done = subprocess.run(
        [str(ROOT / ".venv/bin/shopfloor"), *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def start_controller() -> None:
    DEMO.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "SHOPFLOOR_DATA_DIR": str(DATA),
        "SHOPFLOOR_EXTRA_LABELS": f"{DEMO_LABEL}={DEMO_ID}",
    }
    with LOG.open("ab") as log:
        process = subprocess.Popen(
            [
                str(ROOT / ".venv/bin/shopfloor"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(PORT),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    PIDFILE.write_text(str(process.pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the controller exited; see {LOG}")
        try:
            if httpx.get(f"{URL}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"the controller did not answer in 60 s; see {LOG}")


def api(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    response = client.request(method, f"/api/v1{path}", **kwargs)
    if response.status_code >= 400:
        raise SystemExit(f"{method} {path}: {response.status_code} {response.text}")
    return response.json()


def put_change_through_the_factory(client: httpx.Client, repo: Path) -> dict[str, Any]:
    body = {"task": "Say who builds the page", "repo": str(repo), "stages": SAMPLE_CHANGE_STAGES}
    run = api(client, "POST", "/runs", json=body)
    deadline = time.monotonic() + 600
    with console.status("run: plan, implement, test, review, qa on one machine") as status:
        while run["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
            run = api(client, "GET", f"/runs/{run['id']}")
            current = [s["name"] for s in run["stages"] if s["status"] == "running"]
            status.update(f"run {run['id']}: {run['status']} {' '.join(current)}")
    for stage in run["stages"]:
        console.print(
            f"  {stage['name']:<10} {stage['status']:<8} {stage.get('summary') or ''}", markup=False
        )
    console.print(
        f"run [bold]{run['id']}[/bold]: {run['status']} on machine {run.get('machine_id')}"
    )
    if run["status"] != "passed":
        raise SystemExit(f"the run did not pass; see {URL}/gallery/runs/{run['id']}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stop", action="store_true", help="stop the demo controller")
    parser.add_argument("--clean", action="store_true", help="stop it and remove its machines")
    args = parser.parse_args()
    if args.clean:
        clean()
        return
    if args.stop:
        stop()
        return
    stop()
    repo = make_sample_repo(DEMO / "sample-app")
    token = shopfloor("token", "create", "--role", "ops", "--name", "demo").split()[-1]
    with console.status("starting the controller"):
        start_controller()
    console.print(f"controller up at {URL} (log: {LOG})")

    client = httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {token}"}, timeout=600)
    for old in api(client, "GET", "/machines", params={"label": "demo=yes"})["data"]:
        api(client, "DELETE", f"/machines/{old['id']}")  # the machine of an earlier demo
    body = {"repo": str(repo), "setup": ["python3 -m compileall -q ."], "labels": {"demo": "yes"}}
    with console.status("provisioning a machine from examples/sample-app"):
        machine = api(client, "POST", "/machines?wait=true", json=body)
    if machine["state"] != "ready":
        raise SystemExit(f"machine {machine['id']} failed: {machine['reason']}")
    console.print(f"machine [bold]{machine['id']}[/bold] ready at commit {machine['commit'][:12]}")

    result = api(
        client,
        "POST",
        f"/machines/{machine['id']}/exec",
        json={"cmd": "git log --oneline -1 && python3 -m unittest -v 2>&1"},
    )
    console.print(
        f"$ python3 -m unittest -v   (exit {result['exit_code']}, {result['duration_ms']:.0f} ms)"
    )
    console.print(result["stdout"].rstrip(), markup=False)

    run = put_change_through_the_factory(client, repo)
    reviewer = shopfloor("token", "create", "--role", "reviewer", "--name", "demo").split()[-1]

    console.rule("Shopfloor is running")
    console.print(f"API:      {URL}/api/v1   (token: {token})")
    console.print(f"API docs: {URL}/docs")
    console.print(
        f"CLI:      SHOPFLOOR_URL={URL} SHOPFLOOR_TOKEN={token} .venv/bin/shopfloor machines ls"
    )
    console.print(f"Gallery:  {URL}/gallery/runs/{run['id']}   (sign in with: {reviewer})")
    console.print("Stop it:  make stop")


if __name__ == "__main__":
    main()
