"""Leases in the database: the one place their rows are read and written on the hot path.

Grant, renew, end, expiry and the check before a command are a handful of plain SQL
statements on the driver's own connection (see ``rawsql``); the services above keep the
queueing, who may do what, and what a machine gets between two leases. Every function
takes a ``rawsql.Tx``: one transaction, or one savepoint of a group commit.

A lease row carries the machine's fence at its grant (``fence``) and the SHA-256 of its
secret (``token_hash``), never the secret itself; a remote stage's claim adds its own
secret's hash (``claim_hash``) and the API token that claimed it (``claimed_by``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from controller.store import events
from controller.store.models import LeaseState, MachineState, new_id, utcnow
from controller.store.rawsql import Row, Sql, Tx

# ---------------------------------------------------------------- statements

_POOL_NAMED = Sql("SELECT name FROM pools WHERE name = :pool")
_POOL_NAMES = Sql("SELECT name FROM pools ORDER BY name")
_LEASED_NOW = "SET state = 'leased', fence = fence + 1, updated_at = :now"
_RESET = "CASE WHEN m.reserved_for IS NULL THEN p.reset ELSE 'recreate' END AS reset"
"""A machine's reset policy: its pool's, but an agent's fork is destroyed after its lease."""
_FLIP_RESERVED = Sql(
    f"UPDATE machines {_LEASED_NOW} WHERE id = :candidate AND state = 'ready' "
    "AND reserved_for = :owner RETURNING id, fence, pool"
)
_FLIP_BY_ID = Sql(
    f"UPDATE machines {_LEASED_NOW} WHERE id = :candidate AND state = 'ready' "
    "RETURNING id, fence, pool"
)
_LEASE_COLUMNS = (
    "id, machine_id, pool, holder, owner_token_id, fence, token_hash, state, ttl_s, wait_ms, "
    "requested_at, acquired_at, expires_at, ended_at"
)
_INSERT_LEASE = Sql(
    f"INSERT INTO leases ({_LEASE_COLUMNS}) "
    f"VALUES ({', '.join(':' + name for name in _LEASE_COLUMNS.split(', '))})"
)
_SELECT_LEASE = Sql(f"SELECT {_LEASE_COLUMNS}, reason FROM leases WHERE id = :lease_id")
_END_LEASE = Sql("UPDATE leases SET state = :new_state, ended_at = :now WHERE id = :lease_id")
_RENEW_LEASE = Sql(
    "UPDATE leases SET ttl_s = :new_ttl, expires_at = :new_expiry WHERE id = :lease_id"
)
_MACHINE_AND_POLICY = Sql(
    f"SELECT m.state, m.fence, m.paused_from, {_RESET} FROM machines m "
    "LEFT JOIN pools p ON p.name = m.pool WHERE m.id = :machine_id"
)
_FENCE_OFF = Sql("UPDATE machines SET fence = fence + 1, updated_at = :now WHERE id = :machine_id")
_DUE_LEASES = Sql("SELECT id FROM leases WHERE state = 'active' AND expires_at <= :now")
_ORPHANS = Sql(
    f"SELECT m.id, {_RESET} FROM machines m LEFT JOIN pools p ON p.name = m.pool "
    "WHERE m.state = 'leased' AND m.updated_at < :settled_before AND NOT EXISTS "
    "(SELECT 1 FROM leases l WHERE l.machine_id = m.id AND l.state = 'active')"
)
STATE_AND_FENCE = Sql("SELECT state, fence, reserved_for FROM machines WHERE id = :machine_id")
"""A machine's state, fence and the token it is reserved for (an agent's fork)."""
ACCESS = Sql(
    "SELECT m.state, m.fence, l.id AS lease_id, l.fence AS lease_fence, l.token_hash, "
    "l.owner_token_id, l.claim_hash, l.claimed_by "
    "FROM machines m LEFT JOIN leases l ON l.machine_id = m.id AND l.state = 'active' "
    "WHERE m.id = :machine_id"
)
"""What a command's check needs, in one read: the machine's state and fence and its active
lease's fence, owner, secret hash and claim (NULLs when it has none)."""
_FILTERS = ("pool", "id", "repo")
"""Columns a target may filter on; only these names ever reach the SQL text."""


