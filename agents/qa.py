"""``qa``: starts the app in the machine, forwards its port, screenshots the listed pages.

Each page becomes a screenshot artifact whose meta carries the HTTP status, console errors
and failed requests. A page that answers 5xx or never loads fails the stage with its
reason; so does an app that never listens. The app is stopped at the end.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

from agents import config
from agents.base import Artifact, Assignment, StageResult
from agents.reviewer import TEXT
from evidence.capture import PageShot, capture_pages

Capture = Callable[..., list[PageShot]]

# setsid makes the app a process group of its own, so stopping it stops its children too.
_START = (
    "mkdir -p {context} && cd {workdir} || exit 1; "
    "setsid nohup bash -c {serve} >{log} 2>&1 </dev/null & echo $!"
)
_WAIT = (
    "for i in $(seq {tries}); do "
    "(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0; "
    "kill -0 {pid} 2>/dev/null || exit 3; sleep 0.2; done; exit 4"
)


class QaAgent:
    name = "qa"

    def __init__(self, capture: Capture = capture_pages) -> None:
        self.capture = capture

    def run(self, work: Assignment) -> StageResult:
        cfg = config.load(work.machine.read_file, work.machine.workdir, work.params)
        missing = [key for key in ("serve", "port") if getattr(cfg, key) in (None, "")]
        if missing or not cfg.pages:
            need = ", ".join([*missing, *([] if cfg.pages else ["pages"])])
            return StageResult(
                "failed", f"qa needs {need} in .shopfloor.toml or the stage's 'with' block"
            )
        assert cfg.serve is not None
        assert cfg.port is not None
        log_path = f"{work.handoff_dir}/qa-serve.log"
        started = work.machine.run(
            _START.format(
                context=shlex.quote(work.handoff_dir),
                workdir=shlex.quote(work.machine.workdir),
                serve=shlex.quote(cfg.serve),
                log=shlex.quote(log_path),
            ),
            env={"PORT": str(cfg.port)},
            timeout_s=60,
        )
        pid = (
            started.stdout.strip().splitlines()[-1] if started.ok and started.stdout.strip() else ""
        )
        if not pid.isdigit():
            return StageResult("failed", f"could not start {cfg.serve!r}: {started.stderr.strip()}")
        try:
            return self._check(work, cfg, int(pid), log_path)
        finally:
            work.machine.run(f"kill -TERM -- -{pid} 2>/dev/null; true", timeout_s=30)

    def _check(
        self, work: Assignment, cfg: config.RepoConfig, pid: int, log_path: str
    ) -> StageResult:
        assert cfg.port is not None
        tries = max(1, int(cfg.ready_timeout_s / 0.2))
        waited = work.machine.run(
            _WAIT.format(tries=tries, port=cfg.port, pid=pid), timeout_s=cfg.ready_timeout_s + 30
        )
        if not waited.ok:
            log = self._serve_log(work, log_path)
            why = (
                "exited before it listened"
                if waited.exit_code == 3
                else f"did not listen on port {cfg.port} within {cfg.ready_timeout_s:g}s"
            )
            return StageResult(
                "failed",
                f"the app ({cfg.serve!r}) {why}",
                outputs={"port": cfg.port},
                artifacts=[Artifact("log", "qa-serve.log", log, TEXT)],
            )
        url = work.machine.forward(cfg.port)
        work.log(f"app listens on {cfg.port}, forwarded to {url}")
        shots = self.capture(url, cfg.pages, timeout_s=cfg.page_timeout_s)
        artifacts = [
            Artifact("screenshot", _name(shot.page), shot.png, "image/png", shot.meta())
            for shot in shots
            if shot.png
        ]
        artifacts.append(Artifact("log", "qa-serve.log", self._serve_log(work, log_path), TEXT))
        failures = [f"{shot.page}: {shot.reason}" for shot in shots if not shot.ok]
        outputs = {"url": url, "pages": [shot.meta() for shot in shots], "failures": failures}
        if failures:
            return StageResult("failed", "pages failed: " + "; ".join(failures), outputs, artifacts)
        noisy = sum(len(s.console_errors) for s in shots)
        return StageResult(
            "passed",
            f"{len(shots)} page(s) captured" + (f", {noisy} console error(s)" if noisy else ""),
            outputs,
            artifacts,
        )

    @staticmethod
    def _serve_log(work: Assignment, log_path: str) -> bytes:
        try:
            return work.machine.read_file(log_path)[-65536:]
        except Exception:  # noqa: BLE001 - a missing log is not worth failing over
            return b""


def _name(page: str) -> str:
    slug = page.strip("/").replace("/", "_") or "index"
    return f"{slug}.png"
