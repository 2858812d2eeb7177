"""``GET /events/<job_id>``: a job's live events as Server-Sent Events (text/event-stream).

Each event carries ``id:`` (dense per job, from 1), ``event:`` (status | progress | output | done) and
one JSON ``data:`` line. A client that reconnects with ``Last-Event-ID: N`` gets every event after N,
once. An idle stream gets a ``: heartbeat`` comment every TWIN_EVENT_HEARTBEAT_SECONDS. The stream
ends after ``done`` (or when the job's session is deleted, or the server stops).

Each open stream holds one server thread (gunicorn gthread), so at most TWIN_MAX_EVENT_STREAMS are open
at once; beyond that the request is refused with 429 + Retry-After before any thread is held.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

from utils import errors
from utils.api.render import public_output
from utils.jobs.events import Event, format_sse

# A stream re-checks the job (deleted session, server stop) at least this often while idle.
_RECHECK_SECONDS = 1.0


class TooManyStreams(errors.TwinError):
    code = "too_many_streams"
    http_status = 429

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


def parse_last_event_id(value: str | None) -> int:
    """The Last-Event-ID a client sent (0 = from the start); anything else is a 400 naming it."""
    if value is None or value == "":
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise errors.InvalidRequest(f"Last-Event-ID={value[:40]!r} is not an event id (a non-negative integer)")
    return int(value)


class EventStream:
    """The response body: an iterable whose ``close()`` (called by the WSGI server when the response
    ends, the client went away, or even if iteration never started) gives the stream slot back."""

    def __init__(self, runtime, job: dict, after: int, render: Callable[[Event, dict], dict],
                 slot: threading.BoundedSemaphore) -> None:
        self.runtime, self.job_id, self.after = runtime, job["id"], after
        self.job = job
        self.render = render
        self._slot: threading.BoundedSemaphore | None = slot
        self.heartbeat = runtime.settings.event_heartbeat_seconds

    def close(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._events()
        finally:
            self.close()

    def _events(self) -> Iterator[str]:
        rt, job_id = self.runtime, self.job_id
        yield "retry: 2000\n\n"
        if not rt.events.known(job_id):
            # No live log: the job ended long ago (logs of finished jobs are forgotten) or before a
            # restart. Its final state, as two events; a live job always has a log (Runtime.start).
            job = rt.store.get(job_id)
            if job is None:
                return
            if job["status"] in ("succeeded", "failed", "canceled"):
                for ev in (Event(1, "status", job), Event(2, "done", job)):
                    if ev.id > self.after:
                        yield format_sse(Event(ev.id, ev.type, self.render(ev, job)))
                return
        last_write = time.monotonic()
        while not rt.stopping:
            evs = rt.events.read(job_id, self.after, timeout=min(self.heartbeat, _RECHECK_SECONDS))
            for ev in evs:
                if ev.type in ("status", "done"):
                    self.job = ev.data
                yield format_sse(Event(ev.id, ev.type, self.render(ev, self.job)))
                self.after = ev.id
                last_write = time.monotonic()
                if ev.type == "done":
                    return
            if evs:
                continue
            job = rt.store.get(job_id)
            if job is None:  # its session was deleted
                return
            if job["status"] in ("succeeded", "failed", "canceled") and not rt.events.read(job_id, self.after):
                return  # a client that resumed past the last event of a finished job: nothing more will come
            if time.monotonic() - last_write >= self.heartbeat:
                yield ": heartbeat\n\n"
                last_write = time.monotonic()


def render_event(ev: Event, job: dict, *, render_job: Callable[[dict], dict],
                 output_url: Callable[[str, str], str]) -> dict[str, Any]:
    """An event's JSON: status/done carry the job JSON; progress its step, total, fraction and ETA;
    output the output entry with its download URL (never the server path)."""
    if ev.type in ("status", "done"):
        return render_job(ev.data)
    if ev.type == "progress":
        step, total = ev.data["step"], ev.data["total"]
        eta = None
        started = job.get("started_at")
        if started and step > 0 and total:  # as it was when the step ended (a replayed event keeps its ETA)
            eta = round(max(0.0, ev.data.get("at", time.time()) - started) / step * (total - step), 2)
        extra = {k: v for k, v in ev.data.items() if k not in ("step", "total", "at")}  # a training's loss
        return {"job_id": job["id"], "step": step, "total": total,
                "fraction": round(step / total, 4) if total else 0.0, "eta_seconds": eta, **extra}
    if ev.type == "preview":
        return {"job_id": job["id"], **ev.data}
    if ev.type == "output":
        return {"job_id": job["id"], **public_output(job["id"], ev.data, output_url)}
    return dict(ev.data)
