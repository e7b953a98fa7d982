"""Bearer tokens with roles, stored as SHA-256 hashes (a token is random, so no salt is needed)."""

from __future__ import annotations

import hashlib
import secrets

from sqlmodel import Session, select

from controller.errors import Forbidden, Unauthorized
from controller.models import ApiToken, Role


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(*, session: Session, role: Role, name: str = "") -> str:
    token = f"sf_{role.value}_{secrets.token_urlsafe(32)}"
    session.add(ApiToken(role=role, name=name, token_hash=hash_token(token)))
    return token


def authenticate(*, session: Session, authorization: str | None) -> ApiToken:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "send 'Authorization: Bearer <token>' (make one: shopfloor token create)"
        )
    found = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(token.strip())))
    record = found.first()
    if record is None:
        raise Unauthorized("unknown or revoked token")
    return record


def require_role(token: ApiToken, roles: tuple[Role, ...]) -> None:
    if token.role not in roles:
        wanted = " or ".join(r.value for r in roles)
        raise Forbidden(f"this call needs role {wanted}; your token has role {token.role.value}")
