"""``.shopfloor.toml``: parsing, layering under a stage's ``with``, and clear refusals."""

from __future__ import annotations

from typing import Any

import pytest

from agents.config import build, check_file, load, parse
from controller.errors import InvalidInput

SAMPLE = """
setup = ["make deps"]
test = "python3 run_tests.py"
junit = "test-results/*.xml"
serve = "python3 app.py"
port = 8000
pages = ["/", "/about"]
"""


def test_file_values_with_defaults() -> None:
    cfg = build(parse(SAMPLE))
    assert cfg.test == "python3 run_tests.py"
    assert cfg.junit == ["test-results/*.xml"]  # a single string becomes a list
    assert cfg.port == 8000
    assert cfg.pages == ["/", "/about"]
    assert cfg.lint is None
    assert cfg.ready_timeout_s == 30.0


def test_with_block_overrides_key_by_key() -> None:
    cfg = build(parse(SAMPLE), {"port": 9000, "pages": ["/x"], "ready_timeout_s": 5})
    assert cfg.port == 9000
    assert cfg.pages == ["/x"]
    assert cfg.serve == "python3 app.py"
    assert cfg.ready_timeout_s == 5.0


def test_with_block_keys_that_are_not_config_are_ignored() -> None:
    assert build({}, {"commands": ["x"], "test": "t"}).test == "t"


@pytest.mark.parametrize(
    ("layer", "says"),
    [
        ({"port": "8000"}, "port must be a TCP port"),
        ({"port": 0}, "port must be a TCP port"),
        ({"port": True}, "port must be a TCP port"),
        ({"pages": ["about"]}, "starting with '/'"),
        ({"pages": [1]}, "list of strings"),
        ({"test": ""}, "non-empty command"),
        ({"page_timeout_s": -1}, "positive number"),
    ],
)
def test_wrong_types_are_refused_naming_the_key(layer: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        build(layer)


def test_unknown_keys_and_bad_toml() -> None:
    with pytest.raises(InvalidInput, match="unknown key.*prot"):
        check_file(parse("prot = 8000"))
    with pytest.raises(InvalidInput, match="not valid TOML"):
        parse("test = ")


def test_load_without_a_file_uses_the_with_block() -> None:
    def missing(_path: str) -> bytes:
        raise FileNotFoundError

    assert load(missing, "/workspace/app", {"test": "make test"}).test == "make test"
    read_paths: list[str] = []

    def present(path: str) -> bytes:
        read_paths.append(path)
        return SAMPLE.encode()

    assert load(present, "/workspace/app", {}).port == 8000
    assert read_paths == ["/workspace/app/.shopfloor.toml"]


def test_verify_and_owners_are_read_and_checked_key_by_key() -> None:
    from agents.config import policy

    found = policy(
        parse(
            "[verify]\nrequired_stages = ['plan', 'test']\napprovals = 2\n"
            "max_changed_pixels = 0.02\nconsole_errors = 'fail'\nflaky = 'quarantine'\n"
            "[owners]\ntest = 'qa-team'\n"
        )
    )
    assert found.verify.required_stages == ["plan", "test"]
    assert (found.verify.approvals, found.verify.flaky) == (2, "quarantine")
    assert found.owners == {"test": "qa-team"}
    assert policy({}).verify.approvals == 1
    for text, named in [
        ("[verify]\napproval = 1\n", "approval"),
        ("[verify]\napprovals = 'one'\n", "approvals"),
        ("[verify]\nflaky = 'ignore'\n", "flaky"),
        ("[verify]\nmax_changed_pixels = 2\n", "max_changed_pixels"),
        ("[owners]\ntest = 3\n", "test"),
        ("verify = 1\n", "[verify]"),
    ]:
        with pytest.raises(InvalidInput, match=named):
            policy(parse(text))
