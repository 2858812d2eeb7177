"""The *generator process*: the engine in a spawned child process, behind the engine's own contract.

Why: the diffusers loop holds the GIL most of the time (on a GPU box too: it is CPU-bound launching
kernels), so in a thread of the web process it starves the request threads (/status p99 170-270 ms
measured) and is itself slowed by them. A child process has its own GIL (like cog's predictor process).

    gen = GeneratorProcess(settings, engine_class=DigitalTwinGenerator)   # the caller names the engine
    gen.setup()                                       # spawns the child, which builds engine_class(settings)
    gen.state / gen.error / gen.info()                # as the in-process generator ("restarting" after a crash)
    gen.build_identity(crops, embeddings, face_model=..., combine=...)
    gen.validate(req); gen.generate(req, on_progress=..., should_cancel=...)
    gen.models_catalogue(); gen.load_model(name)       # base-model registry / hot swap (served like validate)
    gen.close()                                       # also at interpreter exit

Protocol: one duplex Pipe, messages pickled with plain ``pickle`` (not multiprocessing's ForkingPickler,
whose torch reductions would move tensors through shared-memory file descriptors). Tensors travel by value
(CPU), images as pickled PIL images (raw pixels: much cheaper than PNG-encoding in the child and decoding
again, and the service writes the PNG anyway). Every request carries an id; replies carry it back:

    parent -> child: ("generate", id, request, job_id) | ("call", id, method, args, kwargs) | ("cancel", id)
                     | ("shutdown",)
    child -> parent: ("ready", info) | ("setup_failed", error) | ("state", "warming") | ("progress", id, step, total, preview_jpeg | None)
                     | ("ok", id, value) | ("err", id, error)

The child runs generate() in its main thread and the short calls (identity, validate, info) in another, so
an upload never waits for a running generation; a third thread reads the pipe. It ignores SIGINT and
SIGTERM (the parent decides when it ends) and exits when the pipe reaches EOF (parent gone, even by SIGKILL)
or the parent's pid changes. No PR_SET_PDEATHSIG: it fires when the *thread* that spawned the child exits,
and the child is (re)started from short-lived threads (the set-up thread, a restart thread).
"""
from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit hook must be registered before ours (atexit is LIFO)
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable

from utils import errors
from utils.config import Settings
# GeneratorCrashed is part of this module's interface (raised by its calls); the pipe's error codec lives beside it.
from utils.jobs.local.pipe_errors import GeneratorCrashed, error_payload as _error_payload  # noqa: F401
from utils.jobs.local.pipe_errors import rebuild_error as _rebuild_error
from utils.logging import job_id_var

log = logging.getLogger("twin.generator_process")

# How often the waiting job thread checks should_cancel() (a step of a real model takes longer).
CANCEL_POLL_S = 0.02
# How long close() waits for the child to leave after "shutdown" before SIGKILL.
CLOSE_GRACE_S = 5.0
# The child checks its parent's pid this often (a second guard beside pipe EOF).
PARENT_WATCH_S = 1.0


# --- the child -------------------------------------------------------------------------------------

def _leave(code: int = 0) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_WATCH_S)
        if os.getppid() != parent_pid:
            _leave(0)


