"""Cluster mode (TWIN_QUEUE_URL) on a real redis-server: two API app instances (Flask test clients of
two create_app() calls, as two API nodes behind a load balancer would be) and GPU workers as real
subprocesses (``python -m utils.service.gpu_worker`` on the generator double, FAKE_STEP_SECONDS per step).
Each test starts its own redis-server on a free port in a temp dir (tests/fixtures/redis_server.py).
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from tests.fakes import image_bytes
from tests.fixtures.service import REPO, wait_until
from tests.helpers.cluster import TOKEN_HEADER, generate, local_job_shape, shape, status, upload, wait_status

pytestmark = pytest.mark.timeout(180)



# --- 1. happy path over HTTP on two API nodes ------------------------------------------------------

def test_happy_path_upload_on_a_generate_on_b_status_and_download_on_either(api_nodes, workers, redis_server,
                                                                            make_app):
    settings, (a, b) = api_nodes()
    workers.start(settings, name="w0")
    workers.wait_registered(redis_server.client(), ["w0"])
    session_id, tok = upload(a)
    job = generate(b, tok, session_id=session_id, num_images=2)
    assert job["status"] == "queued" and job["session_id"] == session_id
    done = wait_status(a, tok, job["id"], {"succeeded", "failed", "canceled"})
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 1
    assert done["progress"]["step"] == done["progress"]["total"] > 0
    assert status(b, tok, job["id"]) == done
    assert [o["filename"] for o in done["outputs"]] == ["avatar_001.png", "avatar_002.png"]
    for node in (a, b):
        r = node.get(done["outputs"][1]["url"], headers={TOKEN_HEADER: tok})
        assert r.status_code == 200
        assert Image.open(io.BytesIO(r.data)).size == (64, 64)
    # Ownership holds across nodes: another caller sees nothing on either.
    for node in (a, b):
        assert node.get(f"/status/{job['id']}", headers={TOKEN_HEADER: "x" * 32}).status_code == 404
    # Same JSON shape as local mode (values differ; keys and types do not).
    assert shape(done) == shape(local_job_shape(make_app))


# --- 3. cancel -----------------------------------------------------------------------------------

def test_cancel_queued_job_never_starts_and_the_worker_takes_the_next(api_nodes, workers, redis_server):
    settings, (a, b) = api_nodes()
    _, tok = upload(a)
    job = generate(a, tok)
    r = b.post(f"/cancel/{job['id']}", headers={TOKEN_HEADER: tok})
    assert r.status_code == 200 and r.json["status"] == "canceled"
    workers.start(settings, name="w0")
    workers.wait_registered(redis_server.client(), ["w0"])
    nxt = generate(b, tok)
    assert wait_status(a, tok, nxt["id"], {"succeeded", "failed"})["status"] == "succeeded"
    after = status(a, tok, job["id"])
    assert after["status"] == "canceled" and after["started_at"] is None and after["attempt"] == 0


@pytest.mark.parametrize("how", ["api", "key_only"])
def test_cancel_running_job_stops_within_one_step_not_retried(api_nodes, workers, redis_server, how):
    """``key_only``: the pub/sub stop command is never sent (as if the message were lost); the Redis key
    the step callback reads still stops the job."""
    step = 0.4
    settings, (a, b) = api_nodes()
    workers.start(settings, name="w0", step_seconds=step)
    workers.wait_registered(redis_server.client(), ["w0"])
    _, tok = upload(a)
    job = generate(a, tok, quality_mode="high_fidelity")  # 8 steps
    wait_until(lambda: status(a, tok, job["id"])["progress"]["step"] >= 1, 30, 0.02)
    t0 = time.time()
    if how == "api":
        r = b.post(f"/cancel/{job['id']}", headers={TOKEN_HEADER: tok})
        assert r.status_code == 200
    else:
        b.application.extensions["twin"].store.request_cancel(job["id"])
    done = wait_status(a, tok, job["id"], {"canceled", "succeeded", "failed"}, 10)
    took = time.time() - t0
    assert done["status"] == "canceled" and done["error"]["code"] == "canceled"
    assert took < step * 2 + 0.5, f"stopped after {took:.2f}s; one step is {step}s"
    assert done["progress"]["step"] < 8
    # Not retried, and the worker takes the next job.
    nxt = generate(b, tok)
    assert wait_status(a, tok, nxt["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert status(a, tok, job["id"])["status"] == "canceled" and status(a, tok, job["id"])["attempt"] == 1


# --- 2. a worker killed mid-job ----------------------------------------------------------------------

def _holder(conn, job_id: str, procs) -> subprocess.Popen | None:
    from rq import Worker

    from utils.jobs.cluster.routing import make_queue
    for w in Worker.all(queue=make_queue(conn)):
        if w.get_current_job_id() == job_id:
            return next((p for p in procs if p.name == w.name and p.poll() is None), None)
    return None


def test_sigkilled_worker_job_reruns_on_another_worker_with_attempt_2(api_nodes, workers, redis_server):
    settings, (a, b) = api_nodes()
    conn = redis_server.client()
    for n in ("w0", "w1"):
        workers.start(settings, name=n, step_seconds=0.3)
    workers.wait_registered(conn, ["w0", "w1"])
    _, tok = upload(a)
    job = generate(a, tok, quality_mode="high_fidelity")
    wait_until(lambda: status(a, tok, job["id"])["progress"]["step"] >= 2, 30, 0.02)
    victim = wait_until(lambda: _holder(conn, job["id"], workers.procs), 10, 0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(5)
    t_kill = time.time()
    done = wait_status(b, tok, job["id"], {"succeeded", "failed", "canceled"}, 30)
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 2
    assert time.time() - t_kill < 30
    assert [o["filename"] for o in done["outputs"]] == ["avatar_001.png"]


def test_job_killed_on_every_attempt_fails_with_a_reason(api_nodes, workers, redis_server):
    settings, (a,) = api_nodes(1)
    conn = redis_server.client()
    _, tok = upload(a)
    job = generate(a, tok, quality_mode="high_fidelity")
    for attempt in (1, 2, 3):
        p = workers.start(settings, name=f"w{attempt}", step_seconds=0.3)
        wait_until(lambda: (lambda j: j["status"] == "running" and j["attempt"] == attempt
                            and j["progress"]["step"] >= 1)(status(a, tok, job["id"])), 40, 0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(5)
    done = wait_status(a, tok, job["id"], {"succeeded", "failed", "canceled"}, 30)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "worker_lost" and "3 attempts" in done["error"]["message"]
    assert done["attempt"] == 3


# --- 6. success wins -------------------------------------------------------------------------------

def test_success_wins_over_a_late_rerun_or_cleanup(api_nodes, workers, redis_server):
    from utils.jobs import JobStatus
    from utils.jobs.cluster.maintenance import Maintenance
    from utils.jobs.cluster.routing import enqueue, make_queue
    settings, (a,) = api_nodes(1)
    conn = redis_server.client()
    workers.start(settings, name="w0")
    workers.wait_registered(conn, ["w0"])
    _, tok = upload(a)
    job = generate(a, tok)
    done = wait_status(a, tok, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    store = a.application.extensions["twin"].store
    # A late failure write (what a registry cleanup's verdict would become) does not take.
    assert store.finish(job["id"], JobStatus.FAILED, code="worker_lost", message="x") is False
    # RQ re-running the job (rq#2424: abandoned after success, then retried): the attempt does nothing.
    enqueue(make_queue(conn), job["id"], settings)
    wait_until(lambda: len(make_queue(conn)) == 0, 10, 0.05)
    time.sleep(0.5)
    Maintenance(store, settings).run_once()
    assert status(a, tok, job["id"]) == done


# --- 5. Redis down and back ------------------------------------------------------------------------

def test_redis_down_answers_503_then_restart_keeps_queued_jobs(api_nodes, workers, redis_server):
    """Redis stops while a worker runs one job and another waits: the API answers 503 + Retry-After and
    /health says why; after the restart (AOF) both nodes and the same worker reconnect by themselves and
    both jobs end succeeded (the one cut off mid-run may run again: attempt 1 or 2)."""
    settings, (a, b) = api_nodes()
    workers.start(settings, name="w0", step_seconds=0.3)
    workers.wait_registered(redis_server.client(), ["w0"])
    _, tok = upload(a)
    cut = generate(a, tok, quality_mode="high_fidelity")
    waiting = generate(a, tok)
    wait_until(lambda: status(a, tok, cut["id"])["progress"]["step"] >= 1, 30, 0.02)
    redis_server.stop()
    r = a.get(f"/status/{waiting['id']}", headers={TOKEN_HEADER: tok})
    assert r.status_code == 503 and r.json["error"]["code"] == "queue_unavailable", r.json
    assert int(r.headers["Retry-After"]) > 0
    r = b.post("/generate", json={"prompt": "x"}, headers={TOKEN_HEADER: tok})
    assert r.status_code == 503 and r.json["error"]["code"] == "queue_unavailable"
    h = a.get("/health")
    assert h.status_code == 200 and h.json["state"] == "queue_unavailable" and "Redis" in h.json["error"]
    time.sleep(1.0)
    redis_server.start()
    assert wait_until(lambda: b.get("/health").json["state"] == "ready", 15, 0.1)
    assert status(b, tok, waiting["id"])["status"] in ("queued", "running", "succeeded")
    for job in (waiting, cut):
        done = wait_status(b, tok, job["id"], {"succeeded", "failed", "canceled"}, 60)
        assert done["status"] == "succeeded", done
        assert done["attempt"] in (1, 2)
    assert workers.procs[0].poll() is None  # the same worker, still up


# --- 4. SIGTERM drains a worker ----------------------------------------------------------------------

@pytest.mark.parametrize("drain_seconds,want", [(25.0, "finished"), (0.5, "requeued")])
def test_sigterm_finishes_or_requeues_the_running_job_and_exits_0(api_nodes, workers, redis_server, drain_seconds,
                                                                 want):
    settings, (a,) = api_nodes(1)
    conn = redis_server.client()
    p = workers.start(settings.replace(drain_seconds=drain_seconds), name="w0", step_seconds=0.3)
    workers.wait_registered(conn, ["w0"])
    _, tok = upload(a)
    job = generate(a, tok, quality_mode="high_fidelity")  # 8 x 0.3 s
    wait_until(lambda: status(a, tok, job["id"])["progress"]["step"] >= 1, 30, 0.02)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0, workers.log(p)
    after = status(a, tok, job["id"])
    if want == "finished":
        assert after["status"] == "succeeded" and after["attempt"] == 1
        return
    assert after["status"] == "queued" and after["attempt"] == 0, after
    workers.start(settings, name="w1")
    done = wait_status(a, tok, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["attempt"] == 1


# --- 8. /system-status ---------------------------------------------------------------------------

def test_system_status_lists_workers_and_queue_depth(api_nodes, workers, redis_server):
    settings, (a, b) = api_nodes()
    conn = redis_server.client()
    workers.start(settings, name="w0", step_seconds=0.3)
    workers.wait_registered(conn, ["w0"])
    _, tok = upload(a)
    running = generate(a, tok, quality_mode="high_fidelity")
    waiting = generate(a, tok)
    wait_until(lambda: status(a, tok, running["id"])["status"] == "running", 20, 0.02)
    body = b.get("/system-status").json
    assert body["mode"] == "cluster" and body["workers"] == 1
    assert body["queue"]["depth"] == 1 and body["queue"]["running"] == 1
    (w,) = body["cluster"]["workers"]
    assert w["name"] == "w0" and w["host"] and w["gpu_name"] == "CPU" and w["current_job"] == running["id"]
    assert 0 <= w["heartbeat_age_s"] < 5
    assert status(a, tok, waiting["id"])["position"] == 1


# --- 7. rate limits, deletes and the sweep across nodes ---------------------------------------------

def test_rate_limit_holds_across_api_nodes(api_nodes):
    settings, (a, b) = api_nodes(rate_limit_generate="2/minute")
    _, tok = upload(a)
    codes = [node.post("/generate", json={"prompt": "x"}, headers={TOKEN_HEADER: tok}).status_code
             for node in (a, b, a)]
    assert codes == [202, 202, 429]


def test_delete_session_on_b_removes_files_and_records_of_jobs_run_by_a_worker(api_nodes, workers, redis_server):
    settings, (a, b) = api_nodes()
    workers.start(settings, name="w0")
    workers.wait_registered(redis_server.client(), ["w0"])
    session_id, tok = upload(a)
    job = generate(a, tok)
    assert wait_status(a, tok, job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert (settings.data_dir / session_id).is_dir()
    r = b.delete(f"/sessions/{session_id}", headers={TOKEN_HEADER: tok})
    assert r.status_code == 200
    assert not (settings.data_dir / session_id).exists()
    assert a.get(f"/status/{job['id']}", headers={TOKEN_HEADER: tok}).status_code == 404
    assert not [k for k in redis_server.client().keys("twin:*") if job["id"].encode() in k or session_id.encode() in k]


def test_retention_sweep_on_one_node_removes_sessions_made_on_another(api_nodes, workers, redis_server):
    settings, (a, b) = api_nodes(retention_hours=1.0)
    workers.start(settings, name="w0")
    workers.wait_registered(redis_server.client(), ["w0"])
    old_session, tok = upload(a)
    job = generate(a, tok, session_id=old_session)
    assert wait_status(a, tok, job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    runtime_b = b.application.extensions["twin"]
    assert runtime_b.sessions.sweep(now=time.time() + 3601) == [old_session]
    assert not (settings.data_dir / old_session).exists()
    assert a.get(f"/status/{job['id']}", headers={TOKEN_HEADER: tok}).status_code == 404
    assert runtime_b.store.get_session(old_session) is None
    # The sweep loop runs once per interval cluster-wide: the second node's turn is refused.
    assert a.application.extensions["twin"].queue.acquire_singleton("probe", 60) is True
    assert runtime_b.queue.acquire_singleton("probe", 60) is False


# --- the real commands: gunicorn API node + worker process, test_api.sh against the cluster ---------

@pytest.mark.slow
def test_test_api_sh_against_a_cluster(server_kind, start_server, workers, redis_server, tmp_path):
    """The documented API walk-through (test_api.sh) against a gunicorn API node in cluster mode with one
    worker process: on the doubles, and on the real tiny-profile engines (the worker runs
    DigitalTwinGenerator in-process, the API node encodes the upload's identity)."""
    import requests
    kind, app_spec, env = server_kind
    env = {**env, "TWIN_QUEUE_URL": redis_server.url, "TWIN_WORKER_HEARTBEAT_SECONDS": "0.5"}
    server = start_server(env, app_spec=app_spec)
    worker_env = {k: v for k, v in env.items() if k.startswith("TWIN_")}
    workers.start_env(worker_env, name="w0", components=None if kind == "real" else
                      "tests.fake_server_app:worker_components")
    workers.wait_registered(redis_server.client(), ["w0"], timeout=180)
    out = tmp_path / "downloads"
    proc = subprocess.run([str(REPO / "test_api.sh"), server.url], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT_DIR": str(out), "POLL_TIMEOUT": "300",
                                            "PYTHON": sys.executable})
    assert proc.returncode == 0, (f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nserver:\n{server.log_tail()}"
                                  f"\nworker:\n{workers.log(workers.procs[0])}")
    assert len(list(out.glob("avatar_*.png"))) == 1
    body = requests.get(server.url + "/system-status", timeout=5).json()
    assert body["mode"] == "cluster" and body["cluster"]["workers"][0]["name"] == "w0"
    assert body["jobs"]["succeeded"] >= 1


