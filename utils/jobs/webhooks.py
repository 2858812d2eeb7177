"""Signed webhooks for jobs: ``webhook`` (URL) and ``webhook_events`` on POST /generate.

Deliveries follow the Standard Webhooks spec, signed by the maintained ``standardwebhooks`` package:
headers ``webhook-id`` (the same on every retry of one message), ``webhook-timestamp`` and
``webhook-signature`` (HMAC-SHA256 with TWIN_WEBHOOK_SECRET); body ``{"type", "timestamp", "data"}``
with type ``job.start`` | ``job.progress`` | ``job.output`` | ``job.completed``.

Delivery is at least once and in order per job: each job with a webhook gets one delivery thread that
sends its messages one after another, retrying a 5xx, 408, 429 or a network error/timeout with exponential
backoff (TWIN_WEBHOOK_MAX_ATTEMPTS), never a 4xx. Generation never waits on it: the job store's
listener only appends to the job's queue. Every attempt (event, attempt, HTTP status or error, time) is
recorded with the job and shown in its JSON under ``webhook.deliveries``.

SSRF: the target is resolved before anything is sent; any address that is private, loopback,
link-local, multicast, reserved or unspecified is refused (400 at submit, naming the host and address)
unless TWIN_WEBHOOK_ALLOW_PRIVATE=1, and resolved and checked again before every attempt (DNS
rebinding). Plain http is accepted only with that setting (local receivers while developing).
"""
from __future__ import annotations

import collections
import ipaddress
import json
import logging
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

from utils import errors
from utils.request_fields import Field

log = logging.getLogger("twin.webhooks")

EVENTS = ("start", "progress", "output", "completed")
DEFAULT_EVENTS = ("start", "output", "completed")

WEBHOOK_FIELDS: tuple[Field, ...] = (
    Field("webhook", "string", "https URL that receives signed job events (Standard Webhooks).", max_length=2048),
    Field("webhook_events", "array", "Which events to send; default start, output, completed.",
          enum=EVENTS, max_items=len(EVENTS)),
)


class WebhookRefused(errors.InvalidRequest):
    code = "webhook_refused"


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise WebhookRefused(f"webhook host {host!r} does not resolve ({e})") from None
    return sorted({info[4][0] for info in infos})


def _forbidden(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global)


