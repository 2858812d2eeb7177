"""Twin studio in cluster mode: a training job runs on an RQ GPU worker (the real tiny engine); a worker
SIGKILLed mid-training leaves its checkpoints, and the retry (attempt 2, on the other worker) resumes from
the last one and finishes."""
from __future__ import annotations

import signal

from tests.helpers.cluster import TOKEN_HEADER, settings_env, status, upload_session, wait_status
from tests.helpers.wait import wait_until

EVERY = 5


def _holder(conn, job_id: str, procs):
    from rq import Worker

    from utils.jobs.cluster.routing import make_queue
    for w in Worker.all(queue=make_queue(conn)):
        if w.get_current_job_id() == job_id:
            return next((p for p in procs if p.name == w.name and p.poll() is None), None)
    return None


def test_sigkilled_worker_training_resumes_from_its_checkpoint(api_nodes, workers, redis_server, tiny_models):
    settings, (a, b) = api_nodes()
    conn = redis_server.client()
    env = {"TWIN_MODEL_PROFILE": "tiny", "TWIN_TINY_MODEL_DIR": str(tiny_models), "TWIN_MAX_STEPS": "2",
           "TWIN_TRAIN_CHECKPOINT_EVERY": str(EVERY)}
    for n in ("w0", "w1"):
        workers.start_env({**settings_env(settings), **env}, name=n,
                          components="tests.fake_server_app:tiny_worker_components")
    workers.wait_registered(conn, ["w0", "w1"], timeout=180)
    sid, tok = upload_session(a)
    r = a.post(f"/sessions/{sid}/train", json={"steps": 300, "rank": 4}, headers={TOKEN_HEADER: tok})
    assert r.status_code == 202, r.json
    job = r.json
    wait_until(lambda: status(a, tok, job["id"])["progress"]["step"] >= 2 * EVERY + 2, 120, 0.02)
    victim = wait_until(lambda: _holder(conn, job["id"], workers.procs), 10, 0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(5)
    run_dir = settings.data_dir / sid / "twin" / "runs" / job["id"]
    assert (run_dir / "checkpoint.pt").exists()                      # the killed run's last checkpoint
    done = wait_status(b, tok, job["id"], {"succeeded", "failed", "canceled"}, 180)
    assert (done["status"], done["attempt"], done["kind"]) == ("succeeded", 2, "train"), done
    resumed = done["metadata"]["resumed_from_step"]
    assert resumed >= 2 * EVERY and resumed % EVERY == 0
    assert not run_dir.exists()
    session = b.get(f"/sessions/{sid}", headers={TOKEN_HEADER: tok}).json
    assert session["twin_model"]["state"] == "ready" and session["twin_model"]["steps"] == 300
