"""Who is calling: the API token behind a request or a gallery sign-in, read without the
write lock. The token rules themselves (hashing, roles, the cache) are ``auth.py``."""

from __future__ import annotations

from controller.services import auth
from controller.services.runtime import Controller
from controller.store.db import unit_of_work
from controller.store.models import ApiToken


def token_for(*, ctl: Controller, token_hash: str) -> ApiToken:
    """The token with this hash, or 401."""
    with unit_of_work(ctl.reader) as tx:
        return auth.lookup(tx=tx, token_hash=token_hash)


def token_by_id(*, ctl: Controller, token_id: str) -> ApiToken | None:
    with unit_of_work(ctl.reader) as tx:
        return tx.get(ApiToken, token_id)
