"""gunicorn settings: ONE worker process (the models and job threads live in it), gthread threads for
concurrent requests. Host/port come from TWIN_HOST/TWIN_PORT (validated again by Settings)."""
import os

bind = f"{os.environ.get('TWIN_HOST', '127.0.0.1')}:{os.environ.get('TWIN_PORT', '5000')}"
workers = 1
worker_class = "gthread"
# Model loading happens in a background thread, so the worker answers /health at once; a long
# generation runs in a job thread and never blocks the heartbeat.
timeout = 120
# SIGTERM (systemctl stop, a deploy): the worker stops taking new work, gives the running job
# TWIN_DRAIN_SECONDS to finish, re-queues it otherwise, and exits 0 (utils/jobs/lifecycle.py). The
# arbiter SIGKILLs a worker still alive after graceful_timeout: keep it above the drain window.
from utils.config import Settings  # noqa: E402 - light: stdlib only

_drain_seconds = float(os.environ.get("TWIN_DRAIN_SECONDS") or Settings.drain_seconds)
# Each open GET /events stream holds a thread for its lifetime (a blocked thread costs no CPU): keep 8
# threads for ordinary requests above the stream limit, so open streams never starve /status.
_max_streams = int(os.environ.get("TWIN_MAX_EVENT_STREAMS") or Settings.max_event_streams)
threads = int(os.environ.get("GUNICORN_THREADS") or _max_streams + 8)
graceful_timeout = int(_drain_seconds) + 10
keepalive = 5
accesslog = None  # the app logs every request as a JSON line
errorlog = "-"
loglevel = os.environ.get("TWIN_LOG_LEVEL", "info").lower()
# gunicorn ≥ 24's control socket lives at one path per user (~/.gunicorn/gunicorn.ctl): two servers on
# one box (tests, a restart overlapping the old process) would fight over it, and nothing here uses it.
control_socket_disable = True


def post_worker_init(worker):
    from utils.jobs import lifecycle
    lifecycle.install_sigterm_drain(worker)


def worker_exit(server, worker):
    # Runs in the worker after its request loop ended (and, harmlessly, in the arbiter when it reaps a
    # worker: no runtime is registered there).
    from utils.jobs import lifecycle
    lifecycle.drain_all()
