"""The placement choice: which host takes a new machine (pure; ``hosts.place`` feeds it).

A host can take the machine when it is ``ready`` (not cordoned, draining or unreachable),
carries every label the template asks for (``host_labels``) and has room for the
machine's CPUs, memory, disk reservation and one more machine. Among those, ``spread``
picks the least loaded (a pool's machines spread first: fewest of that pool), ``pack`` the
most loaded. When none can, the error says why, host by host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from controller.errors import Conflict, LimitReached

Mode = Literal["spread", "pack"]
_EPSILON = 1e-9


@dataclass(frozen=True)
class Need:
    cpus: float
    memory_mb: int
    disk_gb: float
    host_labels: dict[str, str] = field(default_factory=dict)
    pool: str | None = None


@dataclass(frozen=True)
class Load:
    """A host as placement sees it: its capacity (None: no limit) and what is reserved."""

    name: str
    state: str
    labels: dict[str, str]
    cpus: float | None = None
    memory_mb: int | None = None
    disk_gb: float | None = None
    max_machines: int | None = None
    used_cpus: float = 0.0
    used_memory_mb: int = 0
    used_disk_gb: float = 0.0
    machines: int = 0
    pool_machines: int = 0
    """Machines of the requesting pool on this host."""

    def shortfall(self, need: Need) -> str | None:
        """What this host lacks for the machine, or None when it can take it."""
        checks: list[tuple[str, float | None, float, float, str]] = [
            ("cpus", self.cpus, self.used_cpus, need.cpus, ""),
            ("memory_mb", self.memory_mb, self.used_memory_mb, need.memory_mb, " MB"),
            ("disk_gb", self.disk_gb, self.used_disk_gb, need.disk_gb, " GB"),
            ("machines", self.max_machines, self.machines, 1, ""),
        ]
        for what, capacity, used, asked, unit in checks:
            if capacity is not None and used + asked > capacity + _EPSILON:
                return (
                    f"{what}: {_num(used)}{unit} of {_num(capacity)}{unit} reserved, "
                    f"the machine needs {_num(asked)}{unit}"
                )
        return None

    def load(self) -> float:
        """The most used share of any limited resource (0 when nothing is limited)."""
        shares = [
            used / capacity
            for capacity, used in (
                (self.cpus, self.used_cpus),
                (self.memory_mb, self.used_memory_mb),
                (self.disk_gb, self.used_disk_gb),
                (self.max_machines, self.machines),
            )
            if capacity
        ]
        return max(shares, default=0.0)


def _num(value: float) -> str:
    return f"{value:g}"


def choose(hosts: list[Load], need: Need, mode: Mode = "spread") -> str:
    """The host for the machine; :class:`Conflict` (409) when no host may take it (state,
    labels), :class:`LimitReached` (429) when those that may are full."""
    if not hosts:
        raise Conflict("no host is registered: PUT /api/v1/hosts/{name} adds one")
    refused: list[str] = []
    full: list[str] = []
    fits: list[Load] = []
    for host in sorted(hosts, key=lambda h: h.name):
        if host.state != "ready":
            refused.append(f"{host.name}: {host.state}")
            continue
        missing = {k: v for k, v in need.host_labels.items() if host.labels.get(k) != v}
        if missing:
            wanted = ",".join(f"{k}={v}" for k, v in sorted(missing.items()))
            refused.append(f"{host.name}: lacks labels {wanted}")
            continue
        short = host.shortfall(need)
        if short is not None:
            full.append(f"{host.name}: {short}")
            continue
        fits.append(host)
    if not fits:
        reasons = "; ".join(full + refused)
        if full:
            raise LimitReached(
                f"no host has room for the machine ({reasons})",
                limit="host_capacity",
                retry_after_s=5,
            )
        raise Conflict(f"no host may take the machine ({reasons})")
    if mode == "pack":
        return max(fits, key=lambda h: (h.load(), h.machines, _reverse(h.name))).name
    return min(fits, key=lambda h: (h.pool_machines, h.load(), h.machines, h.name)).name


def _reverse(name: str) -> tuple[int, ...]:
    """Sorts names backwards, so ``max`` breaks ties on the first name like ``min`` does."""
    return tuple(-ord(c) for c in name)
