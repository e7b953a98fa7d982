"""Gallery server time with 10,000 artifacts in the store (goal: <= 100 ms per page).

Seeds a temporary controller through the store service (200 runs x 25 artifacts plus one
run with 5,000), serves it with uvicorn on loopback, signs in as a reviewer and times the
runs list, a typical run page and the 5,000-artifact run page, each against GET /healthz
measured in the same run.
"""

from __future__ import annotations

import io
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from controller.api.app import create_app
from controller.services import auth
from controller.settings import Settings
from controller.store.db import make_engine, unit_of_work
from controller.store.models import Role, Run, RunStatus, Stage, StageStatus, utcnow
from evidence.store import ArtifactStore, save_artifact

RUNS = 200
PER_RUN = 25
BIG_RUN = 5_000
REQUESTS = 40
GOAL_MS = 100.0
JUNIT = (
    b'<testsuite name="t"><testcase classname="c" name="ok"/>'
    b'<testcase classname="c" name="bad"><failure message="boom">trace</failure></testcase>'
    b"</testsuite>"
)


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 200), (seed % 256, 80, 160)).save(out, format="PNG")
    return out.getvalue()


def seed(settings: Settings) -> tuple[str, str, str]:
    engine = make_engine(settings.sqlalchemy_url)
    store = ArtifactStore.from_settings(settings)
    with unit_of_work(engine) as tx:
        token = auth.create_token(tx=tx, role=Role.reviewer, name="bench")
    run_ids: list[str] = []
    for number in range(RUNS + 1):
        count = BIG_RUN if number == RUNS else PER_RUN
        with unit_of_work(engine) as tx:
            run = Run(
                task=f"bench change {number}",
                repo=f"/repos/app{number % 5}",
                status=RunStatus.passed,
                finished_at=utcnow(),
            )
            tx.add(run)
            for position, name in enumerate(("plan", "implement", "test", "review", "qa")):
                tx.add(
                    Stage(
                        run_id=run.id,
                        position=position,
                        name=name,
                        agent=name,
                        status=StageStatus.passed,
                        attempts=1,
                    )
                )
            tx.flush()
            for index in range(count):
                kind, name, data = artifact(number, index)
                save_artifact(
                    tx=tx,
                    store=store,
                    run_id=run.id,
                    stage="test",
                    attempt=1,
                    machine_id="m-bench",
                    commit="f" * 40,
                    kind=kind,
                    name=name,
                    data=data,
                    meta={"page": f"/p{index % 4}"},
                )
            run_ids.append(run.id)
    engine.dispose()
    return token, run_ids[RUNS // 2], run_ids[RUNS]


def artifact(run: int, index: int) -> tuple[str, str, bytes]:
    if index == 0:
        return "junit", "junit.xml", JUNIT
    if index == 1:
        return "plan", "plan.md", b"# plan\n1. do it\n"
    if index == 2:
        return "diff", "change.diff", b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"
    if index < 7:
        return "screenshot", f"shot{index}.png", png(run * 7 + index)
    data = f"run {run} artifact {index}\nline two\nFAILED something {index}\n".encode()
    return "log", f"logs/{index}.log", data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(client: httpx.Client, path: str) -> list[float]:
    client.get(path).raise_for_status()  # warm
    times = []
    for _ in range(REQUESTS):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return times


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        app = create_app(settings, background=False)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            started = time.perf_counter()
            token, typical, big = seed(settings)
            total = RUNS * PER_RUN + BIG_RUN
            sys.stdout.write(
                f"seeded {total} artifacts in {RUNS + 1} runs through the store "
                f"in {time.perf_counter() - started:.1f} s\n"
            )
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                login = client.post("/gallery/login", data={"token": token})
                assert login.status_code == 303, login.text
                baseline = statistics.median(timed(client, "/healthz"))
                results = {
                    "runs list (50 newest)": timed(client, "/gallery/runs"),
                    "runs list, filtered": timed(
                        client, "/gallery/runs?repo=/repos/app3&verdict=pending"
                    ),
                    f"run page ({PER_RUN} artifacts)": timed(client, f"/gallery/runs/{typical}"),
                    f"run page ({BIG_RUN} artifacts)": timed(client, f"/gallery/runs/{big}"),
                }
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    sys.stdout.write(f"GET /healthz p50 {baseline:.2f} ms (baseline)\n")
    worst = 0.0
    for name, times in results.items():
        p50 = statistics.median(times)
        p95 = sorted(times)[int(len(times) * 0.95) - 1]
        worst = max(worst, p50)
        sys.stdout.write(
            f"{name:32s} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  {p50 / baseline:5.1f}x healthz\n"
        )
    verdict = "meets" if worst <= GOAL_MS else "MISSES"
    sys.stdout.write(f"goal <= {GOAL_MS:.0f} ms per page: {verdict} (worst p50 {worst:.1f} ms)\n")
    return 0 if worst <= GOAL_MS else 1


if __name__ == "__main__":
    sys.exit(main())
