"""Abuse guards the API applies before a request reaches the runtime: the rate limiter, text-field
checks, and the start-up line that says how callers are authenticated.

Rate limits are counted per caller: the API key (its hash) when keys are configured, else the client's
address. Anonymous client tokens are not used as the key on purpose: a caller mints them freely (any
well-formed token is accepted), so keying on them would let one client reset its own limit at will.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

from utils import errors
from utils.config import Settings
from utils.prompts import check_text
from utils.storage import hash_secret

log = logging.getLogger("twin.security")

#: Request fields holding free text that reaches the tokenizer, the job record and the logs.
TEXT_FIELDS = ("prompt", "negative_prompt")
# The per-character rule lives in utils/prompts.check_text (the persona / attribute texts obey it too).


def check_text_fields(payload: Any) -> None:
    """Reject control characters and unpaired surrogates in prompt fields (400), naming the field,
    the code point and its position but never echoing the text.

    Unicode letters, emoji, combining marks and right-to-left text (with its direction marks) pass.
    An unpaired surrogate (JSON ``"\\ud800"``) passes ``json.loads`` but makes the tokenizer raise
    inside the job, so it must be refused here, at submit time.
    """
    if not isinstance(payload, dict):
        return
    for name in TEXT_FIELDS:
        text = payload.get(name)
        if not isinstance(text, str):
            continue
        check_text(name, text)


def check_rate_limits(settings: Settings) -> None:
    """Fail start-up on a limit string flask-limiter cannot parse (it would otherwise fail per request)."""
    from limits import parse_many
    for name in ("rate_limit_upload", "rate_limit_generate"):
        value = getattr(settings, name)
        try:
            if not parse_many(value):
                raise ValueError
        except ValueError:
            raise errors.ConfigError(f"TWIN_{name.upper()}={value!r} is not a rate limit like '30/minute' or "
                                     "'10/minute;100/hour'") from None


def rate_limit_key(request, api_keys: list[str]) -> str:
    """The bucket a request counts against: its API key's hash when keys are on, else its address.

    An absent or wrong key still gets a bucket (its address): its request is refused with 401 anyway,
    but the refusal is counted so key guessing is throttled too.
    """
    if api_keys:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        # Compared as hashes: equal-length digests, so the comparison time says nothing about the key.
        if scheme.lower() == "bearer" and key and hash_secret(key) in {hash_secret(k) for k in api_keys}:
            return "key:" + hash_secret(key)
    return "addr:" + (request.remote_addr or "unknown")


def retry_after_seconds(limiter) -> int:
    """Whole seconds until the breached window resets (at least 1)."""
    lim = getattr(limiter, "current_limit", None)
    reset_at = getattr(lim, "reset_at", None)
    if reset_at is None:
        return 1
    return max(1, math.ceil(reset_at - time.time()))


def describe_auth(settings: Settings) -> tuple[str, dict]:
    """The start-up line about authentication: says which mode is on, never the keys themselves."""
    keys = settings.api_key_list
    if keys:
        return ("authentication on: API keys required (Authorization: Bearer)",
                {"auth": "api_keys", "api_keys": len(keys), "bind": settings.host})
    if settings.is_loopback_bind:
        return ("authentication off: no API keys, loopback bind only; callers are told apart by per-client tokens",
                {"auth": "anonymous_loopback", "bind": settings.host})
    return ("authentication off on a non-loopback bind (TWIN_ALLOW_ANONYMOUS=1): anyone who reaches the port can "
            "upload; callers are told apart by per-client tokens", {"auth": "anonymous_public", "bind": settings.host})


def check_start(settings: Settings) -> None:
    """Start-up checks of the HTTP side: a public bind needs keys (or an explicit opt-out), rate limits must
    parse; then the one log line saying which authentication is on."""
    if not settings.is_loopback_bind and not settings.api_key_list and not settings.allow_anonymous:
        raise errors.ConfigError(f"TWIN_HOST={settings.host!r} is not a loopback address and TWIN_API_KEYS is "
                                 "empty: set API keys, or TWIN_ALLOW_ANONYMOUS=1 to serve without them")
    check_rate_limits(settings)
    message, fields = describe_auth(settings)
    logging.getLogger("twin.app").info(message, extra=fields)


def rate_limiter(app, settings: Settings):
    """flask-limiter for ``app``. Local mode: in-memory counters (one gunicorn worker process serves the app,
    see gunicorn.conf.py). Cluster mode: counters in the shared Redis, so a limit holds across API nodes;
    while Redis is away the limiter lets requests through (they get 503 queue_unavailable from the job
    store instead of a 500)."""
    from flask import request
    from flask_limiter import Limiter
    return Limiter(lambda: rate_limit_key(request, settings.api_key_list), app=app,
                   storage_uri=settings.queue_url or "memory://", headers_enabled=False, default_limits=[],
                   swallow_errors=settings.cluster)
