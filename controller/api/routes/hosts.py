"""Hosts of the fleet: register, list, cordon, uncordon, drain, remove (ops)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from controller.api.deps import Ctl, OpsOnly, OpsOrAgent
from controller.api.schemas import HostPublic, ListOf
from controller.domain import HostCapacity, HostSpec
from controller.services import hosts

router = APIRouter(prefix="/hosts", tags=["hosts"])


def public(view: hosts.HostView) -> HostPublic:
    host = view.host
    return HostPublic(
        name=host.name,
        url=host.url,
        labels=host.labels,
        state=host.state.value,
        reason=host.reason,
        capacity=HostCapacity(
            cpus=host.cpus,
            memory_mb=host.memory_mb,
            disk_gb=host.disk_gb,
            machines=host.max_machines,
        ),
        used=view.used,
        free=view.free,
        machines=view.machines,
        engine_version=host.engine_version,
        last_heartbeat=host.last_heartbeat,
        images=host.images or {},
        disk_limits=host.name == "local",
        created_at=host.created_at,
        updated_at=host.updated_at,
    )


@router.put("/{name}")
def put_host(name: str, body: HostSpec, ctl: Ctl, _: OpsOnly) -> HostPublic:
    return public(hosts.put_host(ctl=ctl, name=name, spec=body))


@router.get("")
def list_hosts(ctl: Ctl, _: OpsOrAgent) -> ListOf[HostPublic]:
    found = hosts.list_hosts(ctl=ctl)
    return ListOf(data=[public(view) for view in found], count=len(found))


@router.get("/{name}")
def show_host(name: str, ctl: Ctl, _: OpsOrAgent) -> HostPublic:
    return public(hosts.show_host(ctl=ctl, name=name))


@router.post("/{name}/cordon")
def cordon(name: str, ctl: Ctl, _: OpsOnly) -> HostPublic:
    return public(hosts.set_state(ctl=ctl, name=name, action="cordon"))


@router.post("/{name}/uncordon")
def uncordon(name: str, ctl: Ctl, _: OpsOnly) -> HostPublic:
    return public(hosts.set_state(ctl=ctl, name=name, action="uncordon"))


@router.post("/{name}/drain")
def drain(name: str, ctl: Ctl, _: OpsOnly) -> HostPublic:
    return public(hosts.set_state(ctl=ctl, name=name, action="drain"))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_host(name: str, ctl: Ctl, _: OpsOnly) -> Response:
    hosts.delete_host(ctl=ctl, name=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
