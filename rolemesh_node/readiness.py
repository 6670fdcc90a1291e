"""Is a ``llama-server`` child ready to serve a model?

The rule (see ``docs/architecture.md``) holds for every build we know of:
``GET /health`` answers 200 **and** ``GET /v1/models`` answers 200 listing the
model with a non-null ``meta``. Some builds answer 503 "Loading model" on every
route while loading, some answer ``/v1/models`` 200 with ``meta: null``, older
ones answer ``/health`` 200 with ``{"status": "loading model"}`` — none of
those count as ready.

:func:`readiness_verdict` is the pure decision; :func:`probe` does the two
requests through an injected treq client.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime


def readiness_verdict(
    health_status: int, health_body: bytes, models_status: int, models_body: bytes, model: str
) -> tuple[bool, str]:
    """(ready, why-not) from the two probe answers."""
    if health_status != 200:
        return False, f"/health answered {health_status}{_error_message(health_body)}"
    status = _json(health_body)
    if isinstance(status, dict) and status.get("status") not in (None, "ok"):
        return False, f"/health says {status.get('status')!r}"
    if models_status != 200:
        return False, f"/v1/models answered {models_status}{_error_message(models_body)}"
    listing = _json(models_body)
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        return False, "/v1/models answered without a data list"
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") == model:
            if entry.get("meta") is None:
                return False, f"/v1/models lists {model!r} without meta (still loading)"
            return True, "ready"
    ids = [e.get("id") for e in entries if isinstance(e, dict)]
    return False, f"/v1/models does not list {model!r} (lists {ids})"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _error_message(body: bytes) -> str:
    doc = _json(body)
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return f" ({doc['error'].get('message')})"
    return ""


@inlineCallbacks
def probe(http: Any, clock: IReactorTime, port: int, model: str, timeout_s: float) -> Deferred[tuple[bool, str]]:
    """Ask the child on ``127.0.0.1:port`` whether it serves ``model``; never fails."""
    base = f"http://127.0.0.1:{port}"
    try:
        health = yield http.get(base + "/health").addTimeout(timeout_s, clock)
        health_body = yield health.content()
        if health.code != 200:
            return readiness_verdict(health.code, health_body, 0, b"", model)
        models = yield http.get(base + "/v1/models").addTimeout(timeout_s, clock)
        models_body = yield models.content()
    except Exception as exc:  # connection refused while the child binds, timeouts...
        return False, f"probe failed: {type(exc).__name__}: {exc}".rstrip(": ")
    return readiness_verdict(health.code, health_body, models.code, models_body, model)
