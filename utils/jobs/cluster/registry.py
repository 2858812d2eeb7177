"""Cluster mode's base-model registry: which GPU worker holds which model, and the switch command.

Each GPU worker publishes its state in its info hash ``twin:workerinfo:<name>`` (host and device as before,
plus ``model``, ``family`` (the model family: sdxl | flux), ``variant`` (its identity method, "" for none),
``method_fields`` (the request fields that method reads, JSON), ``catalogue`` (every base model with its
family) and ``loras`` (each with its family) as JSON, ``state`` = idle | loading | failed,
``target`` (the model being loaded), ``error`` (the last failed load, naming the file), ``cmd`` (the
result of the last switch command, JSON) and ``seen``). A refresher thread in the worker renews ``seen``
and the key's short TTL (``live_ttl``), so a worker that died drops out of the registry within seconds,
even while RQ still lists it (RQ's worker key lives minutes).

Routing (a pinned job waits on its model's queue; a GPU worker listens there first) is ``routing.py``.

Switch command: ``send_load`` RPUSHes ``{"id", "model"}`` onto the list ``twin:modelcmd:<worker>``; the
GPU worker's control thread (``ModelControl``) BLPOPs it (a list, not pub/sub: a command sent while the
worker is busy or its connection blinks waits there), loads the model beside its current one, switches
between jobs, moves its queues, and writes the result into its info hash, where ``wait_load`` reads it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import traceback
import uuid
from typing import Any

from utils import errors
from utils.contracts import ModelRegistry
from utils.jobs.cluster.connection import as_text

log = logging.getLogger("twin.worker")

WORKER_INFO = "twin:workerinfo:"   # + RQ worker name
COMMANDS = "twin:modelcmd:"        # + RQ worker name: list of JSON commands
WORKER_NAMES = "twin:workernames"  # set of worker names that published an info hash (pruned when it expires)
COMMAND_TTL_S = 3600


def live_ttl(settings) -> int:
    """Seconds a worker's info hash lives without a refresh (it is refreshed every second)."""
    return max(3, int(round(settings.worker_heartbeat_seconds * 4)))


def read_info(conn, name: str) -> dict[str, Any] | None:
    raw = conn.hgetall(WORKER_INFO + name)
    if not raw:
        return None
    info: dict[str, Any] = {as_text(k): as_text(v) for k, v in raw.items()}
    for key in ("catalogue", "loras", "cmd", "method_fields"):
        try:
            info[key] = json.loads(info[key]) if info.get(key) else None
        except ValueError:
            info[key] = None
    info["catalogue"] = info.get("catalogue") or []
    info["loras"] = info.get("loras") or []
    info["method_fields"] = info.get("method_fields") or []
    return info


def live_workers(conn) -> dict[str, dict]:
    """name -> info of every worker whose info hash is still refreshed (sorted by name)."""
    # A set of names rather than SCAN: a SCAN walks every job record of the keyspace.
    names = sorted(as_text(n) for n in conn.smembers(WORKER_NAMES))
    out = {}
    for name in names:
        info = read_info(conn, name)
        if info is not None and info.get("seen"):
            out[name] = info
        elif info is None:
            conn.srem(WORKER_NAMES, name)   # its info expired: the worker is gone
    return out


def held_models(workers: dict[str, dict]) -> set[str]:
    """Models some live worker holds or is loading now (a pinned job for one of these is not stranded)."""
    held = {w["model"] for w in workers.values() if w.get("model")}
    held |= {w["target"] for w in workers.values() if w.get("state") == "loading" and w.get("target")}
    return held


