"""Runner image tag and build decisions, with a fake provider (no engine needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest

from controller.errors import EngineError, InvalidInput
from controller.providers.base import Provider
from controller.services import images

PEM_A = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
PEM_B = b"-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"


@pytest.fixture
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the real runner_image/ that tests may change freely."""
    root = tmp_path / "runner_image"
    shutil.copytree(images.RUNNER_IMAGE_DIR, root)
    for crt in (root / "ca").glob("*.crt"):  # a developer's local CAs must not leak in
        crt.unlink()
    monkeypatch.setattr(images, "RUNNER_IMAGE_DIR", root)
    return root


@pytest.fixture
def cas(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "cas"
    folder.mkdir()
    (folder / "a.crt").write_bytes(PEM_A)
    (folder / "b.crt").write_bytes(PEM_B)
    return [folder / "a.crt", folder / "b.crt"]


# --- runner_image_tag ---------------------------------------------------------------


def test_tag_is_stable_and_well_formed(context: Path, cas: list[Path]) -> None:
    tag = images.runner_image_tag(cas)
    assert re.fullmatch(r"shopfloor/runner:[0-9a-f]{12}", tag)
    assert images.runner_image_tag(cas) == tag
    assert images.runner_image_tag(list(reversed(cas))) == tag


def test_tag_does_not_depend_on_where_the_tree_lives(
    context: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = images.runner_image_tag([])
    moved = tmp_path / "elsewhere" / "runner_image"
    shutil.copytree(context, moved)
    monkeypatch.setattr(images, "RUNNER_IMAGE_DIR", moved)
    assert images.runner_image_tag([]) == tag


def test_tag_changes_with_any_context_file(context: Path) -> None:
    tag = images.runner_image_tag([])
    dockerfile = context / "Dockerfile"
    original = dockerfile.read_bytes()
    dockerfile.write_bytes(original + b"\n# changed\n")
    changed = images.runner_image_tag([])
    assert changed != tag
    dockerfile.write_bytes(original)
    assert images.runner_image_tag([]) == tag

    (context / "extra.conf").write_text("x")
    with_new_file = images.runner_image_tag([])
    assert with_new_file not in (tag, changed)
    (context / "extra.conf").rename(context / "other.conf")
    assert images.runner_image_tag([]) not in (tag, changed, with_new_file)


def test_tag_changes_with_ca_content_not_ca_folder_clutter(context: Path, cas: list[Path]) -> None:
    without = images.runner_image_tag([])
    with_a = images.runner_image_tag(cas[:1])
    assert with_a != without
    assert images.runner_image_tag(cas) != with_a

    cas[0].write_bytes(PEM_A.replace(b"AAAA", b"CCCC"))
    assert images.runner_image_tag(cas[:1]) != with_a

    (context / "ca" / "README").write_text("not a certificate")
    (context / "ca" / ".gitkeep").write_text("touched")
    assert images.runner_image_tag([]) == without
    # a .crt dropped into runner_image/ca/ by hand is trusted, so it counts like an extra CA
    (context / "ca" / "local.crt").write_bytes(PEM_B)
    assert images.runner_image_tag([]) == images.runner_image_tag([cas[1]]) != without


def test_tag_rejects_missing_or_non_pem_ca(context: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        images.runner_image_tag([tmp_path / "nope.crt"])
    der = tmp_path / "der.crt"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(InvalidInput, match="not PEM"):
        images.runner_image_tag([der])


def test_default_extra_ca_is_sorted_and_recursive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ca-certificates"
    (folder / "corp").mkdir(parents=True)
    for rel in ("z.crt", "corp/a.crt", "b.crt", "notes.txt"):
        (folder / rel).write_bytes(PEM_A)
    monkeypatch.setattr(images, "DEFAULT_CA_DIR", folder)
    assert images.default_extra_ca() == sorted(
        [folder / "b.crt", folder / "corp" / "a.crt", folder / "z.crt"]
    )
    monkeypatch.setattr(images, "DEFAULT_CA_DIR", tmp_path / "missing")
    assert images.default_extra_ca() == []


# --- ensure_runner_image ------------------------------------------------------------


class FakeProvider:
    """The image part of a Provider: a set of tags, a switchable pull, recorded builds."""

    def __init__(self, images_present: set[str] | None = None, *, pull_ok: bool = False) -> None:
        self.images = set(images_present or ())
        self.pull_ok = pull_ok
        self.pulls: list[str] = []
        self.builds: list[tuple[str, dict[str, str]]] = []
        self.contexts: list[dict[str, bytes]] = []
        self.fail_build: Exception | None = None

    def image_exists(self, ref: str) -> bool:
        return ref in self.images

    def pull_image(self, ref: str) -> bool:
        self.pulls.append(ref)
        if self.pull_ok:
            self.images.add(ref)
        return self.pull_ok

    def build_image(self, context: Path, tag: str, buildargs: dict[str, str]) -> None:
        if self.fail_build is not None:
            raise self.fail_build
        self.contexts.append(
            {
                p.relative_to(context).as_posix(): p.read_bytes()
                for p in context.rglob("*")
                if p.is_file()
            }
        )
        self.builds.append((tag, dict(buildargs)))
        self.images.add(tag)


def as_provider(fake: FakeProvider) -> Provider:
    return cast(Provider, fake)


@pytest.fixture
def no_bootstrap(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record bootstrap-base.sh runs instead of running debootstrap."""
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(argv)
        raise AssertionError(f"unexpected subprocess.run({argv})")

    monkeypatch.setattr("controller.services.images.subprocess.run", fake_run)
    return calls


def test_existing_image_is_returned_without_building(
    context: Path, no_bootstrap: list[list[str]]
) -> None:
    tag = images.runner_image_tag([])
    fake = FakeProvider({tag})
    assert images.ensure_runner_image(as_provider(fake), extra_ca=[]) == tag
    assert fake.builds == []
    assert fake.pulls == []


def test_force_rebuilds_an_existing_image(context: Path, no_bootstrap: list[list[str]]) -> None:
    tag = images.runner_image_tag([])
    fake = FakeProvider({tag, images.PUBLIC_BASE})
    assert images.ensure_runner_image(as_provider(fake), extra_ca=[], force=True) == tag
    assert fake.builds == [(tag, {"BASE": images.PUBLIC_BASE})]


def test_public_base_when_present_or_pullable(context: Path, no_bootstrap: list[list[str]]) -> None:
    present = FakeProvider({images.PUBLIC_BASE})
    images.ensure_runner_image(as_provider(present), extra_ca=[])
    assert present.pulls == []
    assert present.builds[0][1] == {"BASE": images.PUBLIC_BASE}

    pullable = FakeProvider(pull_ok=True)
    images.ensure_runner_image(as_provider(pullable), extra_ca=[])
    assert pullable.pulls == [images.PUBLIC_BASE]
    assert pullable.builds[0][1] == {"BASE": images.PUBLIC_BASE}


def test_pull_fails_existing_local_base_is_used(
    context: Path, no_bootstrap: list[list[str]]
) -> None:
    fake = FakeProvider({images.LOCAL_BASE}, pull_ok=False)
    messages: list[str] = []
    tag = images.ensure_runner_image(as_provider(fake), extra_ca=[], progress=messages.append)
    assert fake.builds == [(tag, {"BASE": images.LOCAL_BASE})]
    assert no_bootstrap == []
    assert any(images.LOCAL_BASE in m for m in messages)


def test_pull_fails_local_base_is_bootstrapped(
    context: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeProvider(pull_ok=False)
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        calls.append(argv)
        assert kwargs.get("check") is True
        fake.images.add(images.LOCAL_BASE)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr("controller.services.images.subprocess.run", fake_run)
    tag = images.ensure_runner_image(as_provider(fake), extra_ca=[])
    assert calls == [["bash", str(context / "bootstrap-base.sh")]]
    assert fake.builds == [(tag, {"BASE": images.LOCAL_BASE})]


def test_failed_bootstrap_is_an_engine_error(
    context: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        raise subprocess.CalledProcessError(1, argv)

    monkeypatch.setattr("controller.services.images.subprocess.run", fake_run)
    fake = FakeProvider(pull_ok=False)
    with pytest.raises(EngineError, match="bootstrap-base.sh"):
        images.ensure_runner_image(as_provider(fake), extra_ca=[])
    assert fake.builds == []


def test_failed_build_is_an_engine_error(context: Path, no_bootstrap: list[list[str]]) -> None:
    fake = FakeProvider({images.PUBLIC_BASE})
    fake.fail_build = RuntimeError("apt-get exploded")
    with pytest.raises(EngineError, match="apt-get exploded") as info:
        images.ensure_runner_image(as_provider(fake), extra_ca=[])
    assert images.runner_image_tag([]) in info.value.message


def test_build_context_is_a_copy_with_the_cas(
    context: Path, cas: list[Path], no_bootstrap: list[list[str]]
) -> None:
    before = sorted(p.relative_to(context).as_posix() for p in context.rglob("*"))
    fake = FakeProvider({images.PUBLIC_BASE})
    tag = images.ensure_runner_image(as_provider(fake), extra_ca=cas)
    assert tag == images.runner_image_tag(cas)
    files = fake.contexts[0]
    assert files["Dockerfile"] == (context / "Dockerfile").read_bytes()
    assert sorted(v for k, v in files.items() if k.startswith("ca/") and k.endswith(".crt")) == [
        PEM_A,
        PEM_B,
    ]
    assert sorted(p.relative_to(context).as_posix() for p in context.rglob("*")) == before
