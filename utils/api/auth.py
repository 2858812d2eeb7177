"""Who is calling: the owner of sessions and jobs.

With ``TWIN_API_KEYS`` set, the caller is the API key from ``Authorization: Bearer <key>`` (a wrong or
missing key is 401). Without keys, the caller is a per-client token: /upload issues one (``client_token``
in the JSON and an HttpOnly cookie); clients send it back as that cookie or as ``X-Client-Token``.
Only a SHA-256 hash of a key or token is stored. Another caller's sessions and jobs answer 404.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from utils import errors
from utils.storage import TOKEN_RE, hash_secret, new_id

COOKIE_NAME = "twin_client"
HEADER_NAME = "X-Client-Token"


@dataclass(frozen=True)
class Caller:
    owner: str | None          # hash stored with sessions/jobs; None = an anonymous caller with no token yet
    new_token: str | None = None  # set when a token was just issued (upload only)


def resolve_caller(headers, cookies, api_keys: list[str], *, issue: bool = False) -> Caller:
    if api_keys:
        auth = headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise errors.Unauthorized("missing API key: send 'Authorization: Bearer <key>'",
                                      headers={"WWW-Authenticate": "Bearer"})
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in api_keys):
            raise errors.Unauthorized("the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return Caller(owner="key:" + hash_secret(key))
    token = headers.get(HEADER_NAME) or cookies.get(COOKIE_NAME)
    if token and TOKEN_RE.fullmatch(token):
        return Caller(owner="tok:" + hash_secret(token))
    if issue:
        token = new_id()
        return Caller(owner="tok:" + hash_secret(token), new_token=token)
    return Caller(owner=None)


def require_admin(headers, api_keys: list[str], admin_keys: list[str]) -> None:
    """Admin-only endpoints (the base-model switch): the Bearer key must be one of ``TWIN_ADMIN_KEYS``.

    No admin keys configured: 403 saying how to turn it on. API keys on and no / an unknown key: 401, as
    everywhere. A valid API key that is not an admin key (or, without API keys, no admin key): 403."""
    if not admin_keys:
        raise errors.Forbidden("admin endpoints are off: set TWIN_ADMIN_KEYS (comma-separated keys) and send "
                               "'Authorization: Bearer <admin key>'")
    scheme, _, key = headers.get("Authorization", "").partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else ""
    if key and any(hmac.compare_digest(key.encode(), k.encode()) for k in admin_keys):
        return
    if api_keys:
        if not key:
            raise errors.Unauthorized("missing API key: send 'Authorization: Bearer <key>'",
                                      headers={"WWW-Authenticate": "Bearer"})
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in api_keys):
            raise errors.Unauthorized("the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    raise errors.Forbidden("this endpoint needs an admin key (TWIN_ADMIN_KEYS)")
