"""Warm pools: define one (ops), list them with machine counts by state."""

from __future__ import annotations

from fastapi import APIRouter

from controller.api.deps import Ctl, OpsOnly, OpsOrAgent
from controller.api.schemas import ListOf, PoolBody, PoolPublic
from controller.domain import MachineTemplate
from controller.services import pools

router = APIRouter(prefix="/pools", tags=["pools"])


def public(view: pools.PoolView) -> PoolPublic:
    pool = view.pool
    return PoolPublic(
        name=pool.name,
        template=MachineTemplate.model_validate(pool.template),
        min_ready=pool.min_ready,
        max_machines=pool.max_machines,
        reset=pool.reset,
        reason=pool.reason,
        owner=pool.owner,
        prebuilt=pool.prebuilt,
        counts=view.counts,
        created_at=pool.created_at,
        updated_at=pool.updated_at,
    )


@router.put("/{name}")
def put_pool(name: str, body: PoolBody, ctl: Ctl, _: OpsOnly) -> PoolPublic:
    view = pools.put_pool(
        ctl=ctl,
        name=name,
        template=body.template,
        min_ready=body.min_ready,
        max_machines=body.max_machines,
        reset=body.reset,
        owner=body.owner,
    )
    return public(view)


@router.get("")
def list_pools(ctl: Ctl, _: OpsOrAgent) -> ListOf[PoolPublic]:
    found = pools.list_pools(ctl=ctl)
    return ListOf(data=[public(view) for view in found], count=len(found))


@router.get("/{name}")
def show_pool(name: str, ctl: Ctl, _: OpsOrAgent) -> PoolPublic:
    return public(pools.show_pool(ctl=ctl, name=name))
