"""The base-model registry in cluster mode, on a real redis-server with GPU workers as real subprocesses
on the registry double (tests/fakes.FakeModelGenerator: FAKE_MODELS, FAKE_MODEL, FAKE_LOAD_SECONDS):
pinned jobs route to the worker holding their model, the submit checks, GET /models, the admin switch
(under load, a broken checkpoint, bad bodies) and pinned jobs stranded when their model goes away.
API nodes and workers: the ``api_nodes`` and ``workers`` fixtures (tests/fixtures/cluster.py)."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.fakes import FakeFaceService, FakeModelGenerator, fake_safety
from tests.helpers.cluster import (TOKEN_HEADER, cluster_settings, generate, settings_env, status, upload_session,
                                   wait_status)
from tests.helpers.http import upload_token
from tests.helpers.wait import wait_until

pytestmark = pytest.mark.timeout(180)
ADMIN = "admin-key-1"
TERMINAL = {"succeeded", "failed", "canceled"}


@pytest.fixture
def nodes(api_nodes):
    """nodes(n=1, **settings) -> (settings, [clients]): API nodes whose generator double accepts ``model``."""
    def _make(n: int = 1, **kw):
        return api_nodes(n, generator=FakeModelGenerator, **{"admin_keys": ADMIN, "model_strand_seconds": 1.0,
                                                              "model_load_wait_seconds": 30.0, **kw})
    return _make


def start(workers, redis_server, settings, spec: dict[str, str], *, step: float = 0.0, load: float = 0.0):
    """Workers named by ``spec`` (name -> active model), registered in RQ and in the model registry."""
    from utils.jobs.cluster.registry import live_workers
    for name, model in spec.items():
        workers.start(settings, name=name, step_seconds=step, FAKE_MODELS="base,alt,broken", FAKE_MODEL=model,
                      FAKE_LOAD_SECONDS=str(load), TWIN_MODEL_STRAND_SECONDS=str(settings.model_strand_seconds))
    conn = redis_server.client()
    workers.wait_registered(conn, list(spec))
    wait_until(lambda: all(live_workers(conn).get(n, {}).get("model") == m for n, m in spec.items()), 30, 0.05)


def admin_load(client, body):
    r = client.post("/models/load", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    return r.status_code, r.get_json()


def test_pinned_jobs_run_on_the_worker_holding_their_model(nodes, workers, redis_server):
    settings, (a, b) = nodes(2)
    start(workers, redis_server, settings, {"w0": "base", "w1": "alt"})
    _, tok = upload_session(a)
    plan = ["alt", "base", None, "alt", "base", None, "alt"]
    jobs = [generate(a if i % 2 else b, tok, **({"model": m} if m else {})) for i, m in enumerate(plan)]
    done = [wait_status(a, tok, j["id"], TERMINAL) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * len(plan), [d.get("error") for d in done]
    for want, d in zip(plan, done):
        assert d["attempt"] == 1
        assert d["metadata"]["model"] == (want or d["metadata"]["model"]) and d["metadata"]["model"] in ("base", "alt")
    # The registry on either node: union catalogue, loaded models, each worker's model.
    body = b.get("/models").get_json()
    assert body["active"] == ["alt", "base"]
    assert [(m["name"], m["active"], m["workers"]) for m in body["models"]] == [
        ("base", True, ["w0"]), ("alt", True, ["w1"]), ("broken", False, [])]
    assert [(w["name"], w["model"], w["state"]) for w in body["workers"]] == [("w0", "base", "idle"),
                                                                              ("w1", "alt", "idle")]
    assert a.get("/loras").get_json() == {"loras": [{"name": "fake_style", "family": "fake", "loaded": True}]}
    st = a.get("/system-status").get_json()
    assert st["model_registry"] is True
    assert sorted((w["name"], w["model"]) for w in st["cluster"]["workers"]) == [("w0", "base"), ("w1", "alt")]


@pytest.mark.parametrize("model, status_code, code, needles", [
    ("alt", 202, None, []),
    ("nope", 400, "unknown_model", ["'nope'", "alt, base, broken"]),          # unknown to every worker: names listed
    ("broken", 409, "model_not_loaded", ["'broken'", "'alt', 'base'"]),      # known, loaded nowhere: names what is
    ("", 400, "invalid_request", ["model=''"]),
    (7, 400, "invalid_request", ["model=7"]),
])
def test_submit_checks_the_model_against_the_live_workers(nodes, workers, redis_server, model, status_code, code,
                                                          needles):
    settings, (a,) = nodes()
    start(workers, redis_server, settings, {"w0": "base", "w1": "alt"})
    _, tok = upload_session(a)
    r = a.post("/generate", json={"prompt": "p", "model": model}, headers={TOKEN_HEADER: tok})
    assert r.status_code == status_code, r.get_json()
    if code:
        err = r.get_json()["error"]
        assert err["code"] == code and all(n in err["message"] for n in needles), err
    else:
        done = wait_status(a, tok, r.get_json()["id"], TERMINAL)
        assert done["status"] == "succeeded" and done["metadata"]["model"] == model


def test_hot_swap_under_load_in_cluster_mode(nodes, workers, redis_server):
    """Two workers switch base -> alt while jobs keep arriving: 0 failed, each reports the model it ran on,
    every job submitted after the answer runs on alt, and the answer gives each worker's swap time."""
    settings, (a, b) = nodes(2)
    start(workers, redis_server, settings, {"w0": "base", "w1": "base"}, step=0.05, load=1.0)
    _, tok = upload_session(a)
    jobs: list[str] = []
    stop = threading.Event()

    def submit_loop():
        while not stop.is_set():
            jobs.append(generate(b, tok, quality_mode="fast")["id"])
            time.sleep(0.05)

    t = threading.Thread(target=submit_loop)
    t.start()
    time.sleep(0.3)
    code, answer = admin_load(a, {"model": "alt"})
    n_during = len(jobs)
    stop.set()
    t.join(10)
    assert code == 200, answer
    assert [(w["name"], w["model"], w["previous"], w["ok"]) for w in answer["workers"]] == [
        ("w0", "alt", "base", True), ("w1", "alt", "base", True)]
    assert all(1.0 <= w["swap_s"] < 10 for w in answer["workers"])
    after = [generate(a, tok, quality_mode="fast")["id"] for _ in range(4)]
    done = [wait_status(a, tok, j, TERMINAL, 60) for j in jobs + after]
    assert [d["status"] for d in done] == ["succeeded"] * len(done), [d.get("error") for d in done]
    used = [d["metadata"]["model"] for d in done]
    print(f"{n_during} jobs during the switch; models used: {used}")
    assert set(used) <= {"base", "alt"} and used[-len(after):] == ["alt"] * len(after)
    body = a.get("/models").get_json()
    assert body["active"] == ["alt"] and {w["model"] for w in body["workers"]} == {"alt"}
    # Jobs pinned to the new model are accepted and run; to the old one: 409 naming what is loaded.
    assert wait_status(a, tok, generate(a, tok, model="alt")["id"], TERMINAL)["metadata"]["model"] == "alt"
    r = a.post("/generate", json={"prompt": "p", "model": "base"}, headers={TOKEN_HEADER: tok})
    assert r.status_code == 409 and "'alt'" in r.get_json()["error"]["message"]


