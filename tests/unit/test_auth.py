from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import Forbidden, Unauthorized
from controller.services import auth
from controller.store.db import make_engine, migrate, unit_of_work
from controller.store.models import ApiToken, Role


def test_tokens_are_stored_hashed_and_checked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    db = make_engine(url)
    with unit_of_work(db) as tx:
        token = auth.create_token(tx=tx, role=Role.agent)
    with unit_of_work(db) as tx:
        stored = tx.query(ApiToken).one()
        assert stored.token_hash != token
        assert token not in stored.token_hash
        found = auth.authenticate(tx=tx, authorization=f"Bearer {token}")
        assert found.role == Role.agent
        auth.require_role(found, (Role.agent, Role.ops))
        with pytest.raises(Forbidden, match="needs role ops"):
            auth.require_role(found, (Role.ops,))
        for header in (None, "", "Basic abc", "Bearer ", f"Bearer {token}x"):
            with pytest.raises(Unauthorized):
                auth.authenticate(tx=tx, authorization=header)
