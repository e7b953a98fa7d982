"""Webhooks: owners are told of what lands in their queue by a signed JSON POST.

A delivery is a row written in the same transaction as the change it reports
(:func:`enqueue_in`); the webhook loop (:func:`deliver_due`, started by ``startup``, leader
only) sends what is due, so no request and no run driver ever waits on an endpoint. Each
body is signed with the webhook's secret: ``X-Shopfloor-Signature: sha256=<hex HMAC-SHA256
of the body>``. An attempt that fails (connection refused, timeout, 5xx, 429) is retried
with exponential backoff up to ``webhook_max_attempts``; a redirect is never followed and
fails the delivery at once, like a 4xx. Only ``http``/``https`` URLs are accepted; the
secret is kept to sign and never shown back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete
from sqlmodel import Session, col, select

from controller.errors import InvalidInput, NotFound
from controller.services.runtime import Controller
from controller.store import events
from controller.store.db import unit_of_work
from controller.store.models import (
    OWNER_ITEM_KINDS,
    DeliveryState,
    Webhook,
    WebhookDelivery,
    new_id,
    utcnow,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Shopfloor-Signature"
ALL = "*"
URL_MAX = 2048
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ERROR_MAX = 500


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_url(url: str) -> str:
    """Only absolute http(s) URLs with a host, no credentials, no whitespace."""
    if len(url) > URL_MAX or any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise InvalidInput(
            f"url must be at most {URL_MAX} characters without spaces or control characters"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise InvalidInput(f"url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(
            f"url must be http:// or https://, not {parts.scheme or 'a relative URL'}:"
        )
    if not parts.hostname:
        raise InvalidInput("url must name a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("url must not carry credentials; the secret signs each delivery")
    return url


def check_events(found: Sequence[str]) -> list[str]:
    chosen = list(dict.fromkeys(found))
    unknown = [e for e in chosen if e != ALL and e not in OWNER_ITEM_KINDS]
    if unknown or not chosen:
        raise InvalidInput(
            f"events must name one or more of {ALL}, {', '.join(OWNER_ITEM_KINDS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    return chosen


def put_webhook(
    *, ctl: Controller, name: str, url: str, events_: Sequence[str], secret: str, owners: list[str]
) -> Webhook:
    if not _NAME.match(name):
        raise InvalidInput("a webhook's name must match [a-z0-9][a-z0-9._-]{0,62}")
    url = check_url(url)
    chosen = check_events(events_)
    if not 16 <= len(secret) <= 256:
        raise InvalidInput("secret must be 16 to 256 characters")
    with unit_of_work(ctl.db) as tx:
        hook = tx.get(Webhook, name)
        created = hook is None
        hook = hook or Webhook(name=name, url=url, secret=secret)
        hook.url, hook.events, hook.secret, hook.owners = url, chosen, secret, list(owners)
        hook.updated_at = utcnow()
        tx.add(hook)
        events.record(
            tx,
            "webhook.created" if created else "webhook.updated",
            name,
            url=url,
            events=chosen,
            owners=list(owners),
        )
        tx.flush()
        return hook


def list_webhooks(*, ctl: Controller) -> list[Webhook]:
    with unit_of_work(ctl.reader) as tx:
        return list(tx.exec(select(Webhook).order_by(col(Webhook.name))))


def delete_webhook(*, ctl: Controller, name: str) -> None:
    """The webhook and its deliveries (sent or not) go."""
    with unit_of_work(ctl.db) as tx:
        hook = _require(tx, name)
        tx.delete(hook)
        tx.connection().execute(delete(WebhookDelivery).where(col(WebhookDelivery.webhook) == name))
        events.record(tx, "webhook.deleted", name)


def deliveries(*, ctl: Controller, name: str, limit: int = 100) -> list[WebhookDelivery]:
    """The newest deliveries of one webhook first."""
    with unit_of_work(ctl.reader) as tx:
        _require(tx, name)
        query = (
            select(WebhookDelivery)
            .where(WebhookDelivery.webhook == name)
            .order_by(col(WebhookDelivery.created_at).desc(), col(WebhookDelivery.id).desc())
            .limit(limit)
        )
        return list(tx.exec(query))


def _require(tx: Session, name: str) -> Webhook:
    hook = tx.get(Webhook, name)
    if hook is None:
        raise NotFound(f"no webhook {name!r}")
    return hook


def enqueue_in(tx: Session, *, event: str, owner: str, payload: dict[str, Any]) -> list[str]:
    """Queue one delivery per webhook that wants ``event`` for ``owner``, in ``tx`` (the
    change's own transaction); nothing is sent here."""
    queued: list[str] = []
    for hook in tx.exec(select(Webhook)):
        if ALL not in hook.events and event not in hook.events:
            continue
        if hook.owners and owner not in hook.owners:
            continue
        delivery_id = new_id("d")
        body = {"delivery": delivery_id, "webhook": hook.name, "event": event, **payload}
        tx.add(
            WebhookDelivery(
                id=delivery_id,
                webhook=hook.name,
                event=event,
                body=json.dumps(body, sort_keys=True, default=str),
            )
        )
        queued.append(delivery_id)
    return queued


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    retry: bool
    response_code: int | None
    error: str | None


def send(
    client: httpx.Client, *, url: str, secret: str, delivery_id: str, event: str, body: str
) -> Attempt:
    """One POST, never following a redirect; what happened, and whether to try again."""
    data = body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "shopfloor-webhook",
        SIGNATURE_HEADER: sign(secret, data),
        "X-Shopfloor-Event": event,
        "X-Shopfloor-Delivery": delivery_id,
    }
    try:
        response = client.post(url, content=data, headers=headers)
    except httpx.TimeoutException as exc:
        return Attempt(False, True, None, f"timed out: {type(exc).__name__}")
    except httpx.HTTPError as exc:
        return Attempt(False, True, None, f"{type(exc).__name__}: {exc}"[:ERROR_MAX])
    code = response.status_code
    if 200 <= code < 300:
        return Attempt(True, False, code, None)
    if 300 <= code < 400:
        where = response.headers.get("location", "")[:200]
        return Attempt(
            False, False, code, f"answered a redirect ({code} to {where!r}); not followed"
        )
    retry = code >= 500 or code in (408, 429)
    return Attempt(False, retry, code, f"answered {code}")


