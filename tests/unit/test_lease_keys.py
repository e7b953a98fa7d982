"""Who may reach into a machine with what (``access.authorize``), and a lease's secret."""

from __future__ import annotations

import pytest

from controller.errors import Conflict, Forbidden, StaleLease
from controller.services import auth, leases
from controller.services.access import Key, authorize
from controller.store.models import ApiToken, Role

A = ApiToken(id="t-a", role=Role.agent, token_hash="a")
B = ApiToken(id="t-b", role=Role.agent, token_hash="b")
OPS = ApiToken(id="t-ops", role=Role.ops, token_hash="o")
SECRET, CLAIM = "lease-secret", "claim-secret"


def leased(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "state": "leased",
        "fence": 7,
        "lease_id": "l-1",
        "lease_fence": 7,
        "token_hash": auth.hash_token(SECRET),
        "owner_token_id": A.id,
        "claim_hash": auth.hash_token(CLAIM),
        "claimed_by": B.id,
    }
    return {**row, **changes}


READY = {"state": "ready", "fence": 8, "lease_id": None}


def test_a_new_secret_is_random_and_only_its_hash_is_kept() -> None:
    (one, one_hash), (two, _) = leases.new_secret(), leases.new_secret()
    assert one != two
    assert len(one) >= 40
    assert one_hash == auth.hash_token(one)
    assert one not in one_hash


def test_the_holder_passes_with_its_secret_and_ops_with_any_current_one() -> None:
    authorize("m-1", leased(), Key(A, SECRET))
    authorize("m-1", leased(), Key(OPS, SECRET))
    authorize("m-1", leased(), Key(OPS))  # ops may act on any machine
    authorize("m-1", READY, Key(OPS))


def test_another_agent_token_is_refused_even_with_the_secret() -> None:
    with pytest.raises(Forbidden):
        authorize("m-1", leased(), Key(B, SECRET))


def test_a_claim_secret_serves_the_claiming_token_only() -> None:
    authorize("m-1", leased(), Key(B, CLAIM))
    with pytest.raises(Forbidden):
        authorize("m-1", leased(), Key(A, CLAIM))


@pytest.mark.parametrize("sent", ["7", "6", "8", "guess", SECRET + "x", ""])
def test_a_fence_number_or_a_guess_is_stale_and_says_no_secret(sent: str) -> None:
    with pytest.raises(StaleLease) as refused:
        authorize("m-1", leased(), Key(B, sent))
    body = refused.value.to_dict()
    assert SECRET not in str(body)
    assert "current_token" not in body


def test_a_secret_of_an_ended_lease_is_stale() -> None:
    with pytest.raises(StaleLease):
        authorize("m-1", READY, Key(A, SECRET))
    with pytest.raises(StaleLease):  # the lease row is behind the machine's fence
        authorize("m-1", leased(lease_fence=6), Key(A, SECRET))


def test_an_agent_needs_a_lease() -> None:
    with pytest.raises(Forbidden, match="lease it first"):
        authorize("m-1", READY, Key(A))
    with pytest.raises(Conflict, match="X-Lease-Token"):
        authorize("m-1", leased(), Key(A))


def test_the_controller_itself_goes_by_fence() -> None:
    authorize("m-1", leased(), Key.internal(7))
    with pytest.raises(StaleLease):
        authorize("m-1", leased(), Key.internal(6))


def test_nobody_reaches_a_machine_that_is_not_ready_or_leased() -> None:
    with pytest.raises(Conflict):
        authorize("m-1", {"state": "stopped", "fence": 3, "lease_id": None}, Key(OPS))
