"""Agents by name. A run's stages name one of these; an unknown name is refused up front."""

from __future__ import annotations

from collections.abc import Callable

from agents.base import Agent
from agents.command import CommandAgent
from agents.external import ExternalAgent
from agents.planner import PlannerAgent
from agents.qa import QaAgent
from agents.remote import RemoteAgent
from agents.reviewer import ReviewerAgent
from agents.tester import TesterAgent
from controller.errors import InvalidInput

AGENTS: dict[str, Callable[[], Agent]] = {
    "command": CommandAgent,
    "external": ExternalAgent,
    "planner": PlannerAgent,
    "tester": TesterAgent,
    "reviewer": ReviewerAgent,
    "qa": QaAgent,
    "remote": RemoteAgent,
}


def get_agent(name: str) -> Agent:
    try:
        return AGENTS[name]()
    except KeyError:
        known = ", ".join(sorted(AGENTS))
        raise InvalidInput(f"unknown agent {name!r}; known agents: {known}") from None
