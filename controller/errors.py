"""One error hierarchy for the whole controller, mapped to HTTP in ``app.py``.

ShopfloorError                      500
├── InvalidInput (ValueError)       422  the request is wrong; the message says how
├── Unauthorized                    401  no or unknown token
├── Forbidden (PermissionError)     403  token lacks the role
├── NotFound (LookupError)          404
├── Conflict                        409  the object is in a state that forbids it
│   └── StaleLease                  409  a fencing token older than the machine's
├── TooLarge                        413  a request body or file over its cap
├── LimitReached                    429  a limit on a shared resource; the message says how
│                                        to free it, Retry-After when waiting is the way
├── SessionLost                     410  a shell session's shell or connection is gone
├── StorageFull                     507  a machine's disk is full (its limit, not the host's)
│   └── InsufficientStorage         507  the controller's data dir (or the database's disk) is full
├── WaitTimeout (TimeoutError)      408  nothing became free within wait_s
├── ProcessesSurvive                500  a machine's user kept processes through a hand-over
├── DatabaseUnavailable             503  the database does not answer; Retry-After says when
└── EngineError                     502  the container engine failed or is unreachable
    ├── TransportError                  SSH into a machine failed (no sshd, machine gone)
    └── ImageNotFound (InvalidInput)    an image the engine does not have: 422
"""

from __future__ import annotations

import math
from typing import Any


class ShopfloorError(Exception):
    status_code = 500
    code = "internal"
    headers: dict[str, str] = {}
    """HTTP headers the answer carries (``Retry-After``)."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "detail": self.message}
        if self.details:
            body.update(self.details)
        return body


class InvalidInput(ShopfloorError, ValueError):
    status_code = 422
    code = "invalid_input"


class Unauthorized(ShopfloorError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ShopfloorError, PermissionError):
    status_code = 403
    code = "forbidden"


class NotFound(ShopfloorError, LookupError):
    status_code = 404
    code = "not_found"


class Conflict(ShopfloorError):
    status_code = 409
    code = "conflict"


class StaleLease(Conflict):
    code = "stale_lease"


class TooLarge(ShopfloorError):
    status_code = 413
    code = "too_large"


class LimitReached(ShopfloorError):
    """A limit on a shared resource (sessions, forwards, files in flight, request rate).

    ``limit`` names it (the metric's label); ``retry_after_s``, when waiting frees it (a
    rate), becomes ``Retry-After``.
    """

    status_code = 429
    code = "limit_reached"

    def __init__(
        self, message: str, *, limit: str, retry_after_s: float | None = None, **details: Any
    ) -> None:
        super().__init__(message, limit=limit, **details)
        self.limit = limit
        if retry_after_s is not None:
            self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class SessionLost(ShopfloorError):
    status_code = 410
    code = "session_lost"


class StorageFull(ShopfloorError):
    status_code = 507
    code = "storage_full"


class WaitTimeout(ShopfloorError, TimeoutError):
    status_code = 408
    code = "wait_timeout"


class ProcessesSurvive(ShopfloorError):
    """A hand-over could not end every process of the machine's user (a fork bomb at the
    pid limit, an engine that could not even start the kill): the machine is recreated."""

    code = "processes_survive"


class DatabaseUnavailable(ShopfloorError):
    status_code = 503
    code = "database_unavailable"
    headers = {"Retry-After": "2"}


class InsufficientStorage(StorageFull):
    code = "insufficient_storage"


class EngineError(ShopfloorError):
    status_code = 502
    code = "engine_error"


class TransportError(EngineError):
    code = "transport_error"


class ImageNotFound(EngineError, InvalidInput):
    status_code = 422
    code = "image_not_found"