def test_a_broken_checkpoint_answers_422_and_the_old_model_keeps_serving(nodes, workers, redis_server):
    settings, (a,) = nodes()
    start(workers, redis_server, settings, {"w0": "base"}, step=0.05)
    _, tok = upload_session(a)
    running = generate(a, tok, quality_mode="high_fidelity")
    code, body = admin_load(a, {"model": "broken"})
    assert code == 422, body
    assert body["error"]["code"] == "model_load_failed" and "broken.safetensors" in body["error"]["message"]
    (w,) = body["error"]["details"]["workers"]
    assert w["name"] == "w0" and w["ok"] is False and w["model"] == "base"
    cat = a.get("/models").get_json()
    assert cat["active"] == ["base"]
    assert cat["workers"][0]["state"] == "failed" and "broken.safetensors" in cat["workers"][0]["error"]
    later = [generate(a, tok), generate(a, tok, model="base")]
    for j in [running, *later]:
        done = wait_status(a, tok, j["id"], TERMINAL)
        assert done["status"] == "succeeded" and done["metadata"]["model"] == "base", done


@pytest.mark.parametrize("body, headers, status_code, code, needle", [
    ({"model": "nope"}, "admin", 404, "unknown_model", "'nope'"),
    ({"model": "alt", "workers": ["w9"]}, "admin", 404, "unknown_worker", "w9"),
    ({"model": "alt", "workers": "w0"}, "admin", 400, "invalid_request", "workers='w0'"),
    ({"model": "alt", "workers": []}, "admin", 400, "invalid_request", "workers=[]"),
    ({"model": "alt", "extra": 1}, "admin", 400, "invalid_request", "model"),
    ({"model": "alt"}, None, 403, "forbidden", "admin key"),
])
def test_load_bad_requests_in_cluster_mode(nodes, workers, redis_server, body, headers, status_code, code, needle):
    settings, (a,) = nodes()
    start(workers, redis_server, settings, {"w0": "base"})
    h = {"Authorization": f"Bearer {ADMIN}"} if headers else {}
    r = a.post("/models/load", json=body, headers=h)
    assert r.status_code == status_code, r.get_json()
    err = r.get_json()["error"]
    assert err["code"] == code and needle in err["message"], err
    assert a.get("/models").get_json()["active"] == ["base"]


