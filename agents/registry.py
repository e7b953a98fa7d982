"""Agents by name. A run's stages name one of these; an unknown name is refused up front."""

from __future__ import annotations

from collections.abc import Callable

from agents.base import Agent
from agents.command import CommandAgent
from controller.errors import InvalidInput

AGENTS: dict[str, Callable[[], Agent]] = {
    "command": CommandAgent,
}


def get_agent(name: str) -> Agent:
    try:
        return AGENTS[name]()
    except KeyError:
        known = ", ".join(sorted(AGENTS))
        raise InvalidInput(f"unknown agent {name!r}; known agents: {known}") from None
