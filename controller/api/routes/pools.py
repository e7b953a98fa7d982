"""Warm pools: define one (ops), list them with machine counts by state."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import Ctl, OpsOnly, OpsOrAgent, SessionDep
from controller.api.schemas import ListOf, PoolBody, PoolPublic
from controller.domain import MachineTemplate
from controller.services import pools
from controller.store.models import Pool

router = APIRouter(prefix="/pools", tags=["pools"])


def public(pool: Pool, counts: dict[str, int]) -> PoolPublic:
    return PoolPublic(
        name=pool.name,
        template=MachineTemplate.model_validate(pool.template),
        min_ready=pool.min_ready,
        max_machines=pool.max_machines,
        reset=pool.reset,
        reason=pool.reason,
        counts=counts,
        created_at=pool.created_at,
        updated_at=pool.updated_at,
    )


@router.put("/{name}")
def put_pool(name: str, body: PoolBody, ctl: Ctl, tx: SessionDep, _: OpsOnly) -> PoolPublic:
    pool = pools.put_pool(
        ctl=ctl,
        name=name,
        template=body.template,
        min_ready=body.min_ready,
        max_machines=body.max_machines,
        reset=body.reset,
    )
    return public(pool, pools.counts(tx, name))


@router.get("")
def list_pools(tx: SessionDep, _: OpsOrAgent) -> ListOf[PoolPublic]:
    found = pools.list_pools(tx=tx)
    return ListOf(data=[public(p, c) for p, c in found], count=len(found))


@router.get("/{name}")
def show_pool(name: str, tx: SessionDep, _: OpsOrAgent) -> PoolPublic:
    pool = pools.get_pool(tx, name)
    return public(pool, pools.counts(tx, name))
