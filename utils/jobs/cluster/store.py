"""Cluster mode's job records: the ``JobStore`` contract (``utils.contracts``; local mode's is SQLite,
``utils.jobs.local.store``), kept in Redis so every API node and GPU worker sees the same sessions, jobs
and progress.

Keys (prefix ``twin:``): ``job:<id>`` hash (the JobStore row's columns, each value JSON-encoded),
``job:<id>:outputs`` list (one JSON object per written file), ``st:<status>`` set of job ids per
status, ``queued`` sorted set (score = job seq: the queue order and ``position``), ``session:<id>``
hash (with its ``kind``: selfies | persona), ``sessions`` sorted set (score = created_at: the retention
sweep), ``owner:<owner>`` sorted set (score = seq: the owner's latest upload; persona sessions are not in
it), ``session_jobs:<id>`` set, ``cancel:<job_id>`` (a cancel request a GPU worker's step callback reads;
pub/sub messages may be lost, this key is not).

Every status change is one Lua script (atomic on the server): a terminal job is never overwritten, so a
job that succeeded stays succeeded whatever a late registry cleanup or a re-run attempt does
(rq#2424: success wins). Redis unreachable -> ``errors.ServiceNotReady`` (503 ``queue_unavailable`` +
Retry-After), never a 500.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from utils import errors
from utils.jobs.cluster.connection import PREFIX, connect, redis_guard
from utils.jobs.status import CANCELED_BY_USER, JobStatus

log = logging.getLogger("twin.jobs")

ACTIVE = ("queued", "running")
CANCEL_TTL_S = 24 * 3600
_FIELDS = ("seq", "id", "session_id", "owner", "status", "payload", "request", "created_at", "started_at",
           "finished_at", "step", "total", "metadata", "error_code", "error_message", "attempts", "webhook")

# KEYS: none (one Redis; keys built from ARGV[1] = prefix). ARGV: prefix, id, new_status, allowed_from
# (comma list), attempts_delta, expect_attempts ('' = any), clear_outputs ('1'/'0'), then field/value pairs.
_TRANSITION = """
local p, id, new = ARGV[1], ARGV[2], ARGV[3]
local k = p .. 'job:' .. id
local cur = redis.call('HGET', k, 'status')
if not cur then return 0 end
cur = cjson.decode(cur)
if not string.find(',' .. ARGV[4] .. ',', ',' .. cur .. ',', 1, true) then return 0 end
if ARGV[6] ~= '' and redis.call('HGET', k, 'attempts') ~= ARGV[6] then return 0 end
redis.call('SREM', p .. 'st:' .. cur, id)
redis.call('SADD', p .. 'st:' .. new, id)
if new == 'queued' then
  redis.call('ZADD', p .. 'queued', tonumber(redis.call('HGET', k, 'seq')), id)
else
  redis.call('ZREM', p .. 'queued', id)
end
local delta = tonumber(ARGV[5])
if delta ~= 0 then
  local a = tonumber(redis.call('HGET', k, 'attempts')) + delta
  if a < 0 then a = 0 end
  redis.call('HSET', k, 'attempts', tostring(a))
