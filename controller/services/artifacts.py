"""Evidence over the API: uploads under a run's lease, reads, and pins. One transaction each.

The store itself (blobs by content hash, what an artifact means) is ``evidence/store.py``.
"""

from __future__ import annotations

from typing import Any

from controller.errors import Conflict, NotFound
from controller.services import access, machines, runs
from controller.services.runtime import Controller
from controller.store.db import unit_of_work
from controller.store.models import FINISHED_RUN_STATUSES, Artifact, Run
from evidence import retention
from evidence.store import ArtifactStore, get_artifact, list_artifacts, save_artifact


def upload(
    *,
    ctl: Controller,
    run_id: str,
    stage: str,
    key: access.Key,
    kind: str,
    name: str,
    data: bytes,
    content_type: str | None,
    attempt: int | None,
    commit: str | None,
    meta: dict[str, Any],
) -> Artifact:
    """Save an artifact of a running run's stage, from the holder of the run's lease (or
    of a claim on its remote stage), with its secret in ``key``; or from ops.

    ``attempt`` defaults to the stage's current attempt, ``commit`` to the machine's. Its
    span joins the run's trace (``tracing.Tracing.span``).
    """
    attributes = {
        "run.id": run_id,
        "stage.name": stage,
        "stage.attempt": attempt,
        "artifact.kind": kind,
        "artifact.name": name,
        "artifact.bytes": len(data),
    }
    with ctl.tracing.span("evidence.upload", attributes, run_id=run_id), unit_of_work(ctl.db) as tx:
        run = tx.get(Run, run_id)
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        stage_row = runs.get_stage(tx, run.id, stage)
        machine = machines.get_machine(tx, _check_lease(run, key))
        access.check_machine(tx, machine, key)
        return save_artifact(
            tx=tx,
            store=ArtifactStore.from_settings(ctl.settings),
            run_id=run_id,
            stage=stage,
            attempt=attempt if attempt is not None else max(stage_row.attempts, 1),
            machine_id=machine.id,
            commit=commit or machine.commit,
            kind=kind,
            name=name,
            data=data,
            content_type=content_type,
            meta=meta,
        )


def _check_lease(run: Run, key: access.Key) -> str:
    if run.status in FINISHED_RUN_STATUSES:
        raise Conflict(f"run {run.id} has finished ({run.status.value}); its evidence is sealed")
    if run.machine_id is None:
        raise Conflict(f"run {run.id} has no machine yet; upload once its stage is running")
    if key.secret is None:
        raise Conflict(
            f"send the lease token of machine {run.machine_id} in X-Lease-Token",
            machine_id=run.machine_id,
        )
    return run.machine_id


def show_artifact(*, ctl: Controller, artifact_id: str) -> Artifact:
    with unit_of_work(ctl.reader) as tx:
        return get_artifact(tx, artifact_id)


def find_artifact(*, ctl: Controller, artifact_id: str) -> tuple[Artifact | None, Run | None]:
    """The artifact and its run, or None where there is none (the gallery's pages)."""
    with unit_of_work(ctl.reader) as tx:
        artifact = tx.get(Artifact, artifact_id)
        return artifact, tx.get(Run, artifact.run_id) if artifact else None


def run_artifacts(*, ctl: Controller, run_id: str) -> list[Artifact]:
    with unit_of_work(ctl.reader) as tx:
        if tx.get(Run, run_id) is None:
            raise NotFound(f"run {run_id} does not exist")
        return list_artifacts(tx, run_id)


def pin_run(*, ctl: Controller, run_id: str) -> None:
    """Keep this run's evidence whatever the retention limits say."""
    with unit_of_work(ctl.db) as tx:
        if tx.get(Run, run_id) is None:
            raise NotFound(f"run {run_id} does not exist")
        retention.pin_run(tx=tx, run_id=run_id)


def unpin_run(*, ctl: Controller, run_id: str) -> None:
    with unit_of_work(ctl.db) as tx:
        retention.unpin_run(tx=tx, run_id=run_id)
