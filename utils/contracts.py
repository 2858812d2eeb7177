"""The contracts between the service and its job backends, as ``typing.Protocol``s.

Local mode and cluster mode implement each of them (``utils.services`` picks one from the settings):

    JobStore          utils.jobs.local.store.SqliteJobStore       utils.jobs.cluster.store.RedisJobStore
    JobQueue          utils.jobs.local.threads.JobThreads         utils.jobs.cluster.queue.RqJobQueue
    EventLog          utils.jobs.events.MemoryEventLog            utils.jobs.cluster.events.RedisEventLog
    IdempotencyStore  utils.jobs.local.idempotency.SqliteIdempotencyStore
                                                                  utils.jobs.cluster.idempotency.RedisIdempotencyStore

Each protocol lists only what callers use. A capability only one backend has is its own small protocol
(``Reachable``, ``ClusterStatus``, ``ClusterSingleton``, ``ModelRouting``), so a caller asks
``isinstance(x, ClusterStatus)`` instead of probing attribute names. All are ``runtime_checkable``:
``isinstance`` checks that the members exist; tests/test_contracts.py also checks their signatures.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    from utils.jobs.events import Event
    from utils.jobs.status import JobStatus

# listener(job_id, kind, data): kind "status" (data: the job record), "progress" ({step, total, at}),
# "output" (the output entry) or "deleted" ({}); called after each committed change of a job.
JobListener = Callable[[str, str, dict], None]


@runtime_checkable
class JobStore(Protocol):
    """Sessions and job records: the truth about every job, whichever process runs it."""

    listeners: list[JobListener]

    def close(self) -> None: ...

    # --- sessions ---
    def add_session(self, session_id: str, owner: str, created_at: float) -> None: ...
    def get_session(self, session_id: str) -> dict | None: ...
    def latest_session(self, owner: str) -> dict | None: ...
    def sessions_older_than(self, cutoff: float) -> list[str]: ...
    def delete_session_records(self, session_id: str) -> None: ...

    # --- jobs ---
    def create_job(self, job_id: str, *, session_id: str | None, owner: str, payload: dict,
                   request: dict, queue_max: int, webhook: dict | None = None) -> dict:
        """Insert a queued job unless the queue is full (``errors.QueueFull``)."""

    def get(self, job_id: str) -> dict | None: ...

    def position(self, job: dict) -> int | None:
        """1-based place among queued jobs; None once it is not waiting (claimed, finished)."""

    def queued_ids(self) -> list[str]: ...
    def active_ids_for_session(self, session_id: str) -> list[str]: ...
    def counts(self) -> dict[str, int]: ...

    def claim(self, job_id: str) -> bool:
        """queued -> running (attempt + 1); False when it was canceled or taken meanwhile."""

    def set_progress(self, job_id: str, step: int, total: int) -> None: ...
    def add_output(self, job_id: str, output: dict) -> None: ...
    def add_webhook_delivery(self, job_id: str, record: dict, keep: int = 50) -> None: ...

    def finish(self, job_id: str, status: JobStatus, *, code: str | None = None, message: str | None = None,
               metadata: dict | None = None) -> bool:
        """Move a non-terminal job to a terminal state (never overwrites a terminal one)."""

    def cancel_queued(self, job_id: str) -> bool: ...

    def requeue(self, job_id: str) -> bool:
        """running -> queued for a graceful stop; the attempt is given back."""

    def recover(self, requeue: bool) -> dict[str, list[str]]:
        """Settle jobs that were running when the process died: {"requeued": [...], "failed": [...]}."""


@runtime_checkable
class Reachable(Protocol):
    """A store behind a network connection (cluster mode's Redis): /health asks whether it answers."""

    def ping(self) -> bool:
        """True, or ``errors.ServiceNotReady`` (503 queue_unavailable) when it does not answer."""


@runtime_checkable
class JobQueue(Protocol):
    """Gets queued jobs run: local mode's job threads, or the RQ queue that GPU workers work."""

    def start(self, requeue_interrupted: bool = False) -> dict[str, list[str]]: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def submit(self, job_id: str) -> None: ...

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or ask a running one to stop at its next step."""

    def depth(self) -> int: ...

    # --- graceful stop ---
    def begin_drain(self) -> None:
        """Start no new job (cheap and lock-free: it runs inside the SIGTERM handler)."""

    @property
    def draining(self) -> bool: ...

    def running_ids(self) -> list[str]:
        """Jobs this process is running now."""

    def drain(self, deadline: float, stop_wait: float = 5.0) -> dict[str, list[str]]:
        """Let running jobs finish until ``deadline``, then re-queue them: {"finished", "requeued"}."""


@runtime_checkable
class ClusterStatus(Protocol):
    """A queue worked by other machines: /system-status shows its backend, length and workers."""

    def cluster_status(self) -> dict[str, Any]: ...


@runtime_checkable
class ClusterSingleton(Protocol):
    """Work that several processes schedule but one should do per interval (the retention sweep)."""

    def acquire_singleton(self, name: str, ttl_s: float) -> bool:
        """True for exactly one caller in the cluster per ``ttl_s``."""


@runtime_checkable
class ModelRouting(Protocol):
    """A queue that routes jobs to workers by base model (GET /models, POST /models/load, pinned jobs)."""

    def models_catalogue(self) -> dict: ...

    def check_model(self, model: str) -> None:
        """4xx unless some live GPU worker holds (or is loading) ``model``."""

    def load_model(self, model: str, workers: list[str] | None = None) -> dict: ...


@runtime_checkable
class EventLog(Protocol):
    """Live events of jobs (GET /events) and the latest preview of a running one (GET /preview)."""

    def publish(self, job_id: str, type_: str, data: dict[str, Any]) -> int | None:
        """Append an event; its id (dense per job, from 1), None when a progress event was dropped."""

    def read(self, job_id: str, after: int = 0, timeout: float = 0.0) -> list[Event]:
        """Events with id > after; waits up to ``timeout`` seconds for the first one."""

    def known(self, job_id: str) -> bool: ...

    def forget(self, job_id: str) -> None:
        """Drop a job's events and preview (its session was deleted)."""

    def set_preview(self, job_id: str, step: int, jpeg: bytes) -> None: ...
    def get_preview(self, job_id: str) -> tuple[int, bytes] | None: ...
    def drop_preview(self, job_id: str) -> None: ...

    def wake_all(self) -> None:
        """Wake blocked readers (the server is stopping)."""


@runtime_checkable
class IdempotencyStore(Protocol):
    """The Idempotency-Key records of POST /generate and POST /upload (per caller, endpoint and key)."""

    def begin(self, owner: str, endpoint: str, key: str, fp: str) -> tuple[int, dict, dict] | None:
        """None: go ahead (the key is now in flight); else (status, body, headers) to answer again.
        Raises ``KeyReused`` (another request) or ``InFlight`` (still being answered)."""

    def complete(self, owner: str, endpoint: str, key: str, status: int, body: dict, headers: dict,
                 session_id: str | None) -> None: ...

    def abandon(self, owner: str, endpoint: str, key: str) -> None:
        """The request failed: forget the key, so a retry runs again."""

    def forget_session(self, session_id: str) -> None: ...
    def close(self) -> None: ...

    def count(self) -> int:
        """Records kept (in flight or done)."""
