"""The GPU worker process of cluster mode (``./start_worker.sh`` = ``python -m utils.service.gpu_worker``),
one per GPU: a Runtime that holds the models (utils/service/wiring.py), then RQ's queues
(utils/jobs/cluster/worker.py ``serve``). The engine runs in this process: the GPU worker serves no HTTP,
and nothing waits on its GIL but the heartbeat thread, which the switch interval serves."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys

from utils.config import Settings
from utils.errors import ConfigError
from utils.logging import configure_logging
from utils.service import wiring
from utils.service.status import device_info

log = logging.getLogger("twin.worker")


def build_runtime(settings: Settings, components: str = ""):
    """The GPU worker's Runtime. ``components``: ``module:function`` returning (engine, faces) or (engine,
    faces, safety) instead of the real ones from the settings (tests pass their doubles)."""
    engines = faces = safety = None
    if components:
        mod, _, attr = components.partition(":")
        built = getattr(importlib.import_module(mod), attr)(settings)
        engine, faces = built[0], built[1]
        safety = built[2] if len(built) > 2 else None
        engines = [engine]
    runtime = wiring.build_runtime(settings, engines=engines, faces=faces, gpu_worker=True, safety=safety)
    # The cluster-wide retention sweep may run in this process: a swept session's Idempotency-Key
    # records (in Redis) go with it, as they do when an API node deletes the session.
    runtime.sessions.deleted_hooks.append(
        wiring.build_idempotency(settings, runtime.store).forget_session)
    return runtime


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Digital-twin GPU worker (cluster mode, TWIN_QUEUE_URL)")
    ap.add_argument("--components", default="",
                    help="module:function returning (generator, faces[, safety]); default: the real engines from settings "
                         "(tests pass their doubles here)")
    ap.add_argument("--name", default="", help="RQ worker name (default HOST.PID)")
    ap.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from utils.jobs.cluster.worker import serve
    args = _parse_args(argv)
    settings = Settings.from_env()
    if not settings.cluster:
        print("[worker] TWIN_QUEUE_URL is not set: a GPU worker only exists in cluster mode", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    settings = settings.replace(generator_process=False, workers=1)
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    try:
        runtime = build_runtime(settings, args.components)
    except ConfigError as e:   # e.g. the bucket refused the credentials: one line naming the setting
        print(f"[worker] {e.message}", file=sys.stderr)
        return 2
    runtime.start()
    if not runtime.wait_ready():
        log.error("GPU worker set-up failed", extra={"error": runtime.setup_error})
        runtime.shutdown()
        return 1
    engine = runtime.engines[0]
    name = args.name or f"{socket.gethostname()}.{os.getpid()}"
    try:
        serve(runtime, engine, name, device_info(runtime.model_info().get("device")), burst=args.burst)
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