def deliver_due(*, ctl: Controller, now: datetime | None = None) -> int:
    """One tick of the webhook loop: send the oldest due deliveries, record each outcome in
    its own transaction. Answers how many were attempted."""
    settings = ctl.settings
    now = now or utcnow()
    with unit_of_work(ctl.reader) as tx:
        due = list(
            tx.exec(
                select(WebhookDelivery, Webhook)
                .join(Webhook, col(Webhook.name) == col(WebhookDelivery.webhook))
                .where(
                    WebhookDelivery.state == DeliveryState.pending,
                    col(WebhookDelivery.next_at) <= now,
                )
                .order_by(col(WebhookDelivery.next_at), col(WebhookDelivery.id))
                .limit(settings.webhook_batch)
            )
        )
    if not due:
        return 0
    timeout = httpx.Timeout(settings.webhook_timeout_s)
    with httpx.Client(follow_redirects=False, timeout=timeout, trust_env=False) as client:
        for delivery, hook in due:
            if ctl.stopping.is_set():
                break
            attempt = send(
                client,
                url=hook.url,
                secret=hook.secret,
                delivery_id=delivery.id,
                event=delivery.event,
                body=delivery.body,
            )
            _record(ctl, delivery.id, attempt)
    return len(due)


def _record(ctl: Controller, delivery_id: str, attempt: Attempt) -> None:
    settings = ctl.settings
    with unit_of_work(ctl.db) as tx:
        delivery = tx.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.state != DeliveryState.pending:
            return  # its webhook was deleted meanwhile
        delivery.attempts += 1
        delivery.response_code = attempt.response_code
        delivery.last_error = attempt.error
        now = utcnow()
        if attempt.delivered:
            delivery.state, delivery.finished_at = DeliveryState.delivered, now
        elif attempt.retry and delivery.attempts < settings.webhook_max_attempts:
            wait = settings.webhook_backoff_s * 2 ** (delivery.attempts - 1)
            delivery.next_at = now + timedelta(seconds=wait)
        else:
            delivery.state, delivery.finished_at = DeliveryState.failed, now
        tx.add(delivery)
        if delivery.state != DeliveryState.pending:
            events.record(
                tx,
                "webhook.delivery",
                delivery.id,
                webhook=delivery.webhook,
                state=delivery.state.value,
                attempts=delivery.attempts,
                response_code=delivery.response_code,
                error=delivery.last_error,
            )
