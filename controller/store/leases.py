"""Leases in the database: the one place their rows are read and written on the hot path.

Grant, renew, end, expiry and the check before a command are a handful of plain SQL
statements on the driver's own connection (see ``rawsql``); the services above keep the
queueing, who may do what, and what a machine gets between two leases. Every function
takes a ``rawsql.Tx``: one transaction, or one savepoint of a group commit.

From the event loop the hot paths go through a :class:`LeaseLane`: on SQLite a group commit
of these same functions (``rawsql.GroupCommit``); on PostgreSQL a grant is one statement, a
release or renew a read and one conditional statement, on the loop's own connections
(``rawsql.LoopConnections``, which commits the statements that arrive together as one).
Both keep the same rows and events.

A lease row carries the machine's fence at its grant (``fence``) and the SHA-256 of its
secret (``token_hash``), never the secret itself; a remote stage's claim adds its own
secret's hash (``claim_hash``) and the API token that claimed it (``claimed_by``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from controller.errors import Conflict
from controller.store import events
from controller.store.models import LeaseState, MachineState, new_id, utcnow
from controller.store.rawsql import GroupCommit, LoopConnections, Row, Sql, Tx

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
_END_LEASE = Sql(
    "UPDATE leases SET state = :new_state, ended_at = :now WHERE id = :lease_id "
    "AND state = 'active'"
)
_RENEW_LEASE = Sql(
    "UPDATE leases SET ttl_s = :new_ttl, expires_at = :new_expiry WHERE id = :lease_id"
)
_MACHINE_AND_POLICY = Sql(
    f"SELECT m.state, m.fence, m.paused_from, {_RESET} FROM machines m "
    "LEFT JOIN pools p ON p.name = m.pool WHERE m.id = :machine_id"
)
_FENCE_OFF = Sql("UPDATE machines SET fence = fence + 1, updated_at = :now WHERE id = :machine_id")
_DUE_LEASES = Sql("SELECT id FROM leases WHERE state = 'active' AND expires_at <= :now")
_UNHELD = "NOT EXISTS (SELECT 1 FROM leases l WHERE l.machine_id = m.id AND l.state = 'active')"
"""No active lease holds the machine ``m``."""
_ORPHANS = Sql(
    f"SELECT m.id, {_RESET} FROM machines m LEFT JOIN pools p ON p.name = m.pool "
    f"WHERE m.state = 'leased' AND m.updated_at < :settled_before AND {_UNHELD}"
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
_COMING_BACK = Sql(
    f"SELECT m.state, m.container_name, {_UNHELD} AS unheld FROM machines m "
    "WHERE m.id = :machine_id"
)
_SETTLE = Sql(
    "UPDATE machines AS m SET state = :state, reason = :reason, updated_at = :now, "
    "ready_at = CASE WHEN :becomes_ready THEN COALESCE(m.ready_at, :now) ELSE m.ready_at END "
    f"WHERE m.id = :machine_id AND m.state = 'leased' AND {_UNHELD}"
)
_FILTERS = ("pool", "id", "repo")
"""Columns a target may filter on; only these names ever reach the SQL text."""


@functools.cache
def _claim_first(by: tuple[str, ...]) -> Sql:
    """``UPDATE ... WHERE id = (SELECT the longest-ready fitting id)``, per filter set.

    On PostgreSQL the inner select skips rows another transaction is taking
    (``FOR UPDATE SKIP LOCKED``); the outer ``state = 'ready'`` check makes the flip safe
    on both databases.
    """
    return Sql(_claim_text(by))


def _claim_text(by: tuple[str, ...]) -> str:
    return (
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


def coming_back(tx: Tx, machine_id: str) -> Row | None:
    """A machine whose lease ended, as its hand-over needs it: ``{state, container_name,
    unheld}`` (``unheld``: no active lease holds it), or None."""
    return tx.one(_COMING_BACK, machine_id=machine_id)


# ---------------------------------------------------------------- writes


def settle(
    tx: Tx,
    machine_id: str,
    state: MachineState,
    reason: str | None = None,
    *,
    also: tuple[events.Change, ...] = (),
) -> bool:
    """Move a machine that is leased by nobody to ``state`` (after its hand-over), with its
    event; whether it moved. ``also``: events written either way (what the hand-over did)."""
    moved = tx.run(
        _SETTLE,
        machine_id=machine_id,
        state=state,
        reason=reason,
        now=utcnow(),
        becomes_ready=state == MachineState.ready,
    )
    if moved:
        also += (events.machine_state(machine_id, state, MachineState.leased, reason),)
    if also:
        events.insert(tx, *also)
    return moved > 0


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
    lease = _new_lease(
        holder=holder,
        ttl_s=ttl_s,
        owner_token_id=owner_token_id,
        token_hash=token_hash,
        wait_ms=wait_ms,
    ) | {"machine_id": claimed["id"], "pool": claimed["pool"], "fence": claimed["fence"]}
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


def _new_lease(
    *, holder: str, ttl_s: float, owner_token_id: str | None, token_hash: str, wait_ms: float
) -> Row:
    """A lease row granted now, without its machine (``machine_id``, ``pool``, ``fence``)."""
    now = utcnow()
    return {
        "id": new_id("l"),
        "machine_id": None,
        "pool": None,
        "holder": holder,
        "owner_token_id": owner_token_id,
        "fence": None,
        "token_hash": token_hash,
        "state": LeaseState.active,
        "ttl_s": ttl_s,
        "wait_ms": wait_ms,
        "requested_at": now - timedelta(milliseconds=wait_ms),
        "acquired_at": now,
        "expires_at": now + timedelta(seconds=ttl_s),
        "ended_at": None,
    }


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


def end(tx: Tx, lease: Row, state: LeaseState, now: datetime) -> tuple[bool, str | None]:
    """End the lease and fence its machine off (the lease's secret is stale from now on,
    even once the machine is ready again). Whatever the policy, the machine stays leased
    (by nobody) until its hand-over is done (``services.leases.return_machine``).

    Answers whether this call ended it (False: it was no longer active, ended by another
    transaction meanwhile) and the machine's reset policy, or None when the lease no
    longer held the machine."""
    machine_id = lease["machine_id"]
    if not tx.run(_END_LEASE, lease_id=lease["id"], new_state=state, now=now):
        return False, None
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
        return True, None
    if (
        machine is None
        or machine["state"] != MachineState.leased
        or machine["fence"] != lease["fence"]
    ):
        events.insert(tx, *changes)
        return True, None
    policy: str = machine["reset"] or "keep"
    tx.run(_FENCE_OFF, machine_id=machine_id, now=now)
    events.insert(tx, *changes)
    return True, policy


# ---------------------------------------------------------------- from the event loop

_PG_GRANT_TAIL = """
), lease AS (
  INSERT INTO leases (id, machine_id, pool, holder, owner_token_id, fence, token_hash, state,
                      ttl_s, wait_ms, requested_at, acquired_at, expires_at, ended_at)
  SELECT :id, id, pool, :holder, :owner_token_id, fence, :token_hash,
         CAST('active' AS leasestate), :ttl_s, :wait_ms, :requested_at, :acquired_at,
         :expires_at, NULL
  FROM claimed
  RETURNING machine_id, pool, fence
), written AS (
  INSERT INTO events (at, kind, subject_id, data)
  SELECT :acquired_at, 'machine.state', machine_id,
         json_build_object('state', 'leased', 'previous', 'ready', 'reason', NULL)
  FROM lease
  UNION ALL
  SELECT :acquired_at, 'lease.granted', CAST(:id AS text),
         json_build_object('machine_id', machine_id, 'holder', CAST(:holder AS text),
                           'fence', fence, 'ttl_s', CAST(:ttl_s AS float8),
                           'wait_ms', CAST(:wait_ms AS float8))
  FROM lease
)
SELECT machine_id, pool, fence FROM lease
"""


@functools.cache
def _pg_grant(by: tuple[str, ...]) -> Sql:
    """:func:`grant` as one statement: the claim of :func:`_claim_first`, the lease row and
    its two events, in the same order and shape as :func:`grant` writes them."""
    return Sql(f"WITH claimed AS ({_claim_text(by)}{_PG_GRANT_TAIL}")


_PG_END = Sql(
    f"""
