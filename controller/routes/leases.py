"""Leases: take a machine (optionally waiting for one), renew, give it back."""

from __future__ import annotations

from fastapi import APIRouter, status

from controller import leases
from controller.models import Lease
from controller.routes.deps import Ctl, OpsOrAgent, SessionDep
from controller.schemas import LeaseBody, LeasePublic, ListOf, RenewBody

router = APIRouter(prefix="/leases", tags=["leases"])


def public(lease: Lease) -> LeasePublic:
    return LeasePublic(**lease.model_dump(exclude={"owner_token_id", "requested_at"}))


@router.post("", status_code=status.HTTP_201_CREATED)
async def acquire(body: LeaseBody, ctl: Ctl, caller: OpsOrAgent) -> LeasePublic:
    """Async so that waiting requests hold no worker thread (see leases.acquire_async)."""
    target = leases.make_target(pool=body.pool, machine_id=body.machine_id, selector=body.selector)
    request = leases.LeaseRequest(
        target=target, holder=body.holder, ttl_s=body.ttl_s, wait_s=body.wait_s, owner=caller
    )
    return await leases.acquire_async(ctl=ctl, request=request)


@router.get("")
def list_leases(
    session: SessionDep, _: OpsOrAgent, state: str | None = None
) -> ListOf[LeasePublic]:
    found = leases.list_leases(session=session, state=state)
    return ListOf(data=[public(lease) for lease in found], count=len(found))


@router.get("/{lease_id}")
def show_lease(lease_id: str, session: SessionDep, _: OpsOrAgent) -> LeasePublic:
    return public(leases.get_lease(session, lease_id))


@router.post("/{lease_id}/renew")
async def renew(
    lease_id: str, ctl: Ctl, caller: OpsOrAgent, body: RenewBody | None = None
) -> LeasePublic:
    ttl_s = body.ttl_s if body else None
    return await leases.renew_async(ctl=ctl, lease_id=lease_id, caller=caller, ttl_s=ttl_s)


@router.delete("/{lease_id}")
async def release(lease_id: str, ctl: Ctl, caller: OpsOrAgent) -> LeasePublic:
    return await leases.release_async(ctl=ctl, lease_id=lease_id, caller=caller)
