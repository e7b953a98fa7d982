"""A module-scoped controller with one leased machine and a running run, for evidence tests.

Provisioning is the slow part, so tests in a module share one machine; each test makes its
own run rows, so tests stay independent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from make_repo import make_sample_repo

from controller.api.app import create_app
from controller.settings import Settings
from controller.store.db import make_engine, unit_of_work
from controller.store.models import Role, Run, RunStatus, Stage, StageStatus
from tests.conftest import TEST_LABEL, TEST_RUN_ID
from tests.integration.conftest import issue_token


@dataclass
class EvidenceEnv:
    settings: Settings
    client: TestClient
    """Carries an ops token."""
    tokens: dict[str, str]
    machine_id: str
    lease_token: str
    lease_fence: int
    repo: str

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def make_run(
        self,
        *,
        status: RunStatus = RunStatus.running,
        stage_status: StageStatus = StageStatus.running,
        task: str = "change the title",
        repo: str | None = None,
        stages: tuple[str, ...] = ("plan", "implement", "test", "review", "qa"),
        **extra: Any,
    ) -> str:
        engine = make_engine(self.settings.sqlalchemy_url)
        with unit_of_work(engine) as tx:
            run = Run(
                task=task,
                repo=repo or self.repo,
                status=status,
                machine_id=self.machine_id,
                **extra,
            )
            tx.add(run)
            for position, name in enumerate(stages):
                tx.add(
                    Stage(
                        run_id=run.id,
                        position=position,
                        name=name,
                        agent=name,
                        status=stage_status,
                        attempts=1,
                    )
                )
        engine.dispose()
        return run.id

    def set_status(self, run_id: str, status: RunStatus, stage_status: StageStatus) -> None:
        from sqlmodel import select

        engine = make_engine(self.settings.sqlalchemy_url)
        with unit_of_work(engine) as tx:
            run = tx.get(Run, run_id)
            assert run is not None
            run.status = status
            tx.add(run)
            for stage in tx.exec(select(Stage).where(Stage.run_id == run_id)):
                stage.status = stage_status
                tx.add(stage)
        engine.dispose()


@pytest.fixture(scope="module")
def evidence_env(
    tmp_path_factory: pytest.TempPathFactory, runner_image: str
) -> Iterator[EvidenceEnv]:
    root = tmp_path_factory.mktemp("evidence")
    settings = Settings(
        data_dir=root / "data",
        extra_labels=f"{TEST_LABEL}={TEST_RUN_ID}",
        runner_image=runner_image,
        reconcile_interval_s=0.5,
        orphan_grace_s=0,
        artifact_cap_bytes=256 * 1024,
    )
    repo = make_sample_repo(root / "sample-app")
    with TestClient(create_app(settings, background=False)) as client:
        tokens = {role.value: issue_token(settings, role) for role in Role}
        client.headers["Authorization"] = f"Bearer {tokens['ops']}"
        made = client.post("/api/v1/machines?wait=true", json={"repo": str(repo)})
        assert made.status_code == 201, made.text
        machine = made.json()
        assert machine["state"] == "ready", machine
        lease = client.post(
            "/api/v1/leases",
            json={"machine_id": machine["id"], "holder": "evidence-tests", "ttl_s": 3600},
            headers={"Authorization": f"Bearer {tokens['agent']}"},  # the uploader's lease
        )
        assert lease.status_code == 201, lease.text
        yield EvidenceEnv(
            settings=settings,
            client=client,
            tokens=tokens,
            machine_id=machine["id"],
            lease_token=lease.json()["token"],
            lease_fence=int(lease.json()["fence"]),
            repo=str(repo),
        )
        client.delete(f"/api/v1/machines/{machine['id']}")


__all__ = ["EvidenceEnv", "evidence_env", "Path"]