@pytest.mark.parametrize("how", ["switch", "kill"])
def test_a_pinned_job_whose_model_went_away_fails_with_model_not_loaded(nodes, workers, redis_server, how):
    """The only worker holding ``alt`` switches away (or dies) with an alt job queued behind the running
    one: the queued job fails model_not_loaded naming alt after TWIN_MODEL_STRAND_SECONDS; it never hangs."""
    settings, (a,) = nodes()
    start(workers, redis_server, settings, {"w0": "alt", "w1": "base"}, step=0.25)
    _, tok = upload_session(a)
    first = generate(a, tok, model="alt", quality_mode="high_fidelity")    # 8 x 0.25 s on w0
    wait_until(lambda: status(a, tok, first["id"])["progress"]["step"] >= 1, 30, 0.02)
    queued = generate(a, tok, model="alt")
    if how == "switch":
        code, body = admin_load(a, {"model": "base", "workers": ["w0"]})   # waits for the running job
        assert code == 200 and body["workers"][0]["model"] == "base", body
        assert wait_status(a, tok, first["id"], TERMINAL)["metadata"]["model"] == "alt"
    else:
        p = next(p for p in workers.procs if p.name == "w0")
        p.send_signal(signal.SIGKILL)
        p.wait(5)
    t0 = time.time()
    done = wait_status(a, tok, queued["id"], TERMINAL, 40)
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_loaded", done
    assert "'alt'" in done["error"]["message"] and "'base'" in done["error"]["message"]
    assert time.time() - t0 < 30
    if how == "kill":   # the job cut off with its worker cannot run anywhere either
        cut = wait_status(a, tok, first["id"], TERMINAL, 40)
        assert cut["status"] == "failed" and cut["error"]["code"] in ("model_not_loaded", "worker_lost"), cut
    # Unpinned work goes on on the remaining model.
    assert wait_status(a, tok, generate(a, tok)["id"], TERMINAL)["metadata"]["model"] == "base"


