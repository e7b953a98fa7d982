"""Learning's reads on a run's path, as plain SQL (see ``rawsql``).

Every stage attempt asks whether its pass closed an open failure signature, and every run
starts by reading its repo's known flaky tests and lessons. Almost always the answer is
"nothing", and through the ORM even that answer cost a busy controller 1-3 ms of its one
interpreter per attempt: more than the 5 % of a stage learning may take. The writes (a
failure's signature, a fix, a quarantine) are rare and stay in the services' ORM sessions.

Each function takes a ``rawsql.Tx`` and answers model instances (not attached to any
session), so the services above keep one shape whichever way a row was read.
"""

from __future__ import annotations

from controller.store.models import CaseStats, FailureSignature
from controller.store.rawsql import Sql, Tx

_OPEN = "(fixed_at IS NULL OR last_seen > fixed_at)"
"""A signature is open until a fix, and again when it recurs after that
(``FailureSignature.open``)."""

_OPEN_ELSEWHERE = Sql(
    f"SELECT id FROM signatures WHERE repo = :repo AND stage = :stage AND {_OPEN} "
    "AND signature NOT IN (SELECT signature FROM signature_hits "
    "WHERE run_id = :run_id AND stage = :stage)"
)
_REPO_SIGNATURES = Sql(
    "SELECT * FROM signatures WHERE repo = :repo ORDER BY count DESC, last_seen DESC LIMIT :limit"
)
_NONDETERMINISTIC = Sql(
    "SELECT * FROM test_stats WHERE repo = :repo AND (same_tree OR retry_passes > 0) ORDER BY test"
)


def open_elsewhere(tx: Tx, *, repo: str, stage: str, run_id: str) -> list[int]:
    """Ids of the repo's open signatures of ``stage`` that ``run_id`` did not hit itself."""
    return [row["id"] for row in tx.rows(_OPEN_ELSEWHERE, repo=repo, stage=stage, run_id=run_id)]


def repo_signatures(tx: Tx, *, repo: str, limit: int) -> list[FailureSignature]:
    """The repo's signatures, open or fixed, most frequent first."""
    return [FailureSignature(**row) for row in tx.rows(_REPO_SIGNATURES, repo=repo, limit=limit)]


def nondeterministic_tests(tx: Tx, *, repo: str) -> list[CaseStats]:
    """The repo's tests ever seen both passing and failing on one tree, or passing on a
    rerun: the only ones that can be flaky."""
    return [
        CaseStats(**{**row, "same_tree": bool(row["same_tree"])})
        for row in tx.rows(_NONDETERMINISTIC, repo=repo)
    ]
