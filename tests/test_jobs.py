"""SqliteJobStore and JobThreads without Flask: durability, recovery, queue limits, worker survival."""
from __future__ import annotations

import threading
import time

import pytest

from tests.helpers.wait import wait_until
from utils import errors
from utils.api.render import job_json
from utils.jobs import JobStatus
from utils.jobs.local.store import SqliteJobStore
from utils.jobs.local.threads import JobThreads
from utils.storage import new_id


@pytest.fixture
def store(tmp_path):
    s = SqliteJobStore(tmp_path / "jobs.db")
    yield s
    s.close()


def add(store, owner="o", queue_max=100):
    return store.create_job(new_id(), session_id="s" * 24, owner=owner, payload={"prompt": "p"},
                            request={"prompt": "p"}, queue_max=queue_max)


def test_status_enum():
    assert JobStatus("queued") is JobStatus.QUEUED and JobStatus.QUEUED == "queued"
    assert [s.value for s in JobStatus if s.terminal] == ["succeeded", "failed", "canceled"]


def test_wal_mode(store):
    assert store._one("PRAGMA journal_mode")[0] == "wal"


def test_records_survive_reopen(tmp_path):
    a = SqliteJobStore(tmp_path / "jobs.db")
    job = add(a)
    a.close()
    b = SqliteJobStore(tmp_path / "jobs.db")
    assert b.get(job["id"])["status"] == "queued"
    b.close()


@pytest.mark.parametrize("requeue, attempts_before, expected_status, expected_code", [
    (False, 1, "failed", "interrupted"),
    (True, 1, "queued", None),
    (True, 2, "failed", "interrupted"),   # re-queued once already: fail the second time
])
def test_recover_running_jobs(store, requeue, attempts_before, expected_status, expected_code):
    job = add(store)
    for _ in range(attempts_before):
        store._exec("UPDATE jobs SET status='queued' WHERE id=?", (job["id"],))
        assert store.claim(job["id"])
    store.set_progress(job["id"], 3, 8)
    store.recover(requeue)
    after = store.get(job["id"])
    assert after["status"] == expected_status and after["error_code"] == expected_code


def test_recover_leaves_terminal_and_queued_alone(store):
    done, waiting = add(store), add(store)
    store.claim(done["id"])
    store.finish(done["id"], JobStatus.SUCCEEDED)
    store.recover(False)
    assert store.get(done["id"])["status"] == "succeeded"
    assert store.get(waiting["id"])["status"] == "queued"


def test_finish_never_overwrites_terminal(store):
    job = add(store)
    assert store.cancel_queued(job["id"])
    assert not store.finish(job["id"], JobStatus.SUCCEEDED)
    assert store.get(job["id"])["status"] == "canceled"


def test_claim_only_once(store):
    job = add(store)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.claim(job["id"]))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


@pytest.mark.parametrize("queue_max, submitted, accepted", [(1, 3, 1), (3, 3, 3), (2, 5, 2)])
def test_queue_limit(store, queue_max, submitted, accepted):
    ok = 0
    for _ in range(submitted):
        try:
            add(store, queue_max=queue_max)
            ok += 1
        except errors.QueueFull as e:
            assert int(e.headers["Retry-After"]) > 0
    assert ok == accepted


def test_positions(store):
    jobs = [add(store) for _ in range(3)]
    assert [store.position(store.get(j["id"])) for j in jobs] == [1, 2, 3]
    store.claim(jobs[0]["id"])
    assert [store.position(store.get(j["id"])) for j in jobs] == [None, 1, 2]


def test_job_json_shape(store):
    job = add(store)
    store.claim(job["id"])
    store.set_progress(job["id"], 2, 4)
    store.add_output(job["id"], {"filename": "avatar_001.png", "seed": 1, "width": 8, "height": 8, "path": "x/y"})
    body = job_json(store.get(job["id"]), store, url_for_output=lambda j, f: f"/download/{j}/{f}")
    assert set(body) >= {"id", "status", "position", "progress", "created_at", "started_at", "finished_at",
                         "request", "outputs", "error"}
    assert body["progress"]["fraction"] == 0.5 and body["progress"]["eta_seconds"] is not None
    assert body["outputs"] == [{"filename": "avatar_001.png", "seed": 1, "width": 8, "height": 8,
                                "url": f"/download/{job['id']}/avatar_001.png"}]  # no server path leaks


def _manager(store, runner, workers=1):
    m = JobThreads(store, runner, workers=workers)
    m.ready.set()
    m.start()
    return m


def test_manager_runs_in_order_and_survives_crashes(store):
    order = []

    def runner(job, on_progress, should_cancel, index):
        order.append(job["payload"]["n"])
        if job["payload"]["n"] == 1:
            raise ValueError("boom")
        on_progress(1, 1)
        return {"ok": True}
    ids = [store.create_job(new_id(), session_id=None, owner="o", payload={"n": n}, request={}, queue_max=10)["id"]
           for n in range(3)]
    m = _manager(store, runner)
    for i in ids:
        m.submit(i)
    wait_until(lambda: all(store.get(i)["status"] in ("succeeded", "failed") for i in ids), 5)
    m.stop()
    assert order == [0, 1, 2]
    assert [store.get(i)["status"] for i in ids] == ["succeeded", "failed", "succeeded"]
    assert store.get(ids[1])["error_code"] == "internal_error"
    assert "boom" not in store.get(ids[1])["error_message"]


def test_manager_starts_queued_jobs_found_in_db(tmp_path):
    s = SqliteJobStore(tmp_path / "jobs.db")
    job = add(s)
    m = _manager(s, lambda *a: None)
    wait_until(lambda: s.get(job["id"])["status"] == "succeeded", 5)
    m.stop()
    s.close()


def test_manager_cancel_running(store):
    started = threading.Event()

    def runner(job, on_progress, should_cancel, index):
        started.set()
        for step in range(1000):
            if should_cancel():
                raise errors.JobCanceled("canceled")
            time.sleep(0.01)
            on_progress(step + 1, 1000)
    job = add(store)
    m = _manager(store, runner)
    m.submit(job["id"])
    assert started.wait(5)
    assert m.cancel(job["id"])
    wait_until(lambda: store.get(job["id"])["status"] == "canceled", 2)
    m.stop()


def test_workers_wait_for_ready(store):
    ran = threading.Event()
    m = JobThreads(store, lambda *a: ran.set(), workers=1)
    m.start()
    m.submit(add(store)["id"])
    assert not ran.wait(0.3)
    m.ready.set()
    assert ran.wait(5)
    m.stop()