WITH found AS (
  SELECT {_LEASE_COLUMNS}, reason FROM leases WHERE id = :lease_id
), ended AS (
  UPDATE leases l SET state = :new_state, ended_at = :now
  FROM found f
  WHERE l.id = f.id AND l.state = 'active'
    AND (CAST(:acting_for AS text) IS NULL OR l.owner_token_id IS NULL
         OR l.owner_token_id = :acting_for)
  RETURNING l.machine_id, l.fence
), fenced AS (
  UPDATE machines m SET fence = m.fence + 1, updated_at = :now
  FROM ended e
  WHERE m.id = e.machine_id AND m.fence = e.fence
    AND (m.state = 'leased' OR (m.state = 'paused' AND m.paused_from = 'leased'))
  RETURNING m.pool, m.state, m.reserved_for
), written AS (
  INSERT INTO events (at, kind, subject_id, data)
  SELECT :now, CAST(:kind AS text), CAST(:lease_id AS text),
         json_build_object('machine_id', machine_id, 'fence', fence)
  FROM ended
)
SELECT f.*,
       (SELECT count(*) FROM ended) AS ended,
       (SELECT count(*) FROM fenced WHERE state = 'leased') AS fenced,
       (SELECT CASE WHEN x.reserved_for IS NULL THEN p.reset ELSE 'recreate' END
        FROM fenced x LEFT JOIN pools p ON p.name = x.pool) AS reset
