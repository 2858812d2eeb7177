"""Cluster mode's GPU worker (``./start_worker.sh`` = ``python -m utils.jobs.rq_worker``).

One process per GPU: it builds the same ``Runtime`` an API node builds (so a job runs exactly the code
it runs in local mode: ``Runtime._run_job``), loads the models once, and then works RQ's queue in a
``SimpleWorker`` subclass (no fork per job: CUDA state does not survive a fork). What the subclass adds
(measured reasons in DESIGN.md section 5):

- a heartbeat thread renews the worker's and the running job's heartbeat every
  TWIN_WORKER_HEARTBEAT_SECONDS with a short TTL, so a SIGKILLed worker's job is seen as abandoned in
  seconds (stock SimpleWorker: ~74 s) and re-run elsewhere by the cluster maintenance thread;
- cancel: ``kill_horse`` (what RQ's stop-job command calls; a no-op on a stock SimpleWorker) sets this
  job's cancel event, and the step callback also reads the job's Redis cancel key, so a lost pub/sub
  message still cancels within one step. A canceled job returns normally: it is never retried;
- outcomes are written to the app's record by ``perform`` (failed / canceled / succeeded); only a dead
  worker makes RQ re-run a job. A record that is already terminal is never overwritten, and an attempt
  that finds its record terminal does nothing (rq#2424: success wins);
- SIGTERM: the running job finishes (RQ's warm shutdown); past TWIN_DRAIN_SECONDS it is stopped at its
  next step and re-queued without counting the attempt; then the process exits 0;
- base models (utils/jobs/rq_models.py): the worker publishes its model, catalogue and load state in its
  info hash (a refresher thread keeps it alive), listens on its model's queue before ``twin``, and a
  control thread runs switch commands: load beside, switch between jobs (the generator's load_model),
  then move the queues. RQ's dequeue blocks at most 1 s here, so the new queues are read within a second.
  A pinned job that meets another model (dequeued in the instant of a switch) goes back to its model's
  queue without counting an attempt.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback

from rq import get_current_job
from rq.serializers import JSONSerializer
from rq.exceptions import StopRequested
from rq.worker import SimpleWorker, WorkerStatus
from rq import worker_registration

from utils import errors
from utils.config import Settings
from utils.jobs import rq_models
from utils.jobs.rq_queue import WORKER_INFO, make_model_queue, make_queue
from utils.jobs.store import JobStatus, failure_outcome

log = logging.getLogger("twin.worker")

_worker: "TwinWorker | None" = None


class WorkerDraining(Exception):
    """Raised out of a job stopped by a worker's shutdown, so RQ puts it back on the queue."""


class WrongModel(Exception):
    """Raised out of a pinned job that met another base model (a switch in between), so RQ puts it back
    on its model's queue (its origin) for a worker that holds it."""


def perform(job_id: str) -> None:
    """The RQ job function: run one app job on this worker's runtime and record its outcome."""
    if _worker is None:
        raise RuntimeError("perform() runs only inside a TwinWorker (python -m utils.jobs.rq_worker)")
    return _worker.run_app_job(job_id)


