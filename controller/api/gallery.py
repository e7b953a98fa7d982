"""The QA gallery: server-rendered pages under ``/gallery`` that work without JavaScript.

Reviewers (and ops) sign in with their API token once; the gallery then keeps a signed,
HttpOnly, SameSite=Strict cookie naming the token (checked again on every request, so a
revoked token ends the sign-in). Forms that change state carry a CSRF value tied to the
sign-in.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer

from controller.api.deps import Ctl
from controller.api.routes.artifacts import blob_response
from controller.errors import NotFound, ShopfloorError, Unauthorized
from controller.services import artifacts, auth, callers, owners, review, verdicts
from controller.services.runtime import Controller
from controller.store.models import ApiToken, Artifact, ArtifactKind, Role, RunStatus
from evidence import TEMPLATES_DIR, junit, logs
from evidence.store import ArtifactStore
from evidence.verdicts import VerdictState

COOKIE = "shopfloor_gallery"
SIGN_IN_MAX_AGE_S = 12 * 3600
VIEWER_ROLES = (Role.reviewer, Role.ops)

router = APIRouter(prefix="/gallery", include_in_schema=False)
templates = Jinja2Templates(directory=TEMPLATES_DIR)
templates.env.globals.update(
    when=review.when,
    human_size=review.human_size,
    human_ms=review.human_ms,
    statuses=[s.value for s in RunStatus],
)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Viewer:
    token: ApiToken
    csrf: str

    @property
    def is_reviewer(self) -> bool:
        return self.token.role == Role.reviewer

    @property
    def label(self) -> str:
        return self.token.name or f"{self.token.role.value} {self.token.id}"


def gallery_secret(data_dir: Path) -> bytes:
    """A per-install signing key for the sign-in cookie, kept in the data dir (mode 600)."""
    path = data_dir / "gallery-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _signer(ctl: Controller) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(gallery_secret(ctl.settings.data_dir), salt="gallery-session")


def _viewer(request: Request, ctl: Controller) -> Viewer | None:
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        payload: dict[str, str] = _signer(ctl).loads(raw, max_age=SIGN_IN_MAX_AGE_S)
    except BadSignature:
        return None
    token = callers.token_by_id(ctl=ctl, token_id=payload.get("tid", ""))
    if token is None or token.role not in VIEWER_ROLES:
        return None
    return Viewer(token=token, csrf=payload.get("csrf", ""))


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/gallery/login?{_next_query(target)}", status_code=303)


def _next_query(target: str) -> str:
    from urllib.parse import urlencode

    return urlencode({"next": target})


def _safe_next(target: str) -> str:
    """Only our own gallery paths: no open redirect to another site."""
    if target.startswith("/gallery") and not target.startswith("//") and "\\" not in target:
        return target
    return "/gallery/runs"


def render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(PAGE_HEADERS)
    return response


def _store(ctl: Controller) -> ArtifactStore:
    return ArtifactStore.from_settings(ctl.settings)


# ---------------------------------------------------------------- sign in / out


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/gallery/runs") -> HTMLResponse:  # noqa: A002
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_model=None)
def login(
    request: Request,
    ctl: Ctl,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/gallery/runs",  # noqa: A002
) -> Response:
    try:
        token_hash = auth.hash_token(auth.bearer(f"Bearer {token}"))
        record = callers.token_for(ctl=ctl, token_hash=token_hash)
        auth.require_role(record, VIEWER_ROLES)
    except ShopfloorError as exc:
        context = {"next": _safe_next(next), "error": exc.message}
        return render(request, "login.html", context, status_code=exc.status_code)
    cookie = _signer(ctl).dumps({"tid": record.id, "csrf": secrets.token_urlsafe(16)})
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=SIGN_IN_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/gallery",
    )
    return response


@router.post("/logout")
def logout() -> RedirectResponse:
    response = RedirectResponse("/gallery/login", status_code=303)
    response.delete_cookie(COOKIE, path="/gallery")
    return response


# ---------------------------------------------------------------- pages


@router.get("", response_model=None)
def home() -> RedirectResponse:
    return RedirectResponse("/gallery/runs", status_code=303)


@router.get("/runs", response_model=None)
def runs_list(
    request: Request,
    ctl: Ctl,
    status: str = "",
    repo: str = "",
    verdict: str = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    viewer = _viewer(request, ctl)
    if viewer is None:
        return _to_login(request)
    filters = review.RunFilters(
        status=status if status in {s.value for s in RunStatus} else "",
        repo=repo[:1000],
        verdict=verdict if verdict in {v.value for v in VerdictState} else "",
        page=page,
    )
    data = review.runs_page(ctl=ctl, filters=filters)
    return render(request, "runs.html", {"viewer": viewer, "data": data})


@router.get("/runs/{run_id}", response_model=None)
def run_view(request: Request, run_id: str, ctl: Ctl) -> Response:
    viewer = _viewer(request, ctl)
    if viewer is None:
        return _to_login(request)
    return _run_response(request, ctl, viewer, run_id)


def _run_response(
    request: Request,
    ctl: Controller,
    viewer: Viewer,
    run_id: str,
    *,
    error: str | None = None,
    status_code: int = 200,
    comment: str = "",
) -> HTMLResponse:
    data = review.run_page(ctl=ctl, run_id=run_id)
    if data is None:
        return _not_found(request, viewer, f"run {run_id} does not exist")
    context = {
        "viewer": viewer,
        "data": data,
        "error": error,
        "comment": comment,
        "diff_lines": review.diff_lines,
    }
    return render(request, "run.html", context, status_code=status_code)


@router.post("/runs/{run_id}/verdict", response_model=None)
def verdict_form(
    request: Request,
    run_id: str,
    ctl: Ctl,
    decision: Annotated[str, Form()] = "",
    comment: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    viewer = _viewer(request, ctl)
    if viewer is None:
        return _to_login(request)
    problem: ShopfloorError | None = None
    if not viewer.csrf or not hmac.compare_digest(csrf, viewer.csrf):
        problem = Unauthorized("the form expired; reload the page and try again")
    elif not viewer.is_reviewer:
        problem = auth_error(viewer)
    else:
        try:
            verdicts.give_verdict(
                ctl=ctl,
                run_id=run_id,
                decision=decision,
                comment=comment,
                reviewer=viewer.token,
            )
        except ShopfloorError as exc:
            problem = exc
    if problem is not None:
        return _run_response(
            request,
            ctl,
            viewer,
            run_id,
            error=problem.message,
            status_code=problem.status_code,
            comment=comment,
        )
    return RedirectResponse(f"/gallery/runs/{run_id}#verdict", status_code=303)


def auth_error(viewer: Viewer) -> ShopfloorError:
    try:
        auth.require_role(viewer.token, (Role.reviewer,))
    except ShopfloorError as exc:
        return exc
    return Unauthorized("sign in as a reviewer")


@router.get("/runs/{run_id}/artifacts", response_model=None)
def run_artifacts(
    request: Request,
    run_id: str,
    ctl: Ctl,
    kind: str = "log",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    viewer = _viewer(request, ctl)
    if viewer is None:
        return _to_login(request)
    chosen = ArtifactKind(kind) if kind in {k.value for k in ArtifactKind} else ArtifactKind.log
    per_page = review.SHOWN_PER_KIND
    shown = review.artifacts_page(
        ctl=ctl, run_id=run_id, kind=chosen, limit=per_page + 1, offset=(page - 1) * per_page
    )
    if shown is None:
        return _not_found(request, viewer, f"run {run_id} does not exist")
    run, found = shown
    context = {
        "viewer": viewer,
        "run": run,
        "kind": chosen.value,
        "kinds": [k.value for k in ArtifactKind],
        "artifacts": found[:per_page],
        "page": page,
        "has_next": len(found) > per_page,
    }
    return render(request, "artifacts.html", context)


@router.get("/artifacts/{artifact_id}", response_model=None)
def artifact_view(request: Request, artifact_id: str, ctl: Ctl) -> Response:
    viewer = _viewer(request, ctl)
    if viewer is None:
        return _to_login(request)
    store = _store(ctl)
    artifact, run = artifacts.find_artifact(ctl=ctl, artifact_id=artifact_id)
    if artifact is None or run is None:
        return _not_found(request, viewer, f"artifact {artifact_id} does not exist")
    context: dict[str, Any] = {"viewer": viewer, "artifact": artifact, "run": run}
    context.update(_artifact_body(store, artifact))
    return render(request, "artifact.html", context)


def _artifact_body(store: ArtifactStore, artifact: Artifact) -> dict[str, Any]:
    try:
        data = store.get(artifact.sha256)
    except ShopfloorError as exc:
        return {"missing": exc.message}
    if artifact.kind is ArtifactKind.log:
        return {"log": logs.render(data)}
    if artifact.kind is ArtifactKind.junit:
        try:
            return {"report": junit.parse_junit(data, max_bytes=store.junit_cap_bytes)}
        except ShopfloorError as exc:
            return {"junit_error": exc.message}
    if artifact.kind is ArtifactKind.diff:
        text = logs.decode(data[: review.INLINE_TEXT_BYTES * 8])
        return {"diff": review.diff_lines(text)}
    if artifact.kind is ArtifactKind.plan or artifact.content_type.startswith("text/"):
        return {"text": logs.decode(data[: review.INLINE_TEXT_BYTES * 8])}
    if artifact.kind is ArtifactKind.screenshot:
        return {"comparison": artifact.facts.get("comparison")}
    return {}


VARIANTS = ("raw", "thumb", "baseline", "diff")


@router.get("/artifacts/{artifact_id}/{variant}", response_model=None)
def artifact_blob(request: Request, artifact_id: str, variant: str, ctl: Ctl) -> Response:
    """The artifact itself, or for a screenshot its thumbnail, baseline or diff image."""
    viewer = _viewer(request, ctl)
    if viewer is None:
        return _to_login(request)
    artifact, _ = artifacts.find_artifact(ctl=ctl, artifact_id=artifact_id)
    if artifact is None or variant not in VARIANTS:
        raise NotFound(f"no {variant} for artifact {artifact_id}")
    sha, content_type, name = _variant(artifact, variant)
    response: FileResponse = blob_response(_store(ctl), sha, content_type=content_type, name=name)
    return response


def _variant(artifact: Artifact, variant: str) -> tuple[str, str, str]:
    if variant == "raw":
        return artifact.sha256, artifact.content_type, artifact.name
    comparison = artifact.facts.get("comparison") or {}
    sha = {
        "thumb": artifact.facts.get("thumb_sha256"),
        "baseline": comparison.get("baseline_sha256"),
        "diff": comparison.get("diff_sha256"),
    }[variant]
    if not isinstance(sha, str):
        raise NotFound(f"artifact {artifact.id} has no {variant} image")
    stem = artifact.name.rsplit(".", 1)[0]
    return sha, "image/png", f"{stem}.{variant}.png"


@router.get("/overview", response_model=None)
def overview(request: Request, ctl: Ctl, window_h: float = 24 * 7) -> Response:
    viewer = _viewer(request, ctl)
    if viewer is None:
        return _to_login(request)
    window_h = min(max(window_h, 1.0), 24 * 365)
    figures, points = review.overview(ctl=ctl, window_h=window_h)
    context = {"viewer": viewer, "flow": figures, "trend": points, "window_h": window_h}
    return render(request, "overview.html", context)


@router.get("/owners/{owner}", response_model=None)
def owner_view(request: Request, owner: str, ctl: Ctl) -> Response:
    viewer = _viewer(request, ctl)
    if viewer is None:
        return _to_login(request)
    try:
        items = owners.queue(ctl=ctl, owner=owner)
    except ShopfloorError as exc:
        return _not_found(request, viewer, exc.message)
    return render(request, "owner.html", {"viewer": viewer, "owner": owner, "items": items})


def _not_found(request: Request, viewer: Viewer, message: str) -> HTMLResponse:
    return render(request, "error.html", {"viewer": viewer, "message": message}, 404)
