"""Cluster mode's base-model registry: which GPU worker holds which model, routing, and the switch command.

Each GPU worker publishes its state in its info hash ``twin:workerinfo:<name>`` (host and device as before,
plus ``model``, ``family``, ``catalogue`` and ``loras`` as JSON, ``state`` = idle | loading | failed,
``target`` (the model being loaded), ``error`` (the last failed load, naming the file), ``cmd`` (the
result of the last switch command, JSON) and ``seen``). A refresher thread in the worker renews ``seen``
and the key's short TTL (``live_ttl``), so a worker that died drops out of the registry within seconds,
even while RQ still lists it (RQ's worker key lives minutes).

Routing: a job whose request names ``model`` is enqueued on ``model_queue_name(model)`` (a safe RQ queue
name derived from the validated name: a slug plus a hash, so no two names share a queue); a worker
listens on its active model's queue first, then the shared ``twin`` queue. Retries and re-enqueues keep
the job's queue (RQ re-queues to the job's origin; ``enqueue`` picks the queue from the record).

Switch command: ``send_load`` RPUSHes ``{"id", "model"}`` onto the list ``twin:modelcmd:<worker>``; the
worker's control thread BLPOPs it (a list, not pub/sub: a command sent while the worker is busy or its
connection blinks waits there), loads the model beside its current one, switches between jobs, moves
its queues, and writes the result into its info hash, where ``wait_load`` reads it.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any

from utils import errors

QUEUE_NAME = "twin"
WORKER_INFO = "twin:workerinfo:"   # + RQ worker name
COMMANDS = "twin:modelcmd:"        # + RQ worker name: list of JSON commands
WORKER_NAMES = "twin:workernames"  # set of worker names that published an info hash (pruned when it expires)
MODEL_QUEUES = "twin:modelqueues"  # hash: RQ queue name -> model name (for maintenance: retries, strands)
COMMAND_TTL_S = 3600


def model_queue_name(model: str) -> str:
    """The RQ queue of jobs pinned to ``model``: readable, Redis-safe, and distinct per name."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", model)[:64]
    return f"{QUEUE_NAME}:model:{slug}:{hashlib.sha1(model.encode()).hexdigest()[:8]}"


def live_ttl(settings) -> int:
    """Seconds a worker's info hash lives without a refresh (it is refreshed every second)."""
    return max(3, int(round(settings.worker_heartbeat_seconds * 4)))


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_info(conn, name: str) -> dict[str, Any] | None:
    raw = conn.hgetall(WORKER_INFO + name)
    if not raw:
        return None
    info: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
    for key in ("catalogue", "loras", "cmd"):
        try:
            info[key] = json.loads(info[key]) if info.get(key) else None
        except ValueError:
            info[key] = None
    info["catalogue"] = info.get("catalogue") or []
    info["loras"] = info.get("loras") or []
    return info


def live_workers(conn) -> dict[str, dict]:
    """name -> info of every worker whose info hash is still refreshed (sorted by name)."""
    # A set of names rather than SCAN: a SCAN walks every job record of the keyspace.
    names = sorted(_text(n) for n in conn.smembers(WORKER_NAMES))
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
            entry = models.setdefault(m["name"], {"name": m["name"], "kind": m.get("kind"), "file": m.get("file"),
                                                  "active": False, "workers": []})
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
    return {"active": sorted({w["model"] for w in workers.values() if w.get("model")}),
            "models": list(models.values()), "workers": rows,
            "loras": sorted({lora for w in workers.values() for lora in w["loras"]})}


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