class TwinWorker(SimpleWorker):
    def __init__(self, *args, runtime, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = runtime
        s = runtime.settings
        self.beat_s = s.worker_heartbeat_seconds
        self.beat_ttl = max(2, int(round(s.worker_heartbeat_seconds * 4)))
        self._beat_lock = threading.Lock()
        self._beat_job = None
        self._cancel = threading.Event()
        self._drain_requeue = False
        self._drain_timer: threading.Timer | None = None
        self.stop_asked = False
        self.active_model: str | None = None

    # --- base model: which queues this worker listens to ---
    @property
    def dequeue_timeout(self) -> int:
        # RQ blocks in BLPOP this long before it reads self._ordered_queues again: short, so a switch
        # moves this worker to its new model's queue within a second (RQ's default is worker_ttl - 15).
        return 1

    def listen_for(self, model: str | None) -> None:
        """Listen on ``model``'s queue first, then the shared one (unpinned jobs run on any model)."""
        conn = self.connection
        queues = ([make_model_queue(conn, model)] if model else []) + [make_queue(conn)]
        try:
            worker_registration.unregister(self)
        except Exception:  # noqa: BLE001 - not registered yet (before work()) or Redis blinked
            pass
        self.queues, self._ordered_queues = queues, queues[:]   # the work loop reads them at its next dequeue
        self.active_model = model
        try:
            if self.connection.exists(self.key):
                worker_registration.register(self)
                self.connection.hset(self.key, "queues", ",".join(self.queue_names()))
        except Exception:  # noqa: BLE001
            pass

    # --- heartbeats ---
    def get_heartbeat_ttl(self, job) -> int:
        return self.beat_ttl

    def execute_job(self, job, queue):
        with self._beat_lock:
            self._beat_job = job
        t = threading.Thread(target=self._beat_loop, args=(job,), name="twin-heartbeat", daemon=True)
        t.start()
        try:
            super().execute_job(job, queue)
        finally:
            with self._beat_lock:
                self._beat_job = None

    def handle_execution_ended(self, job, queue, heartbeat_ttl):
        # The job's function returned or raised: no heartbeat may land after RQ starts settling it (a
        # late one would put it back in the StartedJobRegistry and a cleanup would call it abandoned).
        with self._beat_lock:
            self._beat_job = None
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def _beat_loop(self, job) -> None:
        while True:
            time.sleep(self.beat_s)
            with self._beat_lock:
                if self._beat_job is not job:
                    return
                try:
                    if self.execution is not None:
                        self.maintain_heartbeats(job)
                except Exception:  # noqa: BLE001 - Redis away for a moment: the next beat tries again
                    pass

    def subscribe(self):
        """RQ's, with a 1 s read timeout instead of 60 s: closing the pub/sub at exit waits for the
        listener's read to return, and a worker stopped by SIGTERM must exit promptly."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=1, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)

    # --- cancel and stop ---
    def kill_horse(self, sig=signal.SIGTERM):
        """RQ's stop-job command lands here; there is no horse: stop this job at its next step."""
        self._cancel.set()

    def request_stop(self, signum, frame):
        # RQ sets _stop_requested only when busy (idle, it raises StopRequested): main() must know either way.
        self.stop_asked = True
        super().request_stop(signum, frame)
        if self._drain_timer is None and self.get_state() == WorkerStatus.BUSY:
            self._drain_timer = threading.Timer(self.runtime.settings.drain_seconds, self._drain_now)
            self._drain_timer.daemon = True
            self._drain_timer.start()

    def _drain_now(self) -> None:
        self._drain_requeue = True
        self._cancel.set()

    # --- one job ---
    def run_app_job(self, job_id: str) -> None:
        rt = self.runtime
        store = rt.store
        self._cancel.clear()
        if store.cancel_requested(job_id):
            store.finish(job_id, JobStatus.CANCELED, code="canceled", message="canceled by the user")
            return None
        if not store.claim(job_id):
            return None  # canceled while queued, already finished (a re-run after success), or deleted
        job = store.get(job_id)
        if job is None:
            return None
        want = job["payload"].get("model")
        if want and self.active_model and want != self.active_model:
            self._back_to_model_queue(job_id, want)   # dequeued in the instant of a switch away from it
        log.info("job started", extra={"job_id": job_id, "attempt": job["attempts"]})

        def on_progress(step: int, total: int, preview: bytes | None = None) -> None:
            try:
                store.set_progress(job_id, step, total)
            except errors.ServiceNotReady:
                pass  # progress is best effort while Redis restarts
            if preview is not None:
                rt._preview(job_id, step, preview)  # kept in this worker only (see ARCHITECTURE: not done)

        def should_cancel() -> bool:
            return self._cancel.is_set() or store.cancel_requested(job_id)

        t0 = time.perf_counter()
        try:
            metadata = rt._run_job(job, on_progress, should_cancel, 0)
        except errors.JobCanceled:
            if self._drain_requeue:
                store.requeue(job_id)
                rq_job = get_current_job()
                if rq_job is not None:  # not an attempt: give RQ's retry back
                    rq_job.retries_left = (rq_job.retries_left or 0) + 1
                log.info("job re-queued: the worker is stopping", extra={"job_id": job_id})
                raise WorkerDraining(f"worker stopping: job {job_id} re-queued") from None
            store.finish(job_id, JobStatus.CANCELED, code="canceled", message="canceled by the user")
            log.info("job canceled", extra={"job_id": job_id})
            return None
        except errors.TwinError as e:
            if e.code == "model_not_loaded" and want:
                # The generator switched between the check above and the job's start: not the job's fault.
                self._back_to_model_queue(job_id, want)
            self._record_failure(job_id, e)
            return None
        except BaseException as e:  # noqa: BLE001 - a failure is recorded; only a dead worker re-runs a job
            self._record_failure(job_id, e)
            if not isinstance(e, Exception):
                raise
            return None
        store.finish(job_id, JobStatus.SUCCEEDED, metadata=metadata)
        log.info("job succeeded", extra={"job_id": job_id, "seconds": round(time.perf_counter() - t0, 3)})
        return None

    def _back_to_model_queue(self, job_id: str, want: str) -> None:
        """Put a claimed pinned job back (attempt and RQ retry given back) and leave through RQ's retry,
        which re-queues it on its model's queue; no live holder -> maintenance fails it as stranded."""
        self.runtime.store.requeue(job_id)
        rq_job = get_current_job()
        if rq_job is not None:
            rq_job.retries_left = (rq_job.retries_left or 0) + 1
        log.info("pinned job back to its model's queue", extra={"job_id": job_id, "model": want,
                                                                 "active_model": self.active_model})
        raise WrongModel(f"job {job_id} wants model {want!r}; this worker now holds {self.active_model!r}")

    def _record_failure(self, job_id: str, e: BaseException) -> None:
        code, message = failure_outcome(e, rt_is_oom(e))
        self.runtime.store.finish(job_id, JobStatus.FAILED, code=code, message=message)
        if code == "internal_error":
            log.error("job crashed", extra={"job_id": job_id, "traceback": traceback.format_exc()})
        else:
            log.warning("job failed", extra={"job_id": job_id, "error_code": code})


class ModelControl:
    """This worker's entry in the cluster's model registry (rq_models): publishes its info hash and keeps
    it alive (refresher thread), and runs switch commands from ``twin:modelcmd:<name>`` (control thread).
    The load runs beside the serving model; the generator swaps between jobs; then the queues move."""

    def __init__(self, worker: "TwinWorker", generator, name: str, base: dict[str, str]) -> None:
        self.worker, self.gen, self.name = worker, generator, name
        self.conn = worker.connection
        self.ttl = rq_models.live_ttl(worker.runtime.settings)
        self.key = WORKER_INFO + name
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            self.publish(**base, **self._model_fields(), state="idle", target="", error="")
        except Exception:  # noqa: BLE001 - Redis away at start: the refresher publishes once it is back
            pass
        self.base = base

    def _model_fields(self) -> dict[str, str]:
        cat = getattr(self.gen, "models_catalogue", None)
        if not callable(cat):
            return {"model": "", "family": "", "catalogue": "[]", "loras": "[]"}
        c = cat()
        models = getattr(self.gen, "models", None)
        family = getattr(models, "identity_model", None) or _safe_info(self.gen).get("profile") or ""
        return {"model": c.get("active") or "", "family": str(family),
                "catalogue": json.dumps([{k: m.get(k) for k in ("name", "kind", "file")} for m in c["models"]]),
                "loras": json.dumps(list(c.get("loras", [])))}

    @property
    def active(self) -> str | None:
        cat = getattr(self.gen, "models_catalogue", None)
        return (cat().get("active") or None) if callable(cat) else None

    def publish(self, **fields) -> None:
        with self.conn.pipeline() as p:
            p.hset(self.key, mapping={**fields, "seen": repr(time.time())})
            p.expire(self.key, self.ttl)
            p.sadd(rq_models.WORKER_NAMES, self.name)
            p.execute()

    def start(self) -> None:
        for target, label in ((self._refresh_loop, "twin-model-info"), (self._command_loop, "twin-model-control")):
            t = threading.Thread(target=target, name=label, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(3)
        try:
            with self.conn.pipeline() as p:
                p.delete(self.key)
                p.srem(rq_models.WORKER_NAMES, self.name)
                p.execute()
        except Exception:  # noqa: BLE001
            pass

    def _refresh_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                # The whole hash again when it expired (e.g. Redis restarted without it).
                if self.conn.exists(self.key):
                    self.publish()
                else:
                    self.publish(**self.base, **self._model_fields(), state="idle", target="", error="")
            except Exception:  # noqa: BLE001 - Redis away for a moment: the next round tries again
                pass

    def _command_loop(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.conn.blpop([rq_models.COMMANDS + self.name], timeout=1)
            except Exception:  # noqa: BLE001 - Redis away: wait, then read the list again (nothing is lost)
                self._stop.wait(1.0)
                continue
            if got is None:
                continue
            try:
                cmd = json.loads(got[1])
                self.run(str(cmd["id"]), str(cmd["model"]))
            except Exception:  # noqa: BLE001 - a bad command must not end the control thread
                log.error("model command failed", extra={"traceback": traceback.format_exc()})

    def run(self, cmd_id: str, model: str) -> None:
        before = self.active
        load = getattr(self.gen, "load_model", None)
        self.publish(state="loading", target=model)
        t0 = time.perf_counter()
        try:
            if not callable(load):
                raise errors.InvalidRequest("this worker's generator has no model registry", code="not_supported",
                                            http_status=501)
            out = load(model)
        except errors.TwinError as e:
            # The old model keeps serving, on its queues; the answer names the file.
            log.warning("base model load failed", extra={"model": model, "error_code": e.code})
            result = {"id": cmd_id, "model": before, "ok": False, "error": {"code": e.code, "message": e.message}}
            self.publish(state="failed", target="", error=e.message, cmd=json.dumps(result))
            return
        self.worker.listen_for(out["model"])
        result = {"id": cmd_id, "model": out["model"], "previous": out.get("previous", before), "ok": True,
                  "switched": bool(out.get("switched", True)), "swap_s": round(time.perf_counter() - t0, 3),
                  "load_s": out.get("load_s"), "swap_wait_s": out.get("swap_wait_s")}
        self.publish(**self._model_fields(), state="idle", target="", error="", cmd=json.dumps(result))
        log.info("base model switched", extra={"model": out["model"], "previous": result["previous"],
                                               "seconds": result["swap_s"]})


def _safe_info(gen) -> dict:
    try:
        return dict(gen.info())
    except Exception:  # noqa: BLE001
        return {}


def rt_is_oom(e: BaseException) -> bool:
    from utils.services import is_oom
    return is_oom(e)


def _load(spec: str):
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Digital-twin GPU worker (cluster mode, TWIN_QUEUE_URL)")
    ap.add_argument("--components", default="",
                    help="module:function returning (generator, faces); default: the real engines from settings "
                         "(tests pass their doubles here)")
    ap.add_argument("--name", default="", help="RQ worker name (default HOST.PID)")
    ap.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    if not settings.cluster:
        print("[worker] TWIN_QUEUE_URL is not set: a GPU worker only exists in cluster mode", file=sys.stderr)
        return 2
    from utils.logging import configure_logging
    configure_logging(settings.log_level)
    from utils import services
    # The generator runs in this process (one per GPU: the worker serves no HTTP, nothing waits on its GIL
    # but the heartbeat thread, which the switch interval serves).
    settings = settings.replace(generator_process=False, workers=1)
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    if args.components:
        generator, faces = _load(args.components)(settings)
    else:
        generator, faces = services.build_generators(settings)[0], services.build_faces(settings)
    runtime = services.Runtime(settings, [generator], faces)
    # The cluster-wide retention sweep may run in this process: a swept session's Idempotency-Key
    # records (in Redis) go with it, as they do when an API node deletes the session.
    runtime.session_deleted_hooks.append(
        services.build_idempotency(settings, runtime.storage.db_path, runtime.store).forget_session)
    runtime.start()
    if not runtime.wait_ready():
        log.error("worker set-up failed", extra={"error": runtime.setup_error})
        runtime.shutdown()
        return 1
    global _worker
    conn = runtime.store.redis
    name = args.name or f"{socket.gethostname()}.{os.getpid()}"
    worker = TwinWorker([make_queue(conn)], connection=conn, serializer=JSONSerializer, name=name,
                        runtime=runtime, worker_ttl=max(20, int(settings.worker_heartbeat_seconds * 10)),
                        job_monitoring_interval=max(1, int(settings.worker_heartbeat_seconds)))
    _worker = worker
    info = services._device_info(services._safe_info(generator).get("device"))
    control = ModelControl(worker, generator, name, {"host": socket.gethostname(), "device": info["device"],
                                                     "gpu_name": info.get("name", "CPU")})
    worker.listen_for(control.active)
    control.start()
    code = 0
    try:
        # RQ's work loop returns ("unhandled exception, quitting") when Redis goes away outside its
        # blocking pop: start it again until a stop was asked for; the models stay loaded.
        while True:
            try:
                worker.work(burst=args.burst, logging_level=settings.log_level, with_scheduler=False)
            except StopRequested:
                break  # SIGTERM while RQ was setting up (before its own handler caught it)
            except Exception as e:  # noqa: BLE001 - Redis away at start: wait and reconnect
                log.error("worker lost Redis; reconnecting", extra={"error": f"{type(e).__name__}: {e}"})
            if worker.stop_asked or worker._stop_requested or args.burst:
                break
            time.sleep(2)
    finally:
        control.stop()
        runtime.shutdown()
    return code


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: perform() (what RQ imports by name) reads the
    # worker from utils.jobs.rq_worker.
    from utils.jobs import rq_worker
    sys.exit(rq_worker.main())