class _ChildServer:
    """The child's side of the pipe: generate() in the calling (main) thread, the short calls in a call
    thread, cancels and shutdown from the reader thread."""

    CALLS = ("build_identity", "check_identity", "validate", "info", "published_options", "models_catalogue", "load_model")

    def __init__(self, gen, conn) -> None:
        self.gen, self.conn = gen, conn
        self.send_lock = threading.Lock()
        self.gen_q: queue.Queue = queue.Queue()
        self.call_q: queue.Queue = queue.Queue()
        self.cancels: dict[int, threading.Event] = {}

    def send(self, msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            self.conn.send_bytes(data)

    def gen_loop(self) -> None:
        from utils.logging import log_context
        while True:
            msg = self.gen_q.get()
            if msg is None:
                return
            tag, rid, req, job_id = msg   # tag: "generate" | "train" (a long call, in this thread)
            ev = self.cancels[rid]
            try:
                with log_context(job_id=job_id):
                    res = getattr(self.gen, tag)(
                        req, on_progress=lambda s, t, preview=None, extra=None: self.send(
                            ("progress", rid, s, t, preview, extra)), should_cancel=ev.is_set)
                self.send(("ok", rid, res))
            except BaseException as e:  # noqa: BLE001
                self.send(("err", rid, _error_payload(e)))
            finally:
                self.cancels.pop(rid, None)

    def run_call(self, rid, method, args, kwargs) -> None:
        try:
            self.send(("ok", rid, getattr(self.gen, method)(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001
            self.send(("err", rid, _error_payload(e)))

    def call_loop(self) -> None:
        while True:
            _, rid, method, args, kwargs = self.call_q.get()
            if method not in self.CALLS:
                self.send(("err", rid, _error_payload(errors.InvalidRequest(
                    f"method={method!r} is not served by the generator process"))))
            elif method == "load_model":
                # A real SDXL load takes a minute: in its own thread, so uploads (build_identity) and
                # validate calls are not queued behind it.
                threading.Thread(target=self.run_call, args=(rid, method, args, kwargs), name="twin-child-load",
                                 daemon=True).start()
            else:
                self.run_call(rid, method, args, kwargs)

    def read_loop(self) -> None:
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                _leave(0)  # the parent is gone (or closed us): nothing to hand a result to
            tag = msg[0]
            if tag in ("generate", "train"):
                self.cancels[msg[1]] = threading.Event()
                self.gen_q.put(msg)
            elif tag == "call":
                self.call_q.put(msg)
            elif tag == "cancel":
                ev = self.cancels.get(msg[1])
                if ev is not None:
                    ev.set()
            elif tag == "shutdown":
                logging.getLogger("twin.generator_child").info("generator process leaving on request")
                self.gen_q.put(None)
                return


def _child_main(settings: Settings, conn, parent_pid: int, torch_threads: int | None, engine_class) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from utils.logging import configure_logging
    configure_logging(settings.log_level)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="twin-parent-watch", daemon=True).start()
    if settings.generator_nice:
        os.nice(settings.generator_nice)  # the web process first when both want the CPU
    if torch_threads:
        import torch
        torch.set_num_threads(torch_threads)
    server = _ChildServer(engine_class(settings), conn)
    server.gen.on_state = lambda state: server.send(("state", state))   # "warming", for the parent's /health
    try:
        server.gen.setup()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which reports it on /health
        server.send(("setup_failed", _error_payload(server.gen.error or e)))
        _leave(0)
    server.send(("ready", server.gen.info()))
    threading.Thread(target=server.read_loop, name="twin-child-reader", daemon=True).start()
    threading.Thread(target=server.call_loop, name="twin-child-calls", daemon=True).start()
    # generate() in the main thread: measured ~4% faster than in another thread (tiny profile, CPU).
    # After "shutdown" it returns normally (not os._exit), so multiprocessing's finalizers release what
    # libraries registered (tqdm's semaphore) and the resource tracker has nothing to warn about.
    server.gen_loop()
    sys.stdout.flush()


# --- the parent ------------------------------------------------------------------------------------

class _Child:
    """One incarnation of the child: its process, pipe end and reader thread."""

    def __init__(self, owner: "GeneratorProcess") -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process with torch / threads loaded
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        threads = None
        if "torch" in sys.modules:  # the child computes with the parent's thread count (same numbers)
            threads = sys.modules["torch"].get_num_threads()
        self.proc = ctx.Process(target=_child_main, name="twin-generator",
                                args=(owner.settings, child_conn, os.getpid(), threads, owner.engine_class),
                                daemon=True)
        self.proc.start()
        child_conn.close()  # only the child holds its end: its death gives us EOF
        self.conn = parent_conn
        self.send_lock = threading.Lock()
        self.pending: dict[int, queue.Queue] = {}
        self.pending_lock = threading.Lock()
        self.dead = False
        self.setup_reply: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, args=(weakref.ref(owner),), name="twin-genproc-reader",
                                       daemon=True)
        self.reader.start()

    def send(self, msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            self.conn.send_bytes(data)

    def _read(self, owner_ref) -> None:
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - an unreadable reply is a bug; keep routing the others
                log.error("unreadable message from the generator process", extra={"traceback": traceback.format_exc()})
                continue
            tag = msg[0]
            if tag in ("ready", "setup_failed"):
                self.setup_reply.put(msg)
                continue
            if tag == "state":
                owner = owner_ref()
                if owner is not None and owner.state in ("starting", "restarting"):
                    owner.state = msg[1]
                continue
            with self.pending_lock:
                q = self.pending.get(msg[1])
            if q is not None:
                q.put(msg)
        # EOF: the child died (or we closed the pipe). State first (so whoever sees the failed call also
        # sees "restarting"), then fail whatever waits on it.
        with self.pending_lock:
            self.dead = True
            waiting = list(self.pending.values())
        owner = owner_ref()
        if owner is not None:
            owner._child_died(self)
        self.setup_reply.put(("crashed",))
        for q in waiting:
            q.put(("crashed",))

    def register(self, rid: int) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self.pending_lock:
            if self.dead:
                q.put(("crashed",))
            self.pending[rid] = q
        return q

    def unregister(self, rid: int) -> None:
        with self.pending_lock:
            self.pending.pop(rid, None)

    def stop(self, grace: float = CLOSE_GRACE_S) -> None:
        try:
            self.send(("shutdown",))
        except (OSError, ValueError):
            pass
        self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        try:
            self.conn.close()
        except OSError:
            pass
        self.reader.join(5)


class GeneratorProcess:
    """The engine's contract, served by a child process (see the module doc). ``engine_class``: the
    engine the child builds (``engine_class(settings)``); a class pickles by reference, so the spawned
    child imports it by name, and this module never names the engine itself."""

    def __init__(self, settings: Settings | None = None, *, engine_class: Callable[[Settings], Any]) -> None:
        self.settings = settings or Settings.from_env()
        self.engine_class = engine_class
        self.state = "starting"
        self.error: errors.TwinError | None = None
        self.restarts = 0
        self._info: dict[str, Any] = {}
        self._child: _Child | None = None
        self._lifecycle = threading.Lock()     # start / restart / close, one at a time
        self._settled = threading.Event()      # clear while a restart is under way
        self._gen_lock = threading.Lock()      # one generate() at a time, as in-process
        self._ids = itertools.count(1)
        self._closed = False
        self.restart_wait_s = 600.0            # longest a call waits for a restart (a real SDXL load is ~1 min)
        # The base model a restarted child must come back on (the last successful load_model; None: the
        # default one), and why it could not, when a replay failed (info()/health show it).
        self._wanted_model: str | None = None
        self.model_error: str | None = None
        self._options: dict[str, Any] | None = None
        atexit.register(_close_at_exit, weakref.ref(self))

    # The engine's request and identity classes: the parent parses requests and loads identities itself.
    @property
    def request_type(self) -> type:
        return self.engine_class.request_type

    @property
    def identity_type(self) -> type:
        return self.engine_class.identity_type

    @property
    def max_images_per_call(self) -> int:
        return self.engine_class.max_images_per_call

    # --- lifecycle ---
    def setup(self) -> "GeneratorProcess":
        with self._lifecycle:
            if self.state == "ready" and self._child is not None and not self._child.dead:
                return self
            self._start_locked()
        if self.state != "ready":
            raise self.error  # type: ignore[misc]
        return self

    def _start_locked(self) -> None:
        if self._closed:
            raise errors.ServiceNotReady("the generator process was shut down")
        t0 = time.perf_counter()
        child = _Child(self)
        self._child = child
        reply = child.setup_reply.get()
        if reply[0] == "ready":
            self._info = dict(reply[1])
            self._replay_model(child)   # before "ready": no job may run on the default model meanwhile
            self.error, self.state = None, "ready"
            self._settled.set()
            log.info("generator process ready", extra={"pid": child.proc.pid, "restarts": self.restarts,
                                                        "seconds": round(time.perf_counter() - t0, 2)})
            return
        if reply[0] == "setup_failed":
            self.error = _rebuild_error(reply[1])
            if not isinstance(self.error, errors.TwinError):
                self.error = errors.TwinError(f"model set-up failed: {reply[1]['cls']}: {reply[1]['message']}",
                                              code="setup_failed", http_status=503)
        else:
            self.error = GeneratorCrashed(f"the generator process (pid {child.proc.pid}) died during set-up "
                                       f"(exit code {_exitcode(child)})", code="setup_failed")
        self.state = "setup_failed"
        self._settled.set()
        child.stop(grace=1.0)

    def _replay_model(self, child: _Child) -> None:
        """A restarted child starts on the default base model: load the one that was active, so the
        restart does not switch models silently. A failed replay keeps the default model, logs it and
        says so in ``model_error`` (info(), /health); pinned jobs then fail with model_not_loaded."""
        want = self._wanted_model
        self.model_error = None
        if want is None or want == self._info.get("active_model", self._info.get("model_name")):
            return
        try:
            out = self._child_call(child, "load_model", want)
        except BaseException as e:  # noqa: BLE001 - the child still serves its default model
            msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            self.model_error = (f"the restarted generator process could not load base model {want!r} again, "
                                f"so it serves {self._info.get('model_name')!r}: {msg}")
            log.error("restarted generator process is back on the default base model",
                      extra={"wanted_model": want, "error": msg})
            return
        self._refresh_info(child, out)
        log.info("restarted generator process reloaded its base model", extra={"model": want})

    def _refresh_info(self, child: _Child, out: dict[str, Any]) -> None:
        """After a switch: the new model's info (its family, identity method, memory mode...)."""
        try:
            info = self._child_call(child, "info")
            self._info = {k: v for k, v in info.items() if k not in ("state", "error")}
        except errors.TwinError:   # the switch happened; say at least which model is active now
            self._info["model_name"] = self._info["active_model"] = out["model"]
            self._info["family"] = out.get("family", self._info.get("family"))

    def _child_call(self, child: _Child, method: str, *args, **kwargs):
        rid = next(self._ids)
        q = child.register(rid)
        try:
            child.send(("call", rid, method, args, kwargs))
        except (OSError, ValueError):
            pass  # a dead pipe: the reader delivers "crashed" to q
        return self._wait(child, rid, q)

    def _child_died(self, child: _Child) -> None:
        """Reader thread, on EOF: restart in the background unless this was a deliberate close."""
        if self._closed or child is not self._child or self.state != "ready":
            return  # closing, an old incarnation, or a death during set-up (reported by _start_locked)
        self._settled.clear()
        self.state = "restarting"
        self.restarts += 1
        log.error("generator process died; restarting it",
                  extra={"pid": child.proc.pid, "exit_code": _exitcode(child), "restarts": self.restarts})
        threading.Thread(target=self._restart, args=(child,), name="twin-genproc-restart", daemon=True).start()

    def _restart(self, dead: _Child) -> None:
        with self._lifecycle:
            if self._closed or self._child is not dead:
                return
            dead.proc.join(5)
            try:
                dead.conn.close()
            except OSError:
                pass
            try:
                self._start_locked()
            except BaseException as e:  # noqa: BLE001 - e.g. spawn failed: report it, release the waiters
                self.error = GeneratorCrashed(f"restarting the generator process failed: {type(e).__name__}: {e}",
                                           code="setup_failed")
                self.state = "setup_failed"
                self._settled.set()

    def close(self) -> None:
        """Stop the child (no orphan): ask it to leave, SIGKILL after a grace period."""
        self._closed = True
        if not self._lifecycle.acquire(timeout=1.0):
            # A (re)start is loading models: kill that child so its set-up ends now, then take the lock.
            child = self._child
            if child is not None and child.proc.is_alive():
                child.proc.kill()
            self._lifecycle.acquire()
        try:
            child, self._child = self._child, None
            if child is not None:
                child.stop()
            self.state = "stopped"
        finally:
            self._lifecycle.release()
            self._settled.set()  # release callers waiting for a restart: they see "stopped"

    shutdown = close

    @property
    def pid(self) -> int | None:
        c = self._child
        return c.proc.pid if c is not None else None

    def info(self) -> dict[str, Any]:
        out = {"profile": None, "is_demo": None, "variant": self.settings.ip_adapter_variant, "model_name": None,
               "device": None, "dtype": None, **self._info}
        out["state"] = self.state
        if self.error is not None:
            out["error"] = self.error.to_dict()
        out["process"] = {"pid": self.pid, "restarts": self.restarts}
        if self.model_error is not None:
            out["model_error"] = self.model_error
        return out

    # --- calls ---
    def _live_child(self) -> _Child:
        if self.state in ("restarting", "warming"):
            # After a crash the next call waits for the restart (and its warm-up) rather than failing too.
            self._settled.wait(self.restart_wait_s)
        child = self._child
        if self.state != "ready" or child is None:
            if self.state == "setup_failed" and self.error is not None:
                raise errors.ServiceNotReady(f"the generator is setup_failed: {self.error.message}", retry_after=60)
            raise errors.ServiceNotReady(f"the generator is {self.state}, not ready")
        return child


    def _wait(self, child: _Child, rid: int, q: queue.Queue, on_progress=None, should_cancel=None):
        canceled = False
        try:
            while True:
                try:
                    msg = q.get(timeout=CANCEL_POLL_S if should_cancel is not None else None)
                except queue.Empty:
                    msg = None
                if msg is None or msg[0] == "progress":
                    if msg is not None and on_progress is not None:
                        if len(msg) > 5 and msg[5] is not None:
                            on_progress(msg[2], msg[3], msg[4], msg[5])  # a training's loss
                        elif len(msg) > 4 and msg[4] is not None:
                            on_progress(msg[2], msg[3], msg[4])  # with a preview JPEG
                        else:
                            on_progress(msg[2], msg[3])
                    if not canceled and should_cancel is not None and should_cancel():
                        canceled = True
                        try:
                            child.send(("cancel", rid))
                        except (OSError, ValueError):
                            pass  # the reader sees the EOF and fails this call
                    continue
                if msg[0] == "ok":
                    return msg[2]
                if msg[0] == "err":
                    raise _rebuild_error(msg[2])
                raise GeneratorCrashed(f"the generator process (pid {child.proc.pid}) died during the call "
                                    f"(exit code {_exitcode(child)}); it is being restarted")
        finally:
            child.unregister(rid)

    def _call(self, method: str, *args, **kwargs):
        return self._child_call(self._live_child(), method, *args, **kwargs)

    def build_identity(self, crops, face_embeddings=None, *, face_model: str | None = None,
                       combine: str | None = None, **face_inputs):
        """Thread-safe; served by the child's call thread, so it does not wait for a running generate().
        ``face_inputs``: embedding_norms / keypoints / keypoint_index (SelfieReport.identity_inputs())."""
        return self._call("build_identity", list(crops) if crops is not None else None,
                          list(face_embeddings) if face_embeddings is not None else None,
                          face_model=face_model, combine=combine, **face_inputs)

    def check_identity(self, identity) -> None:
        self._call("check_identity", identity)

    def validate(self, req) -> dict[str, Any]:
        return self._call("validate", req)

    def published_options(self) -> dict[str, Any] | None:
        """The child's request choices, asked once per loaded model (/system-status must stay fast)."""
        if self._options is None:
            self._options = self._call("published_options")
        return self._options

    def models_catalogue(self) -> dict[str, Any]:
        return self._call("models_catalogue")

    def load_model(self, name: str) -> dict[str, Any]:
        """Served by the child's call thread: the new model loads while a job generates; the child's
        generator switches between jobs. A restarted child loads this model again (``_replay_model``)."""
        out = self._call("load_model", name)
        self._options = None
        self._refresh_info(self._live_child(), out)
        self._wanted_model, self.model_error = out["model"], None
        return out

    def generate(self, req, on_progress: Callable[[int, int], Any] | None = None,
                 should_cancel: Callable[[], bool] | None = None):
        return self._long_call("generate", req, on_progress, should_cancel)

    def train(self, spec, on_progress: Callable[..., Any] | None = None,
              should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
        """A twin LoRA training in the child, on the modules it holds (one long call, like generate)."""
        return self._long_call("train", spec, on_progress, should_cancel)

    def _long_call(self, tag: str, req, on_progress, should_cancel):
        if should_cancel is not None and should_cancel():
            raise errors.JobCanceled("canceled before the first step")
        with self._gen_lock:
            child = self._live_child()
            rid = next(self._ids)
            q = child.register(rid)
            try:
                child.send((tag, rid, req, job_id_var.get()))
            except (OSError, ValueError):
                pass
            return self._wait(child, rid, q, on_progress, should_cancel)


def _exitcode(child: _Child) -> int | None:
    child.proc.join(0.5)
    return child.proc.exitcode


def _close_at_exit(ref) -> None:
    # Runs before multiprocessing's own exit hook (registered earlier, atexit is LIFO), which would
    # SIGTERM the child - ignored there - and then join it forever while our pipe end keeps it alive.
    gen = ref()
    if gen is not None:
        gen.close()
