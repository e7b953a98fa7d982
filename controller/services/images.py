"""The runner image: the one image machines run unless a request names another.

The image is built on the engine's host from ``runner_image/`` and tagged by a hash of
that folder plus any extra CA certificates, so a changed Dockerfile or a new proxy CA
gives a new tag (and a rebuild) while an unchanged tree reuses what the engine has.
Everything goes through :class:`~controller.providers.base.Provider`; no engine SDK here.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from controller.errors import EngineError, InvalidInput
from controller.providers.base import Provider

RUNNER_IMAGE_DIR: Path = Path(__file__).resolve().parents[2] / "runner_image"
"""Build context of the runner image (Dockerfile, entrypoint, sshd config, base bootstrap)."""

RUNNER_CAPABILITIES: list[str] = ["AUDIT_WRITE", "CHOWN", "SETGID", "SETUID", "SYS_CHROOT"]
"""Capabilities a machine keeps after ``cap_drop=ALL``; each one checked on a real container.

sshd needs SYS_CHROOT (privilege separation chroots to /run/sshd), SETGID and SETUID
(to become ``runner``), CHOWN (to hand a pty to the user; also lets the entrypoint fix a
/workspace owned by someone else) and AUDIT_WRITE (Debian's sshd writes a Linux audit
record for every pty login and drops the session if it cannot). Without any one of them
key logins or pty sessions fail. Port 22 needs no NET_BIND_SERVICE: the engine sets
``net.ipv4.ip_unprivileged_port_start=0`` in container network namespaces.
"""

PUBLIC_BASE = "debian:bookworm-slim"
"""Base image when a registry is reachable (the Dockerfile's default ``BASE``)."""
LOCAL_BASE = "shopfloor/base:bookworm"
"""Base made by ``bootstrap-base.sh`` (debootstrap + import) when the pull fails."""

CA_SUBDIR = "ca"
"""Folder of the build context whose ``*.crt`` files the image trusts."""
DEFAULT_CA_DIR = Path("/usr/local/share/ca-certificates")
"""Where Debian keeps locally added CAs; the host's extra CAs are trusted by default."""

_PEM_MARKER = b"-----BEGIN CERTIFICATE-----"


def default_extra_ca() -> list[Path]:
    """The host's extra CA certificates, so machines trust the same TLS proxies it does."""
    if not DEFAULT_CA_DIR.is_dir():
        return []
    return sorted(p for p in DEFAULT_CA_DIR.rglob("*.crt") if p.is_file())


def _context_files(root: Path) -> list[Path]:
    """Files of the build context that define the image, minus the (local) CA folder."""
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] == CA_SUBDIR or not path.is_file():
            continue
        files.append(rel)
    return sorted(files, key=lambda rel: rel.as_posix())


def _ca_blobs(root: Path, extra_ca: list[Path]) -> list[bytes]:
    """Contents of every CA to trust: ``ca/*.crt`` in the context and the extra files.

    Sorted by digest and deduplicated, so the order callers pass them in does not matter.
    """
    paths = sorted((root / CA_SUBDIR).glob("*.crt")) if (root / CA_SUBDIR).is_dir() else []
    blobs: dict[str, bytes] = {}
    for path in [*paths, *extra_ca]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read CA certificate {path}: {exc}") from exc
        if _PEM_MARKER not in data:
            raise InvalidInput(
                f"CA certificate {path} is not PEM (update-ca-certificates needs PEM)"
            )
        blobs[hashlib.sha256(data).hexdigest()] = data
    return [blobs[digest] for digest in sorted(blobs)]


def _framed(data: bytes) -> bytes:
    """Length-prefixed, so no two different file lists hash the same."""
    return len(data).to_bytes(8, "big") + data


def runner_image_tag(extra_ca: list[Path]) -> str:
    """``shopfloor/runner:<12 hex>`` naming exactly this build context and CA set."""
    root = RUNNER_IMAGE_DIR
    digest = hashlib.sha256()
    for rel in _context_files(root):
        digest.update(_framed(rel.as_posix().encode()) + _framed((root / rel).read_bytes()))
    for blob in _ca_blobs(root, extra_ca):
        digest.update(_framed(b"ca") + _framed(blob))
    return f"shopfloor/runner:{digest.hexdigest()[:12]}"


def _choose_base(provider: Provider, progress: Callable[[str], None]) -> str:
    """The public base when the engine has or can pull it, else the local debootstrap one."""
    if provider.image_exists(PUBLIC_BASE):
        return PUBLIC_BASE
    progress(f"pulling {PUBLIC_BASE}")
    if provider.pull_image(PUBLIC_BASE):
        return PUBLIC_BASE
    if provider.image_exists(LOCAL_BASE):
        progress(f"cannot pull {PUBLIC_BASE}; using local base {LOCAL_BASE}")
        return LOCAL_BASE
    script = RUNNER_IMAGE_DIR / "bootstrap-base.sh"
    progress(f"cannot pull {PUBLIC_BASE}; building {LOCAL_BASE} with debootstrap (~1 min)")
    try:
        subprocess.run(["bash", str(script)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EngineError(
            f"cannot pull {PUBLIC_BASE} and building {LOCAL_BASE} with {script} failed: {exc}"
        ) from exc
    if not provider.image_exists(LOCAL_BASE):
        raise EngineError(
            f"{script} finished but the engine has no {LOCAL_BASE}; "
            "does the docker CLI talk to the same engine (DOCKER_HOST)?"
        )
    return LOCAL_BASE


def ensure_runner_image(
    provider: Provider,
    *,
    extra_ca: list[Path] | None = None,
    force: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> str:
    """Make sure the engine has the runner image for this tree and CAs; return its tag.

    ``extra_ca`` defaults to the host's extra CAs (:func:`default_extra_ca`). The build
    runs from a temporary copy of ``runner_image/`` so the CA files never land in the
    repository. Returns at once when the tagged image exists (unless ``force``).
    """
    cas = default_extra_ca() if extra_ca is None else list(extra_ca)
    tag = runner_image_tag(cas)
    if not force and provider.image_exists(tag):
        return tag

    base = _choose_base(provider, progress)
    with tempfile.TemporaryDirectory(prefix="shopfloor-runner-") as tmp:
        context = Path(tmp) / "runner_image"
        shutil.copytree(RUNNER_IMAGE_DIR, context)
        ca_dir = context / CA_SUBDIR
        if ca_dir.exists():
            shutil.rmtree(ca_dir)
        ca_dir.mkdir()
        for i, blob in enumerate(_ca_blobs(RUNNER_IMAGE_DIR, cas)):
            (ca_dir / f"shopfloor-extra-{i:02d}.crt").write_bytes(blob)
        progress(f"building {tag} from {base}")
        try:
            provider.build_image(context, tag, {"BASE": base})
        except EngineError as exc:
            raise EngineError(
                f"building runner image {tag} from {base} failed: {exc.message}"
            ) from exc
        except Exception as exc:
            raise EngineError(f"building runner image {tag} from {base} failed: {exc}") from exc
    if not provider.image_exists(tag):
        raise EngineError(f"the engine reports no image {tag} after building it")
    progress(f"built {tag}")
    return tag
