"""Webhooks (ops): signed JSON POSTs for what lands in owners' queues (issue 13)."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from controller.api.deps import Ctl, OpsOnly
from controller.api.schemas import DeliveryPublic, ListOf, WebhookBody, WebhookPublic
from controller.services import webhooks
from controller.store.models import Webhook, WebhookDelivery

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


def public(hook: Webhook) -> WebhookPublic:
    return WebhookPublic(
        name=hook.name,
        url=hook.url,
        events=hook.events,
        owners=hook.owners,
        created_at=hook.created_at,
        updated_at=hook.updated_at,
    )


def delivery_public(found: WebhookDelivery) -> DeliveryPublic:
    return DeliveryPublic(
        id=found.id,
        webhook=found.webhook,
        event=found.event,
        state=found.state.value,
        attempts=found.attempts,
        next_at=found.next_at,
        last_error=found.last_error,
        response_code=found.response_code,
        created_at=found.created_at,
        finished_at=found.finished_at,
        body=json.loads(found.body),
    )


@router.put("/{name}")
def put_webhook(name: str, body: WebhookBody, ctl: Ctl, _: OpsOnly) -> WebhookPublic:
    """Create or replace a webhook. Only http(s) URLs (422 otherwise); redirects are never
    followed; the secret signs each body (``X-Shopfloor-Signature: sha256=<hex>``) and is
    never shown back."""
    hook = webhooks.put_webhook(
        ctl=ctl,
        name=name,
        url=body.url,
        events_=body.events,
        secret=body.secret,
        owners=body.owners,
    )
    return public(hook)


@router.get("")
def list_webhooks(ctl: Ctl, _: OpsOnly) -> ListOf[WebhookPublic]:
    found = webhooks.list_webhooks(ctl=ctl)
    return ListOf(data=[public(h) for h in found], count=len(found))


@router.get("/{name}/deliveries")
def list_deliveries(
    name: str,
    ctl: Ctl,
    _: OpsOnly,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ListOf[DeliveryPublic]:
    """Newest first: state (pending, delivered, failed), attempts, last error, answer code."""
    found = webhooks.deliveries(ctl=ctl, name=name, limit=limit)
    return ListOf(data=[delivery_public(d) for d in found], count=len(found))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_webhook(name: str, ctl: Ctl, _: OpsOnly) -> Response:
    webhooks.delete_webhook(ctl=ctl, name=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