def test_sigterm_to_an_idle_worker_exits_0(api_nodes, workers, redis_server):
    settings, _ = api_nodes(1)
    p = workers.start(settings, name="w0")
    workers.wait_registered(redis_server.client(), ["w0"])
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0, workers.log(p)


# --- live events through Redis streams (issue 13 in cluster mode) -------------------------------

def test_events_of_a_job_run_by_a_worker_stream_from_any_api_node(api_nodes, workers, redis_server):
    from tests.fakes import QUALITY_STEPS
    from tests.test_events import parse_sse
    settings, (a, b) = api_nodes()
    workers.start(settings, name="w0")
    workers.wait_registered(redis_server.client(), ["w0"])
    _, tok = upload(a)
    job = generate(b, tok, num_images=2, quality_mode="fast")
    r = a.get(f"/events/{job['id']}", headers={TOKEN_HEADER: tok})  # buffered: until `done`
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = parse_sse(r.get_data(as_text=True))[0]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"]["status"] for e in events if e["event"] == "status"] == ["queued", "running", "succeeded"]
    assert [e["data"]["step"] for e in events if e["event"] == "progress"] == list(range(1, QUALITY_STEPS["fast"] + 1))
    assert [e["data"]["filename"] for e in events if e["event"] == "output"] == ["avatar_001.png", "avatar_002.png"]
    assert events[-1]["event"] == "done" and events[-1]["data"]["status"] == "succeeded"
    # Resume on the other node from the middle: the rest, once each.
    mid = events[len(events) // 2]["id"]
    rest = parse_sse(b.get(f"/events/{job['id']}", headers={TOKEN_HEADER: tok, "Last-Event-ID": str(mid)})
                     .get_data(as_text=True))[0]
    assert [e["id"] for e in rest] == [e["id"] for e in events if e["id"] > mid]


def test_webhooks_of_a_job_run_by_a_worker_are_sent_by_the_worker(api_nodes, workers, redis_server):
    from tests.test_webhooks import SECRET, Receiver, readme_verify
    rec = Receiver()
    try:
        settings, (a, b) = api_nodes(webhook_secret=SECRET, webhook_allow_private=True, webhook_retry_base_seconds=0.01)
        workers.start(settings, name="w0")
        workers.wait_registered(redis_server.client(), ["w0"])
        _, tok = upload(a)
        job = generate(b, tok, webhook=rec.url, webhook_events=["start", "output", "completed"])
        wait_until(lambda: "job.completed" in rec.events(), timeout=30)
        assert rec.events() == ["job.start", "job.output", "job.completed"]
        verify, _ = readme_verify()
        assert all(verify(SECRET, r["body"], r["headers"])["data"]["job_id"] == job["id"] for r in rec.received)
        ids = [r["headers"]["webhook-id"] for r in rec.received]
        assert len(set(ids)) == 3 and all(i.startswith(f"msg_{job['id']}_1_") for i in ids)  # attempt 1
        done = wait_until(lambda: (lambda j: j if len(j["webhook"]["deliveries"]) == 3 else None)(
            status(a, tok, job["id"])), timeout=10)
        assert [d["status"] for d in done["webhook"]["deliveries"]] == [204, 204, 204]
    finally:
        rec.close()


# --- 8. Idempotency-Key across API nodes (records in Redis: utils/jobs/cluster/idempotency.RedisIdempotencyStore) ----

def idem_post(node, tok: str, key: str, endpoint: str = "generate", **body):
    headers = {TOKEN_HEADER: tok, "Idempotency-Key": key}
    if endpoint == "upload":
        return node.post("/upload", data={"files": [(io.BytesIO(image_bytes((10 * i, 90, 40))), f"s{i}.png")
                                                    for i in range(2)]},
                         content_type="multipart/form-data", headers=headers)
    return node.post("/generate", json={"prompt": "a portrait", **body}, headers=headers)


def job_total(node) -> int:
    return sum(node.application.extensions["twin"].store.counts().values())


@pytest.mark.parametrize("endpoint, id_field, ok, own_data_dirs", [
    ("generate", "id", 202, False),
    ("generate", "id", 202, True),    # nothing shared but Redis: a jobs.db record could not be seen
    ("upload", "session_id", 200, False),
    ("upload", "session_id", 200, True),
])
def test_idem_key_on_a_then_b_answers_the_first_answer(api_nodes, endpoint, id_field, ok, own_data_dirs):
    settings, (a, b) = api_nodes(own_data_dirs=own_data_dirs)
    _, tok = upload(a)
    jobs_before = job_total(a)
    first = idem_post(a, tok, "k-ab-1", endpoint, seed=1)
    again = idem_post(b, tok, "k-ab-1", endpoint, seed=1)
    assert first.status_code == again.status_code == ok, (first.json, again.json)
    assert again.json[id_field] == first.json[id_field]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    if endpoint == "generate":
        assert job_total(a) == job_total(b) == jobs_before + 1
        other = idem_post(b, tok, "k-ab-1", endpoint, seed=2)  # same key, other body, other node
        assert other.status_code == 422 and other.json["error"]["code"] == "idempotency_key_reused"


def test_idem_concurrent_same_key_on_both_nodes_makes_one_job(api_nodes, monkeypatch):
    """Both nodes get the request at once: one claims the key (202), the other answers 409 or, when the
    first already answered, the replay. Never two jobs. Slowed submit keeps the window wide open."""
    import threading
    settings, (a, b) = api_nodes()
    _, tok = upload(a)
    for node in (a, b):
        rt = node.application.extensions["twin"]
        real = rt.jobs.submit
        monkeypatch.setattr(rt.jobs, "submit", lambda *x, _real=real, **kw: (time.sleep(0.3), _real(*x, **kw))[1])
    for round_ in range(5):
        start, got = threading.Barrier(2), {}

        def go(name, node, key=f"k-race-{round_}"):
            start.wait()
            got[name] = idem_post(node, tok, key, seed=round_)
        before = job_total(a)
        threads = [threading.Thread(target=go, args=(n, c)) for n, c in (("a", a), ("b", b))]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        fresh = [r for r in got.values() if r.status_code == 202 and "Idempotent-Replayed" not in r.headers]
        others = [r for r in got.values() if r not in fresh]
        assert len(fresh) == 1 and len(others) == 1, [(r.status_code, r.json) for r in got.values()]
        assert others[0].status_code == 409 or others[0].json["id"] == fresh[0].json["id"]
        assert job_total(a) == before + 1


def test_idem_node_dying_mid_request_frees_the_key_after_the_in_flight_ttl(api_nodes, monkeypatch):
    """Node A claims the key and never answers (hung, then dies without cleaning up): B answers 409 until
    TWIN_IDEMPOTENCY_IN_FLIGHT_SECONDS pass, then runs the request; A's late end cannot undo B's answer."""
    import threading
    settings, (a, b) = api_nodes(idempotency_in_flight_seconds=1.0)
    _, tok = upload(a)
    rt_a = a.application.extensions["twin"]
    entered, release = threading.Event(), threading.Event()

    def dying_submit(*x, **kw):
        entered.set()
        release.wait(20)
        raise KeyboardInterrupt("node A dies")  # a BaseException: app.idempotent() abandons only its own marker
    monkeypatch.setattr(rt_a.jobs, "submit", dying_submit)

    def run_a():
        try:
            idem_post(a, tok, "k-dead", seed=9)
        except KeyboardInterrupt:
            pass
    t = threading.Thread(target=run_a, daemon=True)
    t.start()
    assert entered.wait(10)
    r = idem_post(b, tok, "k-dead", seed=9)
    assert r.status_code == 409 and r.json["error"]["code"] == "idempotency_in_flight"
    time.sleep(1.3)
    r = idem_post(b, tok, "k-dead", seed=9)
    assert r.status_code == 202 and "Idempotent-Replayed" not in r.headers, r.json
    release.set()
    t.join(10)
    again = idem_post(a, tok, "k-dead", seed=9)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json["id"] == r.json["id"]


def test_idem_records_go_with_the_session_deleted_on_another_node(api_nodes, redis_server):
    settings, (a, b) = api_nodes()
    session_id, tok = upload(a)
    first = idem_post(a, tok, "k-del", session_id=session_id, seed=1)
    assert first.status_code == 202
    conn = redis_server.client()
    assert len(list(conn.scan_iter("twin:idem:*"))) == 1
    assert b.delete(f"/sessions/{session_id}", headers={TOKEN_HEADER: tok}).status_code == 200
    assert list(conn.scan_iter("twin:idem:*")) == [] and list(conn.scan_iter("twin:idem_session:*")) == []
    upload(a, tok)
    again = idem_post(a, tok, "k-del", seed=1)
    assert again.status_code == 202 and again.json["id"] != first.json["id"]
    assert "Idempotent-Replayed" not in again.headers


def test_idem_with_redis_away_is_a_503_not_a_500(api_nodes, redis_server):
    settings, (a, b) = api_nodes()
    _, tok = upload(a)
    redis_server.stop()
    r = idem_post(b, tok, "k-away", seed=1)
    assert r.status_code == 503 and r.json["error"]["code"] == "queue_unavailable", r.json
    assert int(r.headers["Retry-After"]) > 0


def test_idem_records_go_with_a_session_swept_by_a_worker_process(api_nodes, workers, redis_server):
    """The retention sweep runs in whichever process wins the cluster-wide lock, a GPU worker too."""
    settings, (a, b) = api_nodes(retention_hours=0.0003)  # ~1 s
    session_id, tok = upload(a)
    assert idem_post(a, tok, "k-swept", session_id=session_id, seed=1).status_code == 202
    conn = redis_server.client()
    assert len(list(conn.scan_iter("twin:idem:*"))) == 1
    for node in (a, b):  # the API nodes keep out of it: the worker's Runtime is the one that sweeps
        node.application.extensions["twin"].sessions.deleted_hooks.clear()
    time.sleep(1.2)
    conn.delete("twin:once:retention-sweep")  # the API nodes' start-up turn: the worker's start-up sweep runs now
    workers.start(settings, name="w0")
    workers.wait_registered(conn, ["w0"])
    wait_until(lambda: conn.exists(f"twin:session:{session_id}") == 0 and not list(conn.scan_iter("twin:idem:*")),
               30, 0.1)
