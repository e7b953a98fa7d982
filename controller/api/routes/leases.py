"""Leases: take a machine (optionally waiting for one), renew, give it back."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from controller.api.deps import Ctl, OpsOrAgent, agent_call, answer, json_body, parse_body
from controller.api.fastlane import hot
from controller.api.schemas import LeaseBody, ListOf, RenewBody
from controller.domain import LeaseGranted, LeasePublic
from controller.services import leases
from controller.store.models import Lease

router = APIRouter(prefix="/leases", tags=["leases"])


def public(lease: Lease) -> LeasePublic:
    """Never the secret: only its grant's answer shows that (``LeaseGranted``)."""
    return LeasePublic.model_validate(lease, from_attributes=True)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=LeaseGranted,
    openapi_extra=json_body(LeaseBody),
)
@hot
async def acquire(request: Request) -> Response:
    """A hot path (see bench/lease.py): no dependencies (see routes/deps.py). Async so that
    waiting requests hold no worker thread (see leases.acquire_async). The answer alone
    carries the lease's secret (``token``), for the caller's X-Lease-Token."""
    ctl, caller = await agent_call(request)
    body = parse_body(LeaseBody, await request.body())
    target = leases.make_target(pool=body.pool, machine_id=body.machine_id, selector=body.selector)
    lease_request = leases.LeaseRequest(
        target=target, holder=body.holder, ttl_s=body.ttl_s, wait_s=body.wait_s, owner=caller
    )
    lease = await leases.acquire_async(ctl=ctl, request=lease_request)
    return answer(lease, status.HTTP_201_CREATED)


@router.get("")
def list_leases(ctl: Ctl, _: OpsOrAgent, state: str | None = None) -> ListOf[LeasePublic]:
    found = leases.list_leases(ctl=ctl, state=state)
    return ListOf(data=[public(lease) for lease in found], count=len(found))


@router.get("/{lease_id}")
def show_lease(lease_id: str, ctl: Ctl, _: OpsOrAgent) -> LeasePublic:
    return public(leases.show_lease(ctl=ctl, lease_id=lease_id))


@router.post("/{lease_id}/renew", response_model=LeasePublic, openapi_extra=json_body(RenewBody))
@hot
async def renew(lease_id: str, request: Request) -> Response:
    """A hot path, like :func:`acquire`; the body may be left out (the lease's own TTL)."""
    ctl, caller = await agent_call(request)
    body = parse_body(RenewBody, await request.body())
    lease = await leases.renew_async(ctl=ctl, lease_id=lease_id, caller=caller, ttl_s=body.ttl_s)
    return answer(lease)


@router.delete("/{lease_id}", response_model=LeasePublic)
@hot
async def release(lease_id: str, request: Request) -> Response:
    """A hot path, like :func:`acquire`."""
    ctl, caller = await agent_call(request)
    return answer(await leases.release_async(ctl=ctl, lease_id=lease_id, caller=caller))