FROM (SELECT 1) AS one LEFT JOIN found f ON true
"""
)
"""What :func:`end` does, as one statement with the read the service checks: the lease as
it was (its columns; all None when there is no such lease), ended only if still active and
taken by ``acting_for``'s token or by none (NULL: any), its machine fenced off only if this
lease still held it, the event written."""
_PG_RENEW = Sql(
    """
WITH renewed AS (
  UPDATE leases SET ttl_s = :new_ttl, expires_at = :new_expiry
  WHERE id = :lease_id AND state = 'active'
  RETURNING id
), written AS (
  INSERT INTO events (at, kind, subject_id, data)
  SELECT :now, 'lease.renewed', id, json_build_object('expires_at', CAST(:expiry_text AS text))
  FROM renewed
)
SELECT count(*) AS renewed FROM renewed
"""
)

Check = Callable[[Row | None, str], Row]
"""Asked about a lease row (None: no such lease) and its id before it is changed: answers
the row, or raises to refuse (the services' rules: who may, in which state)."""
Plan = Callable[[Row], tuple[float, datetime]]
"""Asked about a checked lease row before a renewal: its new TTL and expiry."""


class LeaseLane:
    """The lease hot paths from the event loop, the fastest way each database allows.

    SQLite: the functions above in a group commit (``rawsql.GroupCommit``: one transaction
    for the requests that arrive together, a savepoint each). PostgreSQL: statements that
    are one round trip each, sent from the loop (``rawsql.LoopConnections``, which batches
    the statements of requests that arrive together into one pipeline and one commit): a
    grant is one statement; a release or a renew first reads the lease, asks the service's
    check, then changes it only if it is still active, so two controllers (or the reaper)
    racing for one lease end it once. A grant with a label selector, which asks Python
    about each candidate's labels, takes the group commit.
    """

    def __init__(self, engine: Engine) -> None:
        self.group_commit = GroupCommit(engine)
        self._pg = LoopConnections(engine) if engine.dialect.name == "postgresql" else None

    async def grant(
        self,
        *,
        filters: dict[str, str],
        labels_fit: Callable[[dict[str, str]], bool] | None,
        holder: str,
        ttl_s: float,
        owner_token_id: str | None,
        token_hash: str,
        wait_ms: float,
    ) -> Row | None:
        """See :func:`grant`."""
        given: dict[str, Any] = {
            "holder": holder,
            "ttl_s": ttl_s,
            "owner_token_id": owner_token_id,
            "token_hash": token_hash,
            "wait_ms": wait_ms,
        }
        if self._pg is None or labels_fit is not None:
            work = functools.partial(grant, filters=filters, labels_fit=labels_fit, **given)
            found: Row | None = await self.group_commit.run(work)
            return found
        lease = _new_lease(**given)
        params = {f"want_{column}": value for column, value in filters.items()}
        statement = _pg_grant(tuple(filters))
        claimed = await self._pg.one(statement, now=lease["acquired_at"], **params, **lease)
        return None if claimed is None else lease | claimed

    async def end(
        self, lease_id: str, state: LeaseState, check: Check, *, acting_for: str | None
    ) -> tuple[Row, str | None]:
        """Load the lease, ``check`` it, end it (see :func:`end`): the row as it was and the
        machine's reset policy (None when the lease no longer held the machine); Conflict
        when another transaction ended it between the read and the change.

        ``acting_for``: the token whose leases ``check`` lets end (None: any). On PostgreSQL
        the read, the rule and the change are one statement (one round trip): ``check`` then
        sees the row as it was and explains a refusal; the rule it applies must be the
        statement's (active, taken by that token or by none)."""
        if self._pg is None:
            found: tuple[Row, str | None] = await self.group_commit.run(
                functools.partial(_end_checked, lease_id=lease_id, state=state, check=check)
            )
            return found
        now = utcnow()
        kind = f"lease.{state.value}"
        done = await self._pg.one(
            _PG_END, lease_id=lease_id, new_state=state, now=now, kind=kind, acting_for=acting_for
        )
        assert done is not None  # one row always: the lease's columns are None without one
        was = {column: done[column] for column in (*_LEASE_COLUMNS.split(", "), "reason")}
        lease = check(was if was["id"] is not None else None, lease_id)
        if not done["ended"]:
            raise _ended_meanwhile(lease_id)
        return lease | {"ended_at": now}, (done["reset"] or "keep") if done["fenced"] else None

    async def renew(self, lease_id: str, check: Check, plan: Plan) -> tuple[Row, float, datetime]:
        """Load the lease, ``check`` it, ask ``plan`` for its new TTL and expiry, and renew
        it if it is still active: the row as it was, the TTL and the expiry."""
        if self._pg is None:
            found: tuple[Row, float, datetime] = await self.group_commit.run(
                functools.partial(_renew_planned, lease_id=lease_id, check=check, plan=plan)
            )
            return found
        lease = check(await self._pg.one(_SELECT_LEASE, lease_id=lease_id), lease_id)
        ttl_s, expires_at = plan(lease)
        done = await self._pg.one(
            _PG_RENEW,
            lease_id=lease_id,
            new_ttl=ttl_s,
            new_expiry=expires_at,
            now=utcnow(),
            expiry_text=expires_at.isoformat(),
        )
        if done is None or not done["renewed"]:
            raise _ended_meanwhile(lease_id)
        return lease, ttl_s, expires_at

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()


def _ended_meanwhile(lease_id: str) -> Conflict:
    return Conflict(f"lease {lease_id} ended meanwhile (released or expired)")


def _end_checked(
    tx: Tx, *, lease_id: str, state: LeaseState, check: Check
) -> tuple[Row, str | None]:
    lease = check(load(tx, lease_id), lease_id)
    now = utcnow()
    ended, policy = end(tx, lease, state, now)
    if not ended:
        raise _ended_meanwhile(lease_id)
    return lease | {"ended_at": now}, policy


def _renew_planned(
    tx: Tx, *, lease_id: str, check: Check, plan: Plan
) -> tuple[Row, float, datetime]:
    lease = check(load(tx, lease_id), lease_id)
    ttl_s, expires_at = plan(lease)
    renew(tx, lease_id, ttl_s=ttl_s, expires_at=expires_at)
    return lease, ttl_s, expires_at
