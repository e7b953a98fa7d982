"""Verdicts over the API and the gallery: a reviewer approves or rejects a finished run, once.

The rules live in ``evidence/verdicts.py``; here each call is one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from controller.services import owners
from controller.services.runtime import Controller
from controller.store.db import unit_of_work
from controller.store.models import ApiToken, Verdict
from evidence import verdicts


@dataclass(frozen=True)
class VerdictView:
    run_id: str
    state: verdicts.VerdictState
    closed: bool
    verdict: Verdict | None
    checklist: list[verdicts.Criterion]


def give_verdict(
    *, ctl: Controller, run_id: str, decision: str, comment: str, reviewer: ApiToken
) -> VerdictView:
    with unit_of_work(ctl.db) as tx:
        verdicts.give_verdict(
            tx=tx, run_id=run_id, decision=decision, comment=comment, reviewer=reviewer
        )
        owners.verdict_given_in(tx, run_id=run_id)
        return _view(tx, run_id)


def show_verdict(*, ctl: Controller, run_id: str) -> VerdictView:
    with unit_of_work(ctl.reader) as tx:
        verdicts.require_run(tx, run_id)
        return _view(tx, run_id)


def _view(tx: Session, run_id: str) -> VerdictView:
    checked = verdicts.verification_for(tx, [run_id])[run_id]
    return VerdictView(
        run_id, checked.state, checked.closed, verdicts.get_verdict(tx, run_id), checked.checklist
    )
