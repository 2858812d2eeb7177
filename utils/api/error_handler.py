"""The one error handler: every failure becomes ``{"error": {"code", "message"}}`` with a fitting status."""
from __future__ import annotations

import logging
import traceback

from flask import current_app, request
from werkzeug.exceptions import HTTPException

from utils import errors
from utils.api import security
from utils.api.context import json_response, runtime

log = logging.getLogger("twin.app")

# Error messages name the offending value; a hostile value must not make the answer as large as the request.
MAX_MESSAGE_CHARS = 500
_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type"}


def handle_error(e: Exception):
    from flask_limiter.errors import RateLimitExceeded   # flask-limiter loads with the app, not at import
    if isinstance(e, errors.TwinError):
        status, headers, body = e.http_status, dict(e.headers), e.to_dict()
    elif isinstance(e, RateLimitExceeded):
        status = 429
        headers = {"Retry-After": str(security.retry_after_seconds(current_app.extensions["twin_limiter"]))}
        body = {"code": "rate_limited", "message": f"too many requests to {request.path}: the limit is "
                                                   f"{e.description} per caller; retry after {headers['Retry-After']} s"}
    elif isinstance(e, HTTPException):
        status, headers, body = _http_error(e)
    else:
        status, headers = 500, {}
        body = {"code": "internal_error", "message": "an internal error occurred; the request id names it in the log"}
        log.error("unhandled error", extra={"traceback": traceback.format_exc()})
    if len(body.get("message") or "") > MAX_MESSAGE_CHARS:  # e.g. a 100 kB unknown field name, echoed
        body["message"] = body["message"][:MAX_MESSAGE_CHARS] + "… (truncated)"
    return json_response(status, {"error": body}, headers)


def _http_error(e: HTTPException) -> tuple[int, dict, dict]:
    settings = runtime().settings
    status, headers = e.code or 500, {}
    message = e.description or e.name
    if status == 413 and request.path == "/generate":
        message = f"the JSON body is larger than TWIN_MAX_JSON_KB={settings.max_json_kb:g} kB"
    elif status == 413:
        message = (f"the request is larger than TWIN_MAX_UPLOAD_MB={settings.max_upload_mb:g} MB "
                   f"(or has more than {settings.max_selfies} files)")
    elif status == 400 and request.is_json:
        message = "the body is not valid JSON"
    if status == 405 and getattr(e, "valid_methods", None):
        headers["Allow"] = ", ".join(e.valid_methods)
    return status, headers, {"code": _HTTP_CODES.get(status, "http_error"), "message": message}