@functools.cache
def _claim_first(by: tuple[str, ...]) -> Sql:
    """``UPDATE ... WHERE id = (SELECT the longest-ready fitting id)``, per filter set.

    On PostgreSQL the inner select skips rows another transaction is taking
    (``FOR UPDATE SKIP LOCKED``); the outer ``state = 'ready'`` check makes the flip safe
    on both databases.
    """
    return Sql(
        f"UPDATE machines {_LEASED_NOW} WHERE state = 'ready' AND id = "
        f"(SELECT id FROM machines WHERE {_fits(by)} ORDER BY updated_at LIMIT 1 {{skip_locked}}) "
        "RETURNING id, fence, pool"
    )


@functools.cache
def _candidates(by: tuple[str, ...]) -> Sql:
    return Sql(f"SELECT id, labels FROM machines WHERE {_fits(by)} ORDER BY updated_at")


def _fits(by: tuple[str, ...]) -> str:
    assert set(by) <= set(_FILTERS), by
    return " AND ".join(
        ["state = 'ready'", "reserved_for IS NULL", *(f"{c} = :want_{c}" for c in by)]
    )


# ---------------------------------------------------------------- reads


def pool_exists(tx: Tx, pool: str) -> bool:
    return tx.one(_POOL_NAMED, pool=pool) is not None


def pool_names(tx: Tx) -> list[str]:
    return [row["name"] for row in tx.rows(_POOL_NAMES)]


def machine_state(tx: Tx, machine_id: str) -> Row | None:
    """``{state, fence, reserved_for}`` of a machine, or None."""
    return tx.one(STATE_AND_FENCE, machine_id=machine_id)


def access_row(tx: Tx, machine_id: str) -> Row | None:
    """See :data:`ACCESS`; None when there is no such machine."""
    return tx.one(ACCESS, machine_id=machine_id)


def load(tx: Tx, lease_id: str) -> Row | None:
    return tx.one(_SELECT_LEASE, lease_id=lease_id)


def due(tx: Tx, now: datetime) -> list[str]:
    """Active leases past their time."""
    return [row["id"] for row in tx.rows(_DUE_LEASES, now=now)]


def orphans(tx: Tx, *, settled_before: datetime) -> list[Row]:
    """Leased machines that no active lease holds, untouched since ``settled_before``:
    ``{id, reset}``."""
    return tx.rows(_ORPHANS, settled_before=settled_before)


# ---------------------------------------------------------------- writes


def grant(
    tx: Tx,
    *,
    filters: dict[str, str],
    labels_fit: Callable[[dict[str, str]], bool] | None,
    holder: str,
    ttl_s: float,
    owner_token_id: str | None,
    token_hash: str,
    wait_ms: float,
) -> Row | None:
    """Take the longest-ready machine that fits, bump its fence, write the lease (with the
    hash of its secret) and its events; the lease row, or None when nothing fits.

    ``filters`` name columns of :data:`_FILTERS`; ``labels_fit``, when given, is asked
    about each candidate's labels."""
    claimed = _claim(tx, filters, labels_fit)
    if claimed is None:
        return None
    return _write_lease(tx, claimed, holder, ttl_s, owner_token_id, token_hash, wait_ms)


def grant_reserved(
    tx: Tx, *, machine_id: str, owner_token_id: str, holder: str, ttl_s: float, token_hash: str
) -> Row | None:
    """Lease a ready machine reserved for ``owner_token_id`` (an agent's fork) to it; None
    when it is not ready or not reserved for that token. No other grant ever takes it."""
    claimed = tx.one(_FLIP_RESERVED, candidate=machine_id, owner=owner_token_id, now=utcnow())
    if claimed is None:
        return None
    return _write_lease(tx, claimed, holder, ttl_s, owner_token_id, token_hash, 0.0)


