"""Verdicts: a reviewer approves or rejects a finished run, once."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller.api.deps import AnyRole, Reviewer, SessionDep
from controller.api.schemas import VerdictBody, VerdictPublic
from evidence import verdicts

router = APIRouter(tags=["verdicts"])


def public(tx: SessionDep, run_id: str) -> VerdictPublic:
    verdict = verdicts.get_verdict(tx, run_id)
    state, closed = verdicts.closed_for(tx, [run_id])[run_id]
    return VerdictPublic(
        run_id=run_id,
        verdict=state.value,
        comment=verdict.comment if verdict else "",
        reviewer=(verdict.reviewer_name or verdict.reviewer_token_id) if verdict else "",
        created_at=verdict.created_at if verdict else None,
        closed=closed,
    )


@router.post("/runs/{run_id}/verdict", status_code=status.HTTP_201_CREATED)
def give_verdict(
    run_id: str, body: VerdictBody, tx: SessionDep, reviewer: Reviewer
) -> VerdictPublic:
    verdicts.give_verdict(
        tx=tx,
        run_id=run_id,
        decision=body.decision,
        comment=body.comment,
        reviewer=reviewer,
    )
    return public(tx, run_id)


@router.get("/runs/{run_id}/verdict")
def show_verdict(run_id: str, tx: SessionDep, _: AnyRole) -> VerdictPublic:
    verdicts.require_run(tx, run_id)
    return public(tx, run_id)
