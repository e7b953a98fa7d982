"""The artifact store: blobs by content hash on disk, records in the database.

Blobs live at ``root/blobs/ab/cdef...`` (sha256), written once (same content, same file)
and atomically (temp file in the same folder, then ``os.replace``), so a reader never sees
half a blob and a crash leaves at most a stray temp file. Records link each blob to run,
stage, attempt, machine and commit, and carry what the store derived on save (JUnit
counts, image size and thumbnail, comparison with the baseline) in ``facts``.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlmodel import Session, col, select

from controller.errors import InvalidInput, NotFound, TooLarge
from controller.settings import Settings
from controller.store import events
from controller.store.models import Artifact, ArtifactKind, Baseline, Run
from evidence import images, junit, test_history

NAME_MAX = 255
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_DRIVE = re.compile(r"^[A-Za-z]:")
DEFAULT_TYPES = {
    ArtifactKind.log: "text/plain; charset=utf-8",
    ArtifactKind.junit: "application/xml",
    ArtifactKind.screenshot: "image/png",
    ArtifactKind.diff: "text/x-diff; charset=utf-8",
    ArtifactKind.plan: "text/markdown; charset=utf-8",
}


class ArtifactStore:
    """Content-addressed blobs under ``root``, plus the limits the store enforces on save."""

    def __init__(
        self,
        root: Path,
        *,
        cap_bytes: int = 50 * 1024 * 1024,
        junit_cap_bytes: int = 20 * 1024 * 1024,
        image_max_pixels: int = 40_000_000,
    ) -> None:
        self.root = Path(root)
        self.cap_bytes = cap_bytes
        self.junit_cap_bytes = junit_cap_bytes
        self.image_max_pixels = image_max_pixels

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        return cls(
            settings.data_dir / "artifacts",
            cap_bytes=settings.artifact_cap_bytes,
            junit_cap_bytes=settings.junit_cap_bytes,
            image_max_pixels=settings.image_max_pixels,
        )

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    def path_for(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise InvalidInput(f"{sha256!r} is not a sha256 hex digest")
        return self.blobs / sha256[:2] / sha256[2:]

    def put(self, data: bytes) -> str:
        """Store ``data`` once; returns its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.path_for(sha256)
        if path.exists():
            os.utime(path)  # fresh again: retention's grace protects it until recorded
            return sha256
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return sha256

    def get(self, sha256: str) -> bytes:
        path = self.path_for(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"blob {sha256} is not in the store (expired?)") from exc

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).exists()

    def delete(self, sha256: str) -> int:
        """Remove one blob; returns the bytes freed (0 if it was already gone)."""
        path = self.path_for(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        if not self.blobs.exists():
            return
        for folder in self.blobs.iterdir():
            if not folder.is_dir() or len(folder.name) != 2:
                continue
            for path in folder.iterdir():
                if not path.name.startswith(".tmp-"):
                    yield folder.name + path.name, path


def validate_name(name: str) -> str:
    """A display name: relative, no traversal (also percent-encoded), no control characters."""
    if not name or len(name) > NAME_MAX:
        raise InvalidInput(f"artifact name must be 1 to {NAME_MAX} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise InvalidInput("artifact name must not contain NUL or other control characters")
    decoded = name
    for _ in range(3):  # %252e%252e decodes twice
        decoded = unquote(decoded)
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        raise InvalidInput("artifact name must not contain encoded control characters")
    if decoded.startswith(("/", "\\")) or _DRIVE.match(decoded):
        raise InvalidInput(f"artifact name {name!r} must be relative, e.g. 'logs/test.txt'")
    parts = re.split(r"[/\\]", decoded)
    if any(part in ("..", ".") for part in parts):
        raise InvalidInput(f"artifact name {name!r} must not contain '..' or '.' path segments")
    return name


def _validate_kind(kind: str) -> ArtifactKind:
    try:
        return ArtifactKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in ArtifactKind)
        raise InvalidInput(f"artifact kind {kind!r} is unknown; use one of: {allowed}") from None


def _content_type(kind: ArtifactKind, name: str, given: str | None) -> str:
    if kind is ArtifactKind.screenshot:
        return "image/png"
    if given:
        base = given.split(";", 1)[0].strip().lower()
        if not CONTENT_TYPE.match(base) or len(given) > 128 or any(ord(c) < 32 for c in given):
            raise InvalidInput(f"content type {given!r} is not a valid media type")
        return given.strip()
    if kind in DEFAULT_TYPES:
        return DEFAULT_TYPES[kind]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def screenshot_page(name: str, meta: dict[str, Any]) -> str:
    """Which page a screenshot shows: ``meta["page"]`` or the name without its extension."""
    page = meta.get("page")
    if isinstance(page, str) and page.strip():
        return page.strip()[:512]
    return name.rsplit(".", 1)[0]


def save_artifact(
    *,
    tx: Session,
    store: ArtifactStore,
    run_id: str,
    stage: str,
    attempt: int,
    machine_id: str | None,
    commit: str | None,
    kind: str,
    name: str,
    data: bytes,
    content_type: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Artifact:
    """Validate, store the blob, derive facts, insert the record and its event."""
    artifact_kind = _validate_kind(kind)
    validate_name(name)
    if not STAGE_NAME.match(stage):
        raise InvalidInput(f"stage name {stage!r} must be letters, digits, '_', '-', '.'")
    if attempt < 1:
        raise InvalidInput("attempt must be 1 or more")
    if len(data) > store.cap_bytes:
        raise TooLarge(
            f"artifact {name!r} is {len(data)} bytes; the cap is {store.cap_bytes} bytes "
            "(SHOPFLOOR_ARTIFACT_CAP_BYTES)",
            cap_bytes=store.cap_bytes,
        )
    run = tx.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    meta = dict(meta or {})
    report = (
        junit.parse_junit(data, max_bytes=store.junit_cap_bytes)
        if artifact_kind is ArtifactKind.junit
        else None
    )
    facts: dict[str, Any] = (
        {"junit": report.counts()}
        if report is not None
        else _derive_facts(
            tx=tx,
            store=store,
            repo=run.repo,
            kind=artifact_kind,
            name=name,
            data=data,
            meta=meta,
        )
    )
    artifact = Artifact(
        run_id=run_id,
        stage=stage,
        attempt=attempt,
        machine_id=machine_id,
        commit=commit,
        kind=artifact_kind,
        name=name,
        sha256=store.put(data),
        size=len(data),
        content_type=_content_type(artifact_kind, name, content_type),
        meta=meta,
        facts=facts,
    )
    tx.add(artifact)
    if report is not None:
        facts["history"] = test_history.record(
            tx=tx,
            repo=run.repo,
            run_id=run_id,
            stage=stage,
            attempt=attempt,
            artifact_id=artifact.id,
            tree=test_history.Tree.from_meta(meta, commit),
            report=report,
        )
    events.record(
        tx,
        "artifact.saved",
        artifact.id,
        run_id=run_id,
        stage=stage,
        artifact_kind=artifact_kind.value,
        sha256=artifact.sha256,
        size=artifact.size,
    )
    return artifact


def _derive_facts(
    *,
    tx: Session,
    store: ArtifactStore,
    repo: str,
    kind: ArtifactKind,
    name: str,
    data: bytes,
    meta: dict[str, Any],
) -> dict[str, Any]:
    if kind is ArtifactKind.screenshot:
        return _screenshot_facts(
            tx=tx, store=store, repo=repo, page=screenshot_page(name, meta), data=data
        )
    if kind is ArtifactKind.log:
        return {"lines": data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)}
    return {}


def _screenshot_facts(
    *, tx: Session, store: ArtifactStore, repo: str, page: str, data: bytes
) -> dict[str, Any]:
    width, height = images.verify_png(data, max_pixels=store.image_max_pixels)
    facts: dict[str, Any] = {
        "page": page,
        "width": width,
        "height": height,
        "thumb_sha256": store.put(images.thumbnail(data)),
        "comparison": None,
    }
    baseline = tx.get(Baseline, (repo, page))
    if baseline is None or not store.exists(baseline.sha256):
        return facts
    result = images.compare(data, store.get(baseline.sha256))
    facts["comparison"] = {
        "baseline_artifact_id": baseline.artifact_id,
        "baseline_run_id": baseline.run_id,
        "baseline_sha256": baseline.sha256,
        "identical": result.identical,
        "changed_pixels": result.changed_pixels,
        "changed_share": round(result.changed_share, 6),
        "bbox": list(result.bbox) if result.bbox else None,
        "size_changed": result.size_changed,
        "diff_sha256": store.put(result.diff_png) if result.diff_png else None,
    }
    return facts


def get_artifact(tx: Session, artifact_id: str) -> Artifact:
    artifact = tx.get(Artifact, artifact_id)
    if artifact is None:
        raise NotFound(f"artifact {artifact_id} does not exist")
    return artifact


def list_artifacts(tx: Session, run_id: str) -> list[Artifact]:
    """All of a run's artifacts in one query, in the order they were saved."""
    query = (
        select(Artifact)
        .where(Artifact.run_id == run_id)
        .order_by(col(Artifact.created_at), col(Artifact.id))
    )
    return list(tx.exec(query))
