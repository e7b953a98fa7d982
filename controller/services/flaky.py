"""Flaky tests: what the JUnit history says of each test of a repo, and the rules that
turn it into a state.

The history (``evidence/test_history.py``) keeps per repo and test how often it passed and
failed, on clean trees (a known commit with no change in the checkout) and on the tester's
rerun. From it:

- **score**: the posterior of its failure probability on an unchanged tree, a Beta(1, 1)
  prior updated with its passes and failures on clean trees — the mean, and the 95 % upper
  credible bound (so three results say less than three hundred);
- **state**, in this order:
  ``broken`` — it failed its last ``BROKEN_STREAK`` results in a row without one pass (a
  deterministic failure is never flaky, whatever it did before), or it failed last and
  nothing ever showed it nondeterministic;
  ``flaky`` — it both passed and failed on one clean tree, or passed on the tester's rerun
  (``quarantined`` instead when the repo's ``[verify] flaky = "quarantine"`` and learning is
  on: with ``SHOPFLOOR_LEARNING=false`` the history is still kept, but nothing acts on it);
  ``healthy`` — otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sqlmodel import Session, col, select

from controller.domain import CaseHealth, TestState
from controller.errors import InvalidInput
from controller.services.runtime import Controller
from controller.store import learning as learning_rows
from controller.store.db import unit_of_work
from controller.store.models import CaseStats, Run
from controller.store.rawsql import transaction

BROKEN_STREAK = 5
"""Failures in a row that make a test ``broken`` even if it was seen flaky before: a test
failing a fifth of the time does that once in 3,000 tries."""
CREDIBLE = 0.95
STATES: tuple[TestState, ...] = ("healthy", "flaky", "broken", "quarantined")
LIST_CAP = 10_000


def score(failures: int, passes: int) -> tuple[float, float]:
    """Posterior mean and upper credible bound of the failure probability, Beta(1, 1) prior."""
    a, b = failures + 1, passes + 1
    return a / (a + b), beta_quantile(CREDIBLE, a, b)


def classify(
    *,
    same_tree: bool,
    retry_passes: int,
    fail_streak: int,
    last_status: str,
    quarantine: bool,
) -> TestState:
    """The state rules (module docstring)."""
    failing = last_status in ("failed", "error") and fail_streak > 0
    nondeterministic = same_tree or retry_passes > 0
    if fail_streak >= BROKEN_STREAK or (failing and not nondeterministic):
        return "broken"
    if nondeterministic:
        return "quarantined" if quarantine else "flaky"
    return "healthy"


def health(stats: CaseStats, *, quarantine: bool) -> CaseHealth:
    mean, upper = score(stats.clean_failures, stats.clean_passes)
    state = classify(
        same_tree=stats.same_tree,
        retry_passes=stats.retry_passes,
        fail_streak=stats.fail_streak,
        last_status=stats.last_status,
        quarantine=quarantine,
    )
    return CaseHealth(
        **stats.model_dump(), state=state, score=round(mean, 4), score_upper=round(upper, 4)
    )


def list_tests(
    *, ctl: Controller, repo: str | None = None, state: str | None = None, limit: int = 1000
) -> list[CaseHealth]:
    """The tests the history knows (of one repo, in one state), most recently seen first."""
    if state is not None and state not in STATES:
        raise InvalidInput(f"state must be one of {', '.join(STATES)}, got {state!r}")
    with unit_of_work(ctl.reader) as tx:
        query = select(CaseStats).order_by(col(CaseStats.last_seen).desc(), col(CaseStats.test))
        if repo is not None:
            query = query.where(CaseStats.repo == repo)
        found: list[CaseHealth] = []
        policies: dict[str, bool] = {}
        for stats in tx.exec(query):
            if stats.repo not in policies:
                policies[stats.repo] = ctl.settings.learning and quarantines(tx, stats.repo)
            item = health(stats, quarantine=policies[stats.repo])
            if state is None or item.state == state:
                found.append(item)
                if len(found) >= min(limit, LIST_CAP):
                    break
        return found


def known_flaky(*, ctl: Controller, repo: str, quarantine: bool | None = None) -> list[CaseHealth]:
    """The repo's flaky and quarantined tests (for the tester and the lessons file).

    ``quarantine`` overrides the repo's policy (a run passes its own); None: the policy of
    the repo's latest run that read one. With learning off nothing is quarantined."""
    if quarantine is None:
        with unit_of_work(ctl.reader) as tx:
            quarantine = quarantines(tx, repo)
    quarantine = quarantine and ctl.settings.learning
    with transaction(ctl.reader, write=False) as raw:
        found = learning_rows.nondeterministic_tests(raw, repo=repo)
    out = [health(stats, quarantine=quarantine) for stats in found]
    return [t for t in out if t.state in ("flaky", "quarantined")]


def quarantines(tx: Session, repo: str) -> bool:
    """Whether the repo says ``[verify] flaky = "quarantine"`` (its latest run that read it)."""
    policy = tx.exec(
        select(Run.policy)
        .where(Run.repo == repo, col(Run.policy).is_not(None))
        .order_by(col(Run.created_at).desc())
        .limit(1)
    ).first()
    return policy_quarantines(policy)


def policy_quarantines(policy: Mapping[str, Any] | None) -> bool:
    verify = (policy or {}).get("verify") or {}
    return isinstance(verify, dict) and verify.get("flaky") == "quarantine"


# ---------------------------------------------------------------- the Beta distribution


def beta_quantile(q: float, a: float, b: float) -> float:
    """x with I_x(a, b) = q, by bisection on the regularized incomplete beta function."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta_cdf(x: float, a: float, b: float) -> float:
    """I_x(a, b), by its continued fraction (Numerical Recipes' betacf, Lentz's method)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(x, a, b) / a
    return 1.0 - front * _betacf(1.0 - x, b, a) / b


def _betacf(x: float, a: float, b: float) -> float:
    tiny, eps = 1e-300, 1e-12
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h
