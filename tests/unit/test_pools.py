"""Pool names and bodies (pure logic)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from controller.api.schemas import PoolBody
from controller.errors import InvalidInput
from controller.services.pools import check_name


@pytest.mark.parametrize("name", ["web", "a", "py3.11-app", "x_y"])
def test_good_pool_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Web", "-x", "a b", "a/b", "x" * 64, "../etc"])
def test_bad_pool_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="pool name"):
        check_name(name)


def test_pool_body_limits() -> None:
    assert PoolBody.model_validate({"template": {}}).reset == "clean"
    with pytest.raises(ValidationError, match="keep"):
        PoolBody.model_validate({"template": {}, "reset": "wipe"})
    with pytest.raises(ValidationError, match="max_machines"):
        PoolBody.model_validate({"template": {}, "max_machines": 0})
