"""Verdicts: a reviewer approves or rejects a finished run, once."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, status

from controller.api.deps import AnyRole, Ctl, Reviewer
from controller.api.schemas import CriterionPublic, VerdictBody, VerdictPublic
from controller.services import verdicts

router = APIRouter(tags=["verdicts"])


def public(view: verdicts.VerdictView) -> VerdictPublic:
    verdict = view.verdict
    return VerdictPublic(
        run_id=view.run_id,
        verdict=view.state.value,
        comment=verdict.comment if verdict else "",
        reviewer=(verdict.reviewer_name or verdict.reviewer_token_id) if verdict else "",
        created_at=verdict.created_at if verdict else None,
        closed=view.closed,
        open=[CriterionPublic(**asdict(c)) for c in view.checklist if c.met is False],
    )


@router.post("/runs/{run_id}/verdict", status_code=status.HTTP_201_CREATED)
def give_verdict(run_id: str, body: VerdictBody, ctl: Ctl, reviewer: Reviewer) -> VerdictPublic:
    view = verdicts.give_verdict(
        ctl=ctl,
        run_id=run_id,
        decision=body.decision,
        comment=body.comment,
        reviewer=reviewer,
    )
    return public(view)


@router.get("/runs/{run_id}/verdict")
def show_verdict(run_id: str, ctl: Ctl, _: AnyRole) -> VerdictPublic:
    return public(verdicts.show_verdict(ctl=ctl, run_id=run_id))