def catalogue(workers: dict[str, dict]) -> dict[str, Any]:
    """GET /models in cluster mode: the union of the live workers' catalogues, the models loaded on them,
    and each worker's model and load state."""
    models: dict[str, dict] = {}
    for name, w in workers.items():
        for m in w["catalogue"]:
            entry = models.setdefault(m["name"], {"name": m["name"], "family": m.get("family"), "kind": m.get("kind"),
                                                  "file": m.get("file"), "active": False, "workers": []})
            if w.get("model") == m["name"]:
                entry["active"] = True
                entry["workers"].append(name)
    rows = []
    for name, w in workers.items():
        row = {"name": name, "model": w.get("model") or None, "family": w.get("family") or None,
               "state": w.get("state") or "idle"}
        if w.get("state") == "loading":
            row["target"] = w.get("target")
        if w.get("error"):
            row["error"] = w["error"]
        rows.append(row)
    loras: dict[str, dict] = {}
    for w in workers.values():
        for lora in w["loras"]:
            entry = loras.setdefault(lora["name"], {"name": lora["name"], "family": lora.get("family"), "loaded": False})
            entry["loaded"] = entry["loaded"] or bool(lora.get("loaded"))
    return {"active": sorted({w["model"] for w in workers.values() if w.get("model")}),
            "models": list(models.values()), "workers": rows, "loras": [loras[n] for n in sorted(loras)]}


def pinned_target(conn, want: str) -> dict | None:
    """What a job pinned to ``want`` will meet: {family, variant, method_fields} of a live worker holding it
    (the first by name); None when none holds it yet (a worker still loading it: its worker checks the job)."""
    workers = live_workers(conn)
    for w in workers.values():
        if w.get("model") == want and w.get("family"):
            return {"family": w["family"], "variant": w.get("variant") or "",
                    "method_fields": list(w.get("method_fields") or [])}
    return None


def check_pinned(conn, want: str) -> None:
    """At submit: ``want`` unknown to every live worker -> 400 unknown_model listing the names; known but
    not loaded (nor loading) on any live worker -> 409 model_not_loaded naming what is loaded."""
    workers = live_workers(conn)
    if not workers:
        raise errors.InvalidRequest(f"model={want!r} is not loaded on any GPU worker: no worker is up",
                                    code="model_not_loaded", http_status=409)
    names = sorted({m["name"] for w in workers.values() for m in w["catalogue"]})
    if want not in names:
        raise errors.InvalidRequest(f"model={want!r} is not a base model of any GPU worker; available: "
                                    f"{', '.join(names) or 'none'}", code="unknown_model")
    if want not in held_models(workers):
        loaded = sorted({w["model"] for w in workers.values() if w.get("model")})
        raise errors.InvalidRequest(f"model={want!r} is not loaded on any GPU worker; loaded: "
                                    f"{', '.join(map(repr, loaded)) or 'none'} (an admin can load it: "
                                    f"POST /models/load)", code="model_not_loaded", http_status=409)


def send_load(conn, model: str, workers: list[str] | None) -> tuple[str, list[str]]:
    """Queue a switch command for ``workers`` (default: every live worker that has ``model``). Returns
    (command id, the workers asked). Unknown worker or model names -> 4xx naming them."""
    live = live_workers(conn)
    if workers is None:
        targets = [n for n, w in live.items() if any(m["name"] == model for m in w["catalogue"])]
        if not targets:
            names = sorted({m["name"] for w in live.values() for m in w["catalogue"]})
            raise errors.InvalidRequest(f"model={model!r} is not a base model of any live GPU worker; available: "
                                        f"{', '.join(names) or 'none (no worker is up)'}",
                                        code="unknown_model", http_status=404)
    else:
        missing = [n for n in workers if n not in live]
        if missing:
            raise errors.InvalidRequest(f"workers={missing!r}: no live GPU worker of that name; live: "
                                        f"{', '.join(live) or 'none'}", code="unknown_worker", http_status=404)
        lacking = [n for n in workers if not any(m["name"] == model for m in live[n]["catalogue"])]
        if lacking:
            raise errors.InvalidRequest(f"model={model!r} is not a base model of worker(s) {', '.join(lacking)}",
                                        code="unknown_model", http_status=404)
        targets = list(dict.fromkeys(workers))
    cmd_id = uuid.uuid4().hex[:12]
    body = json.dumps({"id": cmd_id, "model": model, "at": time.time()})
    with conn.pipeline() as p:
        for name in targets:
            p.rpush(COMMANDS + name, body)
            p.expire(COMMANDS + name, COMMAND_TTL_S)
        p.execute()
    return cmd_id, targets


