"""Graceful stop under gunicorn (or any host that sends SIGTERM).

Policy: on SIGTERM the server stops taking new work at once (``/generate`` and ``/upload`` answer 503
``shutting_down`` with ``Retry-After``; ``/status`` and downloads keep working), the job threads take
no further job from the queue, and the running job gets ``TWIN_DRAIN_SECONDS`` (from the signal) to
finish. A job still running then is stopped at its next denoising step and put back in the queue
(``queued``, progress reset, the attempt not counted). Queued jobs stay queued in SQLite and run, in
order, after the restart. The process then exits 0.

gunicorn wiring (``gunicorn.conf.py``): ``post_worker_init`` wraps the gunicorn worker's SIGTERM handler
with ``begin_drain_all`` (flags only: safe in a signal handler); ``worker_exit`` runs ``drain_all`` after
gunicorn has finished the in-flight requests. gunicorn's ``graceful_timeout`` must exceed
``TWIN_DRAIN_SECONDS`` or the arbiter SIGKILLs the gunicorn worker first (start-up recovery then settles the job
as after a crash: ``interrupted``, or re-queued with ``TWIN_REQUEUE_INTERRUPTED=1``).
"""
from __future__ import annotations

import logging
import signal
import threading
import weakref

log = logging.getLogger("twin.lifecycle")

_runtimes: "weakref.WeakSet" = weakref.WeakSet()
_lock = threading.Lock()


def register(runtime) -> None:
    with _lock:
        _runtimes.add(runtime)


def unregister(runtime) -> None:
    with _lock:
        _runtimes.discard(runtime)


def runtimes() -> list:
    with _lock:
        return list(_runtimes)


def begin_drain_all() -> None:
    # No lock and no logging here: this runs inside a signal handler on the main thread.
    for rt in list(_runtimes):
        rt.begin_drain()


def drain_all() -> list[dict]:
    out = []
    for rt in runtimes():
        try:
            out.append(rt.drain())
        except Exception:  # noqa: BLE001 - the process is exiting; recovery at the next start settles the rest
            log.exception("drain failed")
    return out


def install_sigterm_drain(worker=None) -> None:
    """Wrap the current SIGTERM handler (gunicorn's worker.handle_exit) so the app starts draining the
    moment the signal arrives, while gunicorn finishes its in-flight requests."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        begin_drain_all()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn sets it: do not break active requests' syscalls