end
if ARGV[7] == '1' then redis.call('DEL', k .. ':outputs') end
redis.call('HSET', k, 'status', cjson.encode(new))
for i = 8, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
return 1
"""

# ARGV: prefix, id, queue_max, session_id, then field/value pairs. Returns the seq, or -depth when full.
_CREATE = """
local p, id = ARGV[1], ARGV[2]
local depth = redis.call('ZCARD', p .. 'queued')
if depth >= tonumber(ARGV[3]) then return -depth - 1 end
local seq = redis.call('INCR', p .. 'seq')
local k = p .. 'job:' .. id
redis.call('HSET', k, 'seq', tostring(seq))
for i = 5, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', p .. 'queued', seq, id)
redis.call('SADD', p .. 'st:queued', id)
if ARGV[4] ~= '' then redis.call('SADD', p .. 'session_jobs:' .. ARGV[4], id) end
return seq
"""

# ARGV: prefix, id, output JSON. Only while the job runs (a canceled or deleted job gets no more files).
_ADD_OUTPUT = """
local k = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('HGET', k, 'status') ~= cjson.encode('running') then return 0 end
return redis.call('RPUSH', k .. ':outputs', ARGV[3])
"""


class RedisJobStore:
    """The ``JobStore`` contract on Redis (see the module doc for the keys)."""

    def __init__(self, url: str, *, prefix: str = PREFIX, connection=None) -> None:
        self.url = url
        self.prefix = prefix
        self.redis = connection if connection is not None else connect(url)
        self._transition = self.redis.register_script(_TRANSITION)
        self._create = self.redis.register_script(_CREATE)
        self._add_output = self.redis.register_script(_ADD_OUTPUT)
        # As SqliteJobStore.listeners (live events, webhooks): called after each change made through THIS
        # store object. Cluster mode: changes a GPU worker makes reach that worker's listeners only.
        self.listeners: list = []

    def _emit(self, job_id: str, kind: str, data: dict | None = None) -> None:
        if not self.listeners:
            return
        try:
            if data is None:
                data = self.get(job_id)
                if data is None:
                    return
        except errors.TwinError:
            return
        for listener in list(self.listeners):
            try:
                listener(job_id, kind, data)
            except Exception:  # noqa: BLE001 - events are a view; the record is the truth
                log.exception("job event listener failed")

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def close(self) -> None:
        try:
            self.redis.close()
        except Exception:  # noqa: BLE001 - closing a client of a Redis that is gone
            pass

    @redis_guard
    def ping(self) -> bool:
        return bool(self.redis.ping())

    # --- sessions --------------------------------------------------------------------------------
    @redis_guard
    def add_session(self, session_id: str, owner: str, created_at: float, kind: str = "selfies",
                    age_gate: dict | None = None) -> None:
        seq = self.redis.incr(self.k("session_seq"))
        gate = {k: repr(v) if isinstance(v, float) else v for k, v in (age_gate or {}).items() if v is not None}
        with self.redis.pipeline() as p:
            p.hset(self.k("session", session_id), mapping={"id": session_id, "owner": owner, "kind": kind,
                                                         "created_at": repr(created_at), "seq": seq, **gate})
            p.zadd(self.k("sessions"), {session_id: created_at})
            if kind == "selfies":   # the owner's latest upload is what a /generate without session_id uses
                p.zadd(self.k("owner", owner), {session_id: seq})
            p.execute()

    @redis_guard
    def get_session(self, session_id: str) -> dict | None:
        h = self.redis.hgetall(self.k("session", session_id))
        if not h:
            return None
        h = {k.decode(): v.decode() for k, v in h.items()}
        median = h.get("median_apparent_age")
        return {"id": h["id"], "owner": h["owner"], "created_at": float(h["created_at"]), "seq": int(h["seq"]),
                "kind": h.get("kind", "selfies"), "age_gate": h.get("age_gate"),
                "age_gate_reason": h.get("age_gate_reason"),
                "median_apparent_age": None if median is None else float(median)}

    @redis_guard
    def latest_session(self, owner: str) -> dict | None:
        ids = self.redis.zrevrange(self.k("owner", owner), 0, 0)
        return self.get_session(ids[0].decode()) if ids else None

    @redis_guard
    def sessions_older_than(self, cutoff: float) -> list[str]:
        return [i.decode() for i in self.redis.zrangebyscore(self.k("sessions"), "-inf", f"({cutoff}")]

    @redis_guard
    def delete_session_records(self, session_id: str) -> None:
        sess = self.get_session(session_id)
        job_ids = [j.decode() for j in self.redis.smembers(self.k("session_jobs", session_id))]
        with self.redis.pipeline() as p:
            for job_id in job_ids:
                p.delete(self.k("job", job_id), self.k("job", job_id) + ":outputs", self.k("cancel", job_id))
                p.zrem(self.k("queued"), job_id)
                for s in JobStatus:
                    p.srem(self.k("st", s.value), job_id)
            p.delete(self.k("session", session_id), self.k("session_jobs", session_id))
            p.zrem(self.k("sessions"), session_id)
            if sess is not None:
                p.zrem(self.k("owner", sess["owner"]), session_id)
            p.execute()
        for job_id in job_ids:
            self._emit(job_id, "deleted", {})

    # --- jobs ------------------------------------------------------------------------------------
    @redis_guard
    def create_job(self, job_id: str, *, session_id: str | None, owner: str, payload: dict,
                   request: dict, queue_max: int, webhook: dict | None = None) -> dict:
        row = {"webhook": webhook or None, "id": job_id, "session_id": session_id, "owner": owner, "status": JobStatus.QUEUED.value,
               "payload": payload, "request": request, "created_at": time.time(), "started_at": None,
               "finished_at": None, "step": 0, "total": 0, "metadata": None, "error_code": None,
               "error_message": None}
        args: list[Any] = [self.prefix, job_id, queue_max, session_id or ""]
        for name, value in row.items():
            args += [name, json.dumps(value)]
        args += ["attempts", "0"]
        seq = self._create(args=args)
        if seq < 0:
            depth = -seq - 1
            raise errors.QueueFull(f"the queue is full ({depth} jobs waiting, TWIN_QUEUE_MAX={queue_max}); "
                                   "try again later", retry_after=max(5, depth * 5))
        self._emit(job_id, "status")
        return self.get(job_id)  # type: ignore[return-value]

    @redis_guard
    def get(self, job_id: str) -> dict | None:
        key = self.k("job", job_id)
        with self.redis.pipeline(transaction=True) as p:
            p.hgetall(key)
            p.lrange(key + ":outputs", 0, -1)
            h, outs = p.execute()
        if not h or b"status" not in h:
            return None
        job: dict[str, Any] = {}
        for name in _FIELDS:
            raw = h.get(name.encode())
            job[name] = json.loads(raw) if raw is not None else None
        job["attempts"] = int(job["attempts"] or 0)
        job["outputs"] = [json.loads(o) for o in outs]
        return job

    @redis_guard
    def position(self, job: dict) -> int | None:
        if job["status"] != JobStatus.QUEUED.value:
            return None
        rank = self.redis.zrank(self.k("queued"), job["id"])
        return None if rank is None else rank + 1

    @redis_guard
    def queued_ids(self) -> list[str]:
        return [i.decode() for i in self.redis.zrange(self.k("queued"), 0, -1)]

    @redis_guard
    def ids_with_status(self, status: str) -> list[str]:
        return [i.decode() for i in self.redis.smembers(self.k("st", status))]

    @redis_guard
    def active_ids_for_session(self, session_id: str) -> list[str]:
        ids = [j.decode() for j in self.redis.smembers(self.k("session_jobs", session_id))]
        if not ids:
            return []
        with self.redis.pipeline(transaction=False) as p:
            for j in ids:
                p.hget(self.k("job", j), "status")
            states = p.execute()
        return [j for j, s in zip(ids, states) if s is not None and json.loads(s) in ACTIVE]

    @redis_guard
    def counts(self) -> dict[str, int]:
        with self.redis.pipeline(transaction=False) as p:
            for s in JobStatus:
                p.scard(self.k("st", s.value))
            return {s.value: int(n) for s, n in zip(JobStatus, p.execute())}

    def _move(self, job_id: str, new: JobStatus, allowed: tuple[str, ...], *, attempts_delta: int = 0,
              expect_attempts: int | None = None, clear_outputs: bool = False, **fields: Any) -> bool:
        args: list[Any] = [self.prefix, job_id, new.value, ",".join(allowed), attempts_delta,
                           "" if expect_attempts is None else str(expect_attempts), "1" if clear_outputs else "0"]
        for name, value in fields.items():
            args += [name, json.dumps(value)]
        moved = self._transition(args=args) == 1
        if moved:
            self._emit(job_id, "status")
        return moved

    @redis_guard
    def claim(self, job_id: str) -> bool:
        """queued -> running, attempt + 1, progress and outputs of an earlier attempt reset. ``running`` is
        accepted too: the attempt before this one died with its GPU worker (RQ re-ran the job)."""
        return self._move(job_id, JobStatus.RUNNING, ACTIVE, attempts_delta=1, clear_outputs=True,
                          started_at=time.time(), step=0, total=0, finished_at=None)

    @redis_guard
    def set_progress(self, job_id: str, step: int, total: int, extra: dict | None = None) -> None:
        # HSET on a job only if it still exists (a deleted session's job must not be re-created).
        key = self.k("job", job_id)
        if self.redis.exists(key):
            self.redis.hset(key, mapping={"step": json.dumps(int(step)), "total": json.dumps(int(total))})
            self._emit(job_id, "progress", {**(extra or {}), "step": int(step), "total": int(total),
                                            "at": time.time()})

    @redis_guard
    def add_output(self, job_id: str, output: dict) -> None:
        if self._add_output(args=[self.prefix, job_id, json.dumps(output)]):
            self._emit(job_id, "output", output)

    @redis_guard
    def add_webhook_delivery(self, job_id: str, record: dict, keep: int = 50) -> None:
        key = self.k("job", job_id)
        raw = self.redis.hget(key, "webhook")
        hook = json.loads(raw) if raw else None
        if not hook:
            return
        hook["deliveries"] = (hook.get("deliveries", []) + [record])[-keep:]
        self.redis.hset(key, "webhook", json.dumps(hook))

    @redis_guard
    def finish(self, job_id: str, status: JobStatus, *, code: str | None = None, message: str | None = None,
               metadata: dict | None = None) -> bool:
        assert status.terminal
        fields: dict[str, Any] = {"finished_at": time.time(), "error_code": code, "error_message": message}
        if metadata is not None:
            fields["metadata"] = metadata
        return self._move(job_id, status, ACTIVE, **fields)

    @redis_guard
    def cancel_queued(self, job_id: str) -> bool:
        return self._move(job_id, JobStatus.CANCELED, ("queued",), finished_at=time.time(),
                          error_code=CANCELED_BY_USER["code"], error_message=CANCELED_BY_USER["message"])

    @redis_guard
    def requeue(self, job_id: str) -> bool:
        """running -> queued (a GPU worker's graceful stop): the attempt is given back."""
        return self._move(job_id, JobStatus.QUEUED, ("running",), attempts_delta=-1, clear_outputs=True,
                          step=0, total=0, started_at=None)

    @redis_guard
    def back_to_queued(self, job_id: str, attempts: int) -> bool:
        """running -> queued while RQ waits to re-run a job whose GPU worker died (the attempt counts). Only
        if no new attempt claimed it meanwhile (``attempts`` unchanged)."""
        return self._move(job_id, JobStatus.QUEUED, ("running",), expect_attempts=attempts, step=0, total=0)

    def recover(self, requeue: bool) -> dict[str, list[str]]:
        # Nothing to settle at an API node's start: a dead GPU worker's jobs are re-run by RQ (TWIN_JOB_ATTEMPTS).
        return {"requeued": [], "failed": []}

    # --- cancel requests -------------------------------------------------------------------------
    @redis_guard
    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self.k("cancel", job_id), "1", ex=CANCEL_TTL_S)

    def cancel_requested(self, job_id: str) -> bool:
        """Read by the step callback: a Redis hiccup must not fail the job, so errors read as 'no'."""
        try:
            return bool(self.redis.exists(self.k("cancel", job_id)))
        except Exception:  # noqa: BLE001
            return False