def check_target(url: str, *, allow_private: bool, resolver: Resolver = resolve) -> str:
    """The URL if it may be called; WebhookRefused naming why otherwise (no connection is made)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise WebhookRefused(f"webhook={url[:200]!r} is not a URL ({e})") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise WebhookRefused(f"webhook={url[:200]!r} must be an https:// URL")
    if parts.scheme == "http" and not allow_private:
        raise WebhookRefused(f"webhook={url[:200]!r} must use https (http only with TWIN_WEBHOOK_ALLOW_PRIVATE=1)")
    if parts.username or parts.password:
        raise WebhookRefused("webhook URLs must not carry a user name or password")
    host = parts.hostname
    addrs = resolver(host, port)
    if not addrs:
        raise WebhookRefused(f"webhook host {host!r} does not resolve")
    if not allow_private:
        bad = [a for a in addrs if _forbidden(a)]
        if bad:
            raise WebhookRefused(f"webhook host {host!r} resolves to {bad[0]}, a private, loopback or link-local "
                                 "address; such targets are refused (TWIN_WEBHOOK_ALLOW_PRIVATE=1 allows them)")
    return url


class WebhookDispatcher:
    """Queues each job's events and delivers them from one thread per job with a webhook."""

    def __init__(self, settings, store, *, resolver: Resolver = resolve, sleep=time.sleep) -> None:
        self.settings = settings
        self.store = store
        self.resolver = resolver
        self.sleep = sleep
        self._lock = threading.Lock()
        self._queues: dict[str, collections.deque] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._seq: dict[str, int] = collections.defaultdict(int)   # message ids stay unique per job
        self._hooks: dict[str, dict | None] = {}
        self._attempt: dict[str, int] = {}   # message ids carry the attempt: a re-run (another GPU worker) never reuses one
        self._stop = threading.Event()
        self._signer = None
        if settings.webhook_secret:
            from standardwebhooks.webhooks import Webhook
            self._signer = Webhook(settings.webhook_secret)

    # --- submit time ---
    def parse(self, payload: dict) -> dict | None:
        """Pops and checks the webhook fields of a /generate body; the job's webhook record or None."""
        from utils.request_fields import validate_payload
        given = {f.name: payload.pop(f.name) for f in WEBHOOK_FIELDS if f.name in payload}
        values = validate_payload(WEBHOOK_FIELDS, given, self.settings)
        if values["webhook"] is None:
            if values["webhook_events"] is not None:
                raise errors.InvalidRequest("webhook_events needs a webhook URL")
            return None
        if self._signer is None:
            raise errors.InvalidRequest("webhooks are off on this server (TWIN_WEBHOOK_SECRET is not set)",
                                        code="webhooks_disabled")
        check_target(values["webhook"], allow_private=self.settings.webhook_allow_private, resolver=self.resolver)
        events = values["webhook_events"] if values["webhook_events"] is not None else list(DEFAULT_EVENTS)
        return {"url": values["webhook"], "events": events, "deliveries": []}

    # --- job events (JobStore listener; must not block) ---
    def on_job_event(self, job_id: str, kind: str, data: dict) -> None:
        if kind == "deleted":
            with self._lock:
                self._queues.pop(job_id, None)
                self._hooks.pop(job_id, None)
                self._seq.pop(job_id, None)
                self._attempt.pop(job_id, None)
            return
        if kind == "status":
            hook = data.get("webhook")
            with self._lock:
                self._hooks[job_id] = hook
                self._attempt[job_id] = int(data.get("attempts") or 0)
            event = {"running": "start", "succeeded": "completed", "failed": "completed",
                     "canceled": "completed"}.get(data["status"])
        else:
            with self._lock:
                hook = self._hooks.get(job_id)
            if hook is None and job_id not in self._hooks:  # not seen since a restart
                job = self.store.get(job_id)
                hook = job.get("webhook") if job else None
            event = kind  # progress | output
        if not hook or event is None or event not in hook["events"]:
            return
        body_data = {"job_id": job_id, **({k: v for k, v in data.items() if k not in ("path", "raw_path", "thumbnail_path")}
                                          if kind != "status"
                                          else {"status": data["status"], "error": _error(data),
                                                "outputs": [o["filename"] for o in data["outputs"] if o.get("filename")],
                                                "safety": [_safety_row(o) for o in data["outputs"]]})}
        with self._lock:
            self._seq[job_id] += 1
            msg = {"id": f"msg_{job_id}_{self._attempt.get(job_id, 0)}_{self._seq[job_id]}", "event": event,
                   "url": hook["url"],
                   "body": {"type": f"job.{event}", "timestamp": _now_iso(), "data": body_data}}
            self._queues.setdefault(job_id, collections.deque()).append(msg)
            t = self._threads.get(job_id)
            if t is None or not t.is_alive():
                t = threading.Thread(target=self._deliver_job, args=(job_id,), name=f"webhook-{job_id[:6]}",
                                     daemon=True)
                self._threads[job_id] = t
                t.start()

    def close(self) -> None:
        self._stop.set()

    def idle(self) -> bool:
        with self._lock:
            return not any(self._queues.values()) and not any(t.is_alive() for t in self._threads.values())

    # --- delivery ---
    def _deliver_job(self, job_id: str) -> None:
        while not self._stop.is_set():
            with self._lock:
                q = self._queues.get(job_id)
                if not q:
                    self._queues.pop(job_id, None)
                    self._threads.pop(job_id, None)
                    return
                msg = q[0]
            self._deliver(job_id, msg)
            with self._lock:
                q = self._queues.get(job_id)
                if q and q[0] is msg:
                    q.popleft()
                if msg["event"] == "completed":  # the job's last message: nothing more will come
                    self._hooks.pop(job_id, None)
                    self._seq.pop(job_id, None)
                    self._attempt.pop(job_id, None)

    def _deliver(self, job_id: str, msg: dict) -> None:
        import requests
        s = self.settings
        payload = json.dumps(msg["body"], separators=(",", ":"))
        for attempt in range(1, s.webhook_max_attempts + 1):
            if self._stop.is_set():
                return
            record: dict[str, Any] = {"event": msg["event"], "message_id": msg["id"], "attempt": attempt,
                                      "at": _now_iso()}
            retry = False
            try:
                check_target(msg["url"], allow_private=s.webhook_allow_private, resolver=self.resolver)
                ts = datetime.now(tz=timezone.utc)
                headers = {"content-type": "application/json", "webhook-id": msg["id"],
                           "webhook-timestamp": str(int(ts.timestamp())),
                           "webhook-signature": self._signer.sign(msg["id"], ts, payload)}
                resp = requests.post(msg["url"], data=payload.encode(), headers=headers,
                                     timeout=s.webhook_timeout_seconds, allow_redirects=False)
                record["status"] = resp.status_code
                retry = resp.status_code >= 500 or resp.status_code in (408, 429)
            except WebhookRefused as e:
                record["error"] = e.message  # the name now points somewhere forbidden: never retried there
            except requests.RequestException as e:
                record["error"] = type(e).__name__
                retry = True
            if self._stop.is_set():
                return  # the server is stopping: the store is closing; the message stays undelivered
            try:
                self.store.add_webhook_delivery(job_id, record)
            except Exception:  # noqa: BLE001 - the record is a report; delivery goes on
                log.exception("could not record a webhook delivery")
            if not retry:
                return
            if attempt < s.webhook_max_attempts:
                self.sleep(s.webhook_retry_base_seconds * 2 ** (attempt - 1))
        log.warning("webhook delivery gave up", extra={"job_id": job_id, "event": msg["event"],
                                                       "attempts": s.webhook_max_attempts})


def _error(job: dict) -> dict | None:
    return {"code": job["error_code"], "message": job["error_message"]} if job.get("error_code") else None


def _safety_row(output: dict) -> dict:
    """One output's safety verdict in the completed event (a blocked image has no file name, its index)."""
    return {"filename": output.get("filename"), "index": output.get("index"), **(output.get("safety") or {})}


def _now_iso() -> str:
    return datetime.now(tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
