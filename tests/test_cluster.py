"""Cluster mode (TWIN_QUEUE_URL) on a real redis-server: two API app instances (Flask test clients of
two create_app() calls, as two API nodes behind a load balancer would be) and GPU workers as real
subprocesses (``python -m utils.jobs.rq_worker`` on the generator double, FAKE_STEP_SECONDS per step).
Each test starts its own redis-server on a free port in a temp dir (tests/fixtures/redis_server.py).
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.fakes import FakeFaceService, FakeGenerator, image_bytes
from tests.fixtures.service import REPO, wait_until

pytestmark = pytest.mark.timeout(180)

TOKEN_HEADER = "X-Client-Token"


def cluster_settings(tmp_path: Path, redis_url: str, **kw):
    from utils.config import Settings
    base = dict(data_dir=tmp_path / "data", queue_url=redis_url, retention_hours=0, warmup=False,
                rate_limit_upload="100000/minute", rate_limit_generate="100000/minute",
                worker_heartbeat_seconds=0.5, retry_backoff="1", job_attempts=3, drain_seconds=25.0)
    base.update(kw)
    return Settings(**base)


def settings_env(settings) -> dict[str, str]:
    from utils.config import env_name
    names = ("data_dir", "queue_url", "retention_hours", "warmup", "worker_heartbeat_seconds", "retry_backoff",
             "job_attempts", "drain_seconds", "log_level")
    out = {}
    for n in names:
        v = getattr(settings, n)
        out[env_name(n)] = ("1" if v else "0") if isinstance(v, bool) else str(v)
    return out


class Workers:
    """GPU worker subprocesses on the doubles; all are killed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, settings, *, step_seconds: float = 0.0, name: str | None = None, **env_extra) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
        env.update(settings_env(settings))
        env.update({"FAKE_STEP_SECONDS": str(step_seconds), "PYTHONUNBUFFERED": "1"}, **env_extra)
        name = name or f"w{len(self.procs)}"
        log = open(self.tmp / f"worker-{name}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "utils.jobs.rq_worker", "--name", name,
                              "--components", "tests.fake_server_app:worker_components"],
                             cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def wait_registered(self, conn, names: list[str], timeout: float = 60.0) -> None:
        from rq import Worker

        from utils.jobs.rq_queue import make_queue

        def up():
            have = {w.name for w in Worker.all(queue=make_queue(conn))}
            for p in self.procs:
                if p.poll() is not None and p.name in names:  # type: ignore[attr-defined]
                    raise AssertionError(f"worker {p.name} exited {p.returncode}: {self.log(p)}")  # type: ignore[attr-defined]
            return set(names) <= have
        wait_until(up, timeout, 0.1)

    def log(self, p) -> str:
        return (self.tmp / f"worker-{p.name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.stop_all()


@pytest.fixture
def api_nodes(tmp_path, redis_server):
    """api_nodes(n=2, **settings) -> (settings, [test clients]): n API nodes on one Redis and data dir."""
    from app import create_app
    apps = []

    def _make(n: int = 2, **kw):
        settings = cluster_settings(tmp_path, redis_server.url, **kw)
        clients = []
        for _ in range(n):
            a = create_app(settings, generator=FakeGenerator(), faces=FakeFaceService())
            a.extensions["twin"].wait_ready(10)
            apps.append(a)
            clients.append(a.test_client())
        return settings, clients

    yield _make
    for a in apps:
        a.extensions["twin"].shutdown()


def upload(client, token: str | None = None) -> tuple[str, str]:
    headers = {TOKEN_HEADER: token} if token else {}
    r = client.post("/upload", data={"files": [(io.BytesIO(image_bytes((10 * i, 90, 40))), f"s{i}.png")
                                               for i in range(3)]},
                    content_type="multipart/form-data", headers=headers)
    assert r.status_code == 200, r.json
    return r.json["session_id"], token or r.json["client_token"]


def generate(client, token: str, **body) -> dict:
    r = client.post("/generate", json={"prompt": "a portrait", **body}, headers={TOKEN_HEADER: token})
    assert r.status_code == 202, r.json
    return r.json


def status(client, token: str, job_id: str) -> dict:
    r = client.get(f"/status/{job_id}", headers={TOKEN_HEADER: token})
    assert r.status_code == 200, r.json
    return r.json


def wait_status(client, token, job_id, want: set[str], timeout: float = 30.0) -> dict:
    return wait_until(lambda: (lambda j: j if j["status"] in want else None)(status(client, token, job_id)),
                      timeout, 0.05)


def local_job_shape(make_app) -> dict:
    """The job JSON of local mode, for the shape comparison."""
    app = make_app()
    c = app.test_client()
    _, tok = upload(c)
    job = generate(c, tok)
    return wait_status(c, tok, job["id"], {"succeeded"}, 10)


def shape(obj):
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items() if k not in ("metadata", "request")}
    if isinstance(obj, list):
        return [shape(obj[0])] if obj else []
    return type(obj).__name__ if obj is not None else None


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
