"""``Idempotency-Key`` on POST /generate and POST /upload (as Stripe and the IETF draft describe it): the
HTTP side. The records live in an ``IdempotencyStore`` (``utils.contracts``; local mode's in jobs.db,
``utils.jobs.local.idempotency``, cluster mode's in Redis, ``utils.jobs.cluster.idempotency``), chosen
in ``utils.services.build_idempotency`` from the settings.

The same key from the same caller, on the same endpoint, with the same body, within
TWIN_IDEMPOTENCY_HOURS, answers what the first request answered (same job / session; no second job).
The same key with a different body: 422 ``idempotency_key_reused``. While the first request with that
key is still being answered: 409 ``idempotency_in_flight`` (both errors in ``utils.errors``, raised by
the stores). A request that failed leaves nothing behind, so retrying it runs it again. Keys are scoped
by caller (an API key's or client token's hash): one caller's key can never replay another caller's
answer.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from utils import errors

HEADER = "Idempotency-Key"
# Printable ASCII without spaces at the ends; long enough for UUIDs and composite keys.
KEY_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?$")


def parse_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not KEY_RE.match(value):
        raise errors.InvalidRequest(f"{HEADER}={value[:60]!r} must be 1-255 printable ASCII characters")
    return value


def fingerprint(*parts: Any) -> str:
    """A stable hash of what the request asked for (JSON with sorted keys; bytes hashed as they are)."""
    h = hashlib.sha256()
    for p in parts:
        data = p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, separators=(",", ":")).encode()
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def idempotent(endpoint: str, owner: str | None, fp_parts: tuple, answer):
    """Run ``answer() -> (status, body, headers, session_id)`` once per Idempotency-Key: with a key from a
    known caller the first answer is kept and given again for the same request (``Idempotent-Replayed``).
    The store is the app's (``app.extensions["twin_idempotency"]``, picked in utils/service/wiring.py)."""
    from flask import current_app, request
    idem = current_app.extensions["twin_idempotency"]
    key = parse_key(request.headers.get(HEADER))
    if key is None or owner is None:
        status, body, headers, _ = answer()
        return status, body, headers
    replay = idem.begin(owner, endpoint, key, fingerprint(*fp_parts))
    if replay is not None:
        status, body, headers = replay
        return status, body, {**headers, "Idempotent-Replayed": "true"}
    try:
        status, body, headers, session_id = answer()
    except BaseException:
        idem.abandon(owner, endpoint, key)
        raise
    idem.complete(owner, endpoint, key, status, body, headers, session_id)
    return status, body, headers
