"""Bearer tokens with roles, stored as SHA-256 hashes (a token is random, so no salt is needed)."""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlmodel import Session, select

from controller.errors import Forbidden, Unauthorized
from controller.store.db import make_engine, migrate, unit_of_work
from controller.store.models import ApiToken, Role


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(*, tx: Session, role: Role, name: str = "") -> str:
    token = f"sf_{role.value}_{secrets.token_urlsafe(32)}"
    tx.add(ApiToken(role=role, name=name, token_hash=hash_token(token)))
    return token


def issue_token(*, database_url: str, role: Role, name: str = "") -> str:
    """A new token in the database at ``database_url`` (migrated first): for the CLI and
    tests, which run without a controller."""
    migrate(database_url)
    engine = make_engine(database_url)
    try:
        with unit_of_work(engine) as tx:
            return create_token(tx=tx, role=role, name=name)
    finally:
        engine.dispose()


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header, or 401 saying what to send."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "send 'Authorization: Bearer <token>' (make one: shopfloor token create)"
        )
    return token.strip()


def lookup(*, tx: Session, token_hash: str) -> ApiToken:
    record = tx.exec(select(ApiToken).where(ApiToken.token_hash == token_hash)).first()
    if record is None:
        raise Unauthorized("unknown or revoked token")
    return record


def authenticate(*, tx: Session, authorization: str | None) -> ApiToken:
    return lookup(tx=tx, token_hash=hash_token(bearer(authorization)))


class TokenCache:
    """Every request names a token; remembering known ones briefly spares a database trip.

    Only found tokens are kept, for ``ttl_s``: an unknown token always asks the database.
    """

    def __init__(self, ttl_s: float = 30.0) -> None:
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[ApiToken, float]] = {}

    def get(self, token_hash: str) -> ApiToken | None:
        entry = self._known.get(token_hash)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token_hash: str, token: ApiToken) -> None:
        self._known[token_hash] = (token, time.monotonic() + self.ttl_s)


def require_role(token: ApiToken, roles: tuple[Role, ...]) -> None:
    if token.role not in roles:
        wanted = " or ".join(r.value for r in roles)
        raise Forbidden(f"this call needs role {wanted}; your token has role {token.role.value}")
