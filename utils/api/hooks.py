"""Per-request context: the request id, the log context, the caller check before the body is read, the
security headers and the request log line."""
from __future__ import annotations

import logging
import time
import uuid

from flask import g, request

from utils.api.context import caller, runtime
from utils.logging import job_id_var, request_id_var, session_id_var

log = logging.getLogger("twin.app")

# Endpoints that touch a caller's sessions and jobs (API key or client token decides what they see).
OWNED_ENDPOINTS = frozenset({"sessions.upload", "jobs.generate", "jobs.status", "jobs.events", "jobs.preview",
                             "jobs.cancel", "jobs.download", "sessions.delete_session"})


def start_request() -> None:
    g.t0 = time.perf_counter()
    rid = request.headers.get("X-Request-Id", "")
    rid = rid if rid.isascii() and 0 < len(rid) <= 64 and rid.replace("-", "").isalnum() else uuid.uuid4().hex
    g.request_id = rid
    request_id_var.set(rid)
    session_id_var.set(None)
    job_id_var.set(None)
    if runtime().settings.api_key_list and request.endpoint in OWNED_ENDPOINTS:
        caller()  # 401 before the body is looked at: no parsing work for a caller without a key


def finish_request(resp):
    resp.headers["X-Request-Id"] = g.get("request_id", "")
    # Browsers must not sniff a served file into another type, and no shared cache (RunPod's proxy)
    # may keep a caller's portraits, job records or session answers.
    resp.headers["X-Content-Type-Options"] = "nosniff"
    if request.endpoint in OWNED_ENDPOINTS:
        resp.headers["Cache-Control"] = "private, no-store"
    if request.path != "/health" and not request.path.startswith("/static"):
        log.info("request", extra={"method": request.method, "path": request.path, "status": resp.status_code,
                                   "ms": round((time.perf_counter() - g.get("t0", time.perf_counter())) * 1000, 2)})
    return resp