def test_a_pinned_job_that_meets_another_model_goes_back_to_its_queue(redis_server, tmp_path):
    """The instant of a switch, in process: the generator already holds ``alt`` while the worker still reads
    ``base``'s queue. The base job it takes is put back (queued, attempt and RQ retry given back) on base's
    queue instead of failing; once a worker holds base again it runs there, as attempt 1."""
    from rq.registry import ScheduledJobRegistry
    from rq.serializers import JSONSerializer

    from tests.fakes import image_bytes
    from utils.jobs.cluster import worker as gpu_worker
    from utils.jobs.cluster.registry import ModelControl
    from utils.jobs.cluster.routing import make_model_queue, make_queue
    from utils.service.wiring import build_runtime
    settings = cluster_settings(tmp_path, redis_server.url, admin_keys=ADMIN)
    gen = FakeModelGenerator(active="base")
    runtime = build_runtime(settings, engines=[gen], faces=FakeFaceService(), gpu_worker=True,
                            safety=fake_safety(settings))
    runtime.start()
    assert runtime.wait_ready(10)
    conn = runtime.store.redis
    worker = gpu_worker.TwinWorker([make_queue(conn)], connection=conn, serializer=JSONSerializer, name="wr",
                                  runtime=runtime)
    control = ModelControl(worker, gen, "wr", {"host": "h", "device": "cpu", "gpu_name": "CPU"})
    worker.listen_for("base")
    gpu_worker._worker = worker
    try:
        owner = "tok:" + "a" * 64
        sid = runtime.sessions.upload([(f"s{i}.png", image_bytes((30 * i, 80, 50))) for i in range(2)], owner)["session_id"]
        job_id = runtime.jobs.submit({"prompt": "p", "model": "base", "session_id": sid}, owner)["id"]
        gen.load_model("alt")            # switched; the worker has not moved its queues yet
        worker.work(burst=True, with_scheduler=False)
        rec = runtime.store.get(job_id)
        assert (rec["status"], rec["attempts"]) == ("queued", 0), rec
        base_q = make_model_queue(conn, "base")
        # Its retry waits on base's queue (scheduled, or already moved there by the maintenance thread).
        assert job_id in ScheduledJobRegistry(queue=base_q).get_job_ids() + base_q.get_job_ids()
        assert job_id not in make_queue(conn).get_job_ids()
        gen.load_model("base")
        worker.listen_for("base")
        wait_until(lambda: runtime.queue.maintenance.enqueue_due_retries(base_q) or job_id in base_q.get_job_ids(),
                   10, 0.1)
        worker.work(burst=True, with_scheduler=False)
        rec = runtime.store.get(job_id)
        assert (rec["status"], rec["attempts"], rec["metadata"]["model"]) == ("succeeded", 1, "base"), rec
    finally:
        gpu_worker._worker = None
        control.stop()
        runtime.shutdown()


