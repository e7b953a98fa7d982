"""Verdicts: a reviewer approves or rejects a finished run, once."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller.api.deps import AnyRole, Reviewer, SessionDep
from controller.api.schemas import VerdictBody, VerdictPublic
from evidence import verdicts

router = APIRouter(tags=["verdicts"])


def public(session: SessionDep, run_id: str) -> VerdictPublic:
    verdict = verdicts.get_verdict(session, run_id)
    state, closed = verdicts.closed_for(session, [run_id])[run_id]
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
    run_id: str, body: VerdictBody, session: SessionDep, reviewer: Reviewer
) -> VerdictPublic:
    verdicts.give_verdict(
        session=session,
        run_id=run_id,
        decision=body.decision,
        comment=body.comment,
        reviewer=reviewer,
    )
    return public(session, run_id)


@router.get("/runs/{run_id}/verdict")
def show_verdict(run_id: str, session: SessionDep, _: AnyRole) -> VerdictPublic:
    verdicts.require_run(session, run_id)
    return public(session, run_id)
