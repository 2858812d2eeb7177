"""Job events for live progress (``GET /events/<job_id>``): status, progress, output, done.

``Event`` and ``format_sse`` are what every event source shares (the ``EventLog`` contract of
``utils.contracts``). ``MemoryEventLog`` is local mode's source, in the API process: the job store
reports each change (``JobStore.listeners``) and the log keeps, per job, a numbered list of events that
streams read from any position (``read(job_id, after=last_event_id)``), so a client that reconnects with
``Last-Event-ID`` gets every event it missed exactly once. Cluster mode's source is
``utils.jobs.cluster.events.RedisEventLog`` (Redis streams), so any API node serves any job.

Memory is bounded: at most ``max_events_per_job`` per job (progress events beyond it are dropped, a
status/output/done never is) and the logs of finished jobs are forgotten ``keep_seconds`` after the end.
A stream for a job the log no longer has gets its current state from the store instead (app.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

TERMINAL_TYPES = frozenset({"done"})


@dataclass(frozen=True)
class Event:
    id: int
    type: str          # status | progress | output | done
    data: dict[str, Any]


class _JobLog:
    __slots__ = ("events", "finished_at", "next_id")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.finished_at: float | None = None
        self.next_id = 1


class MemoryEventLog:
    """The in-process ``EventLog`` (local mode; see the module doc)."""

    def __init__(self, *, max_events_per_job: int = 2000, keep_seconds: float = 600.0, clock=time.monotonic) -> None:
        self._logs: dict[str, _JobLog] = {}
        self._previews: dict[str, tuple[int, bytes]] = {}  # job -> (step, JPEG) of its latest live preview
        self._cond = threading.Condition()
        self.max_events_per_job = max_events_per_job
        self.keep_seconds = keep_seconds
        self._clock = clock

    def publish(self, job_id: str, type_: str, data: dict[str, Any]) -> int | None:
        """Append an event; returns its id (None when a progress event was dropped at the cap)."""
        with self._cond:
            self._expire()
            log = self._logs.get(job_id)
            if log is None:
                log = self._logs[job_id] = _JobLog()
            if type_ == "progress" and len(log.events) >= self.max_events_per_job:
                return None
            ev = Event(log.next_id, type_, data)
            log.next_id += 1
            log.events.append(ev)
            if type_ in TERMINAL_TYPES:
                log.finished_at = self._clock()
            elif log.finished_at is not None and type_ == "status":
                log.finished_at = None  # re-queued after a terminal state cannot happen, but never forget a live job
            self._cond.notify_all()
            return ev.id

    def known(self, job_id: str) -> bool:
        with self._cond:
            return job_id in self._logs

    def read(self, job_id: str, after: int = 0, timeout: float = 0.0) -> list[Event]:
        """Events with id > after; waits up to ``timeout`` seconds for the first one."""
        deadline = self._clock() + timeout
        with self._cond:
            while True:
                log = self._logs.get(job_id)
                if log is not None:
                    # Ids are dense from 1 (an event dropped at the cap takes no id): event n is at index n-1.
                    out = log.events[max(0, after):]
                    if out:
                        return out
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def forget(self, job_id: str) -> None:
        """Drop a job's events (its session was deleted: prompts and outputs must not linger here)."""
        with self._cond:
            self._logs.pop(job_id, None)
            self._previews.pop(job_id, None)
            self._cond.notify_all()

    # --- the latest live preview of a running job (GET /preview) ---
    def set_preview(self, job_id: str, step: int, jpeg: bytes) -> None:
        self._previews[job_id] = (step, jpeg)

    def get_preview(self, job_id: str) -> tuple[int, bytes] | None:
        return self._previews.get(job_id)

    def drop_preview(self, job_id: str) -> None:
        self._previews.pop(job_id, None)

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _expire(self) -> None:
        now = self._clock()
        old = [j for j, log in self._logs.items()
               if log.finished_at is not None and now - log.finished_at > self.keep_seconds]
        for j in old:
            del self._logs[j]


def format_sse(event: Event) -> str:
    import json
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data, separators=(',', ':'))}\n\n"