@pytest.mark.slow
def test_a_real_tiny_worker_switches_checkpoints_and_refuses_a_broken_file(redis_server, workers, tmp_path,
                                                                          tiny_models, face_service):
    """The same contract on the real engines: a worker process running DigitalTwinGenerator loads the tiny
    single-file checkpoint with from_single_file, and a broken file is named while the old model serves."""
    import shutil

    from app import create_app
    from generate_twin import DigitalTwinGenerator
    from tests.photos import selfie_set
    from utils.jobs.cluster.registry import live_workers
    folder = tmp_path / "tiny-model"
    shutil.copytree(tiny_models, folder)
    (folder / "checkpoints" / "broken.safetensors").write_bytes(b"not a safetensors file")
    settings = cluster_settings(tmp_path, redis_server.url, admin_keys=ADMIN, model_profile="tiny",
                                tiny_model_dir=folder, model_dir=tmp_path / "no-models", max_steps=2,
                                generator_process=False, device="cpu", max_image_side=128)
    workers.start_env({**settings_env(settings), "TWIN_MODEL_PROFILE": "tiny", "TWIN_TINY_MODEL_DIR": str(folder),
                       "TWIN_MODEL_DIR": str(tmp_path / "no-models"), "TWIN_MAX_STEPS": "2", "TWIN_DEVICE": "cpu",
                       "TWIN_FACE_BACKEND": "dlib"}, name="w0", components=None)
    app = create_app(settings, generator=DigitalTwinGenerator(settings), faces=face_service)
    try:
        assert app.extensions["twin"].wait_ready(120)
        c = app.test_client()
        conn = redis_server.client()
        wait_until(lambda: live_workers(conn).get("w0", {}).get("model") == "tiny-sdxl", 180, 0.2)
        tok = upload_token(c, selfie_set(1))[TOKEN_HEADER]
        body = {"prompt": "a portrait", "style": "none", "width": 64, "height": 64, "seed": 3}
        r = c.post("/generate", json={**body, "model": "tiny-alt"}, headers={TOKEN_HEADER: tok})
        assert r.status_code == 409 and "'tiny-sdxl'" in r.get_json()["error"]["message"], r.get_json()
        for model, want_status, needle in [("broken", 422, "broken.safetensors"), ("tiny-alt", 200, None)]:
            code, answer = admin_load(c, {"model": model})
            assert code == want_status, answer
            if needle:
                assert answer["error"]["code"] == "model_load_failed" and needle in answer["error"]["message"]
            else:
                (w,) = answer["workers"]
                assert (w["name"], w["model"], w["previous"], w["ok"]) == ("w0", "tiny-alt", "tiny-sdxl", True)
        for extra in ({"model": "tiny-alt"}, {}):
            job = c.post("/generate", json={**body, **extra}, headers={TOKEN_HEADER: tok}).get_json()
            done = wait_status(c, tok, job["id"], TERMINAL, 120)
            assert done["status"] == "succeeded" and done["metadata"]["model"] == "tiny-alt", done
        # A worker's family is the model family (sdxl | flux, issue 22), no longer the identity model's name
        # ("tiny-sdxl"): routing and the field checks of pinned jobs read it.
        assert c.get("/models").get_json()["workers"][0]["family"] == "sdxl"
        # Across families: the worker switches to the tiny FLUX, publishes its family, and a pinned job's
        # fields are checked against it at submit (a negative prompt needs true_cfg on FLUX).
        code, answer = admin_load(c, {"model": "tiny-flux"})
        assert code == 200 and answer["workers"][0]["model"] == "tiny-flux", answer
        wait_until(lambda: live_workers(conn)["w0"].get("family") == "flux", 30, 0.1)
        r = c.post("/generate", json={**body, "model": "tiny-flux", "negative_prompt": "x"}, headers={TOKEN_HEADER: tok})
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "field_not_applicable", r.get_json()
        job = c.post("/generate", json={**body, "model": "tiny-flux"}, headers={TOKEN_HEADER: tok}).get_json()
        done = wait_status(c, tok, job["id"], TERMINAL, 120)
        assert done["status"] == "succeeded" and (done["metadata"]["model"], done["metadata"]["family"]) == \
            ("tiny-flux", "flux"), done
    finally:
        app.extensions["twin"].shutdown()


def test_a_load_longer_than_the_wait_answers_202_and_the_worker_switches_later(nodes, workers, redis_server):
    settings, (a,) = nodes(model_load_wait_seconds=1.0)
    start(workers, redis_server, settings, {"w0": "base"}, load=3.0)
    code, body = admin_load(a, {"model": "alt"})
    assert code == 202, body
    assert body["pending"] == ["w0"] and body["workers"] == [
        {"name": "w0", "model": "base", "ok": False, "pending": True, "state": "loading"}]
    (w,) = a.get("/models").get_json()["workers"]
    assert (w["model"], w["state"], w["target"]) == ("base", "loading", "alt")
    wait_until(lambda: a.get("/models").get_json()["active"] == ["alt"], 15, 0.1)
    assert a.get("/models").get_json()["workers"][0]["state"] == "idle"


def test_a_worker_that_dies_while_loading_is_reported_not_waited_for(nodes, workers, redis_server):
    settings, (a,) = nodes()
    start(workers, redis_server, settings, {"w0": "base"}, load=20.0)
    p = workers.procs[0]
    threading.Timer(1.0, lambda: p.send_signal(signal.SIGKILL)).start()
    t0 = time.time()
    code, body = admin_load(a, {"model": "alt"})
    assert code == 503 and body["error"]["code"] == "worker_lost" and "w0" in body["error"]["message"], body
    assert time.time() - t0 < 10      # the info hash expires within live_ttl (3 s here), not the 30 s wait