def wait_load(conn, cmd_id: str, targets: list[str], timeout_s: float, poll_s: float = 0.05) -> list[dict]:
    """Each target's answer to command ``cmd_id``: {name, model, previous, swap_s, load_s, ok: true} or
    {name, model, ok: false, error: {code, message}}; one still loading at the deadline is
    {name, model, ok: false, pending: true, state: "loading"}; one that died: error worker_lost."""
    deadline = time.monotonic() + timeout_s
    answers: dict[str, dict] = {}
    while True:
        for name in targets:
            if name in answers:
                continue
            info = read_info(conn, name)
            if info is None:
                answers[name] = {"name": name, "model": None, "ok": False,
                                 "error": {"code": "worker_lost",
                                           "message": f"GPU worker {name} stopped before it answered"}}
                continue
            cmd = info.get("cmd")
            if cmd and cmd.get("id") == cmd_id:
                answers[name] = {"name": name, **{k: v for k, v in cmd.items() if k not in ("id", "at")}}
        if len(answers) == len(targets):
            break
        if time.monotonic() >= deadline:
            for name in targets:
                if name not in answers:
                    info = read_info(conn, name) or {}
                    answers[name] = {"name": name, "model": info.get("model") or None, "ok": False, "pending": True,
                                     "state": info.get("state") or "idle"}
            break
        time.sleep(poll_s)
    return [answers[n] for n in targets]


class ModelControl:
    """A GPU worker's entry in the cluster's model registry (this module): publishes its info hash and
    keeps it alive (refresher thread), and runs switch commands from ``twin:modelcmd:<name>`` (control thread).
    The load runs beside the serving model; the generator swaps between jobs; then the queues move."""

    def __init__(self, worker, generator, name: str, base: dict[str, str]) -> None:
        # worker: the TwinWorker (its connection, its runtime's settings, listen_for after a switch).
        self.worker, self.gen, self.name = worker, generator, name
        self.conn = worker.connection
        self.ttl = live_ttl(worker.runtime.settings)
        self.key = WORKER_INFO + name
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            self.publish(**base, **self._model_fields(), state="idle", target="", error="")
        except Exception:  # noqa: BLE001 - Redis away at start: the refresher publishes once it is back
            pass
        self.base = base

    def _model_fields(self) -> dict[str, str]:
        if not isinstance(self.gen, ModelRegistry):
            return {"model": "", "family": "", "variant": "", "method_fields": "[]", "catalogue": "[]", "loras": "[]"}
        c = self.gen.models_catalogue()
        info = _safe_info(self.gen)
        # The model family (sdxl | flux) of the active model, as GET /models names it per model: what routing
        # and the submit-time field checks of a pinned job read.
        return {"model": c.get("active") or "", "family": str(info.get("family") or ""),
                "variant": str(info.get("variant") or ""), "method_fields": json.dumps(info.get("method_fields") or []),
                "catalogue": json.dumps([{k: m.get(k) for k in ("name", "family", "kind", "file")} for m in c["models"]]),
                "loras": json.dumps(list(c.get("loras", [])))}

    @property
    def active(self) -> str | None:
        return (self.gen.models_catalogue().get("active") or None) if isinstance(self.gen, ModelRegistry) else None

    def publish(self, **fields) -> None:
        with self.conn.pipeline() as p:
            p.hset(self.key, mapping={**fields, "seen": repr(time.time())})
            p.expire(self.key, self.ttl)
            p.sadd(WORKER_NAMES, self.name)
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
                p.srem(WORKER_NAMES, self.name)
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
                got = self.conn.blpop([COMMANDS + self.name], timeout=1)
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
        self.publish(state="loading", target=model)
        t0 = time.perf_counter()
        try:
            if not isinstance(self.gen, ModelRegistry):
                raise errors.InvalidRequest("this GPU worker's generator has no model registry",
                                            code="not_supported", http_status=501)
            out = self.gen.load_model(model)
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