def _write_lease(
    tx: Tx,
    claimed: Row,
    holder: str,
    ttl_s: float,
    owner_token_id: str | None,
    token_hash: str,
    wait_ms: float,
) -> Row:
    now = utcnow()
    lease: Row = {
        "id": new_id("l"),
        "machine_id": claimed["id"],
        "pool": claimed["pool"],
        "holder": holder,
        "owner_token_id": owner_token_id,
        "fence": claimed["fence"],
        "token_hash": token_hash,
        "state": LeaseState.active,
        "ttl_s": ttl_s,
        "wait_ms": wait_ms,
        "requested_at": now - timedelta(milliseconds=wait_ms),
        "acquired_at": now,
        "expires_at": now + timedelta(seconds=ttl_s),
        "ended_at": None,
    }
    tx.run(_INSERT_LEASE, **lease)
    events.insert(
        tx,
        events.machine_state(claimed["id"], MachineState.leased, MachineState.ready),
        (
            "lease.granted",
            lease["id"],
            {
                "machine_id": claimed["id"],
                "holder": holder,
                "fence": claimed["fence"],
                "ttl_s": ttl_s,
                "wait_ms": wait_ms,
            },
        ),
    )
    return lease


def _claim(
    tx: Tx, filters: dict[str, str], labels_fit: Callable[[dict[str, str]], bool] | None
) -> Row | None:
    """Flip the longest-ready fitting machine to leased; answer its id, new fence and pool."""
    by = tuple(filters)
    params: dict[str, Any] = {f"want_{column}": value for column, value in filters.items()}
    now = utcnow()
    if labels_fit is None:
        return tx.one(_claim_first(by), now=now, **params)
    for candidate in tx.rows(_candidates(by), **params):
        if labels_fit(candidate["labels"] or {}):
            if row := tx.one(_FLIP_BY_ID, candidate=candidate["id"], now=now):
                return row
    return None


def renew(tx: Tx, lease_id: str, *, ttl_s: float, expires_at: datetime) -> None:
    tx.run(_RENEW_LEASE, lease_id=lease_id, new_ttl=ttl_s, new_expiry=expires_at)
    events.insert(tx, ("lease.renewed", lease_id, {"expires_at": expires_at.isoformat()}))


def end(tx: Tx, lease: Row, state: LeaseState, now: datetime) -> str | None:
    """End the lease and fence its machine off (the lease's secret is stale from now on,
    even once the machine is ready again). Whatever the policy, the machine stays leased
    (by nobody) until its hand-over is done (``services.leases.return_machine``); the answer
    is the machine's reset policy, or None when the lease no longer held the machine."""
    machine_id = lease["machine_id"]
    tx.run(_END_LEASE, lease_id=lease["id"], new_state=state, now=now)
    changes: list[events.Change] = [
        (f"lease.{state.value}", lease["id"], {"machine_id": machine_id, "fence": lease["fence"]})
    ]
    machine = tx.one(_MACHINE_AND_POLICY, machine_id=machine_id)
    paused_leased = (
        machine is not None
        and machine["state"] == MachineState.paused
        and machine["paused_from"] == MachineState.leased
    )
    if machine is not None and paused_leased and machine["fence"] == lease["fence"]:
        # Fenced off now; handed over once resumed (``snapshots.resume_abandoned``).
        tx.run(_FENCE_OFF, machine_id=machine_id, now=now)
        events.insert(tx, *changes)
        return None
    if (
        machine is None
        or machine["state"] != MachineState.leased
        or machine["fence"] != lease["fence"]
    ):
        events.insert(tx, *changes)
        return None
    policy: str = machine["reset"] or "keep"
    tx.run(_FENCE_OFF, machine_id=machine_id, now=now)
    events.insert(tx, *changes)
    return policy
