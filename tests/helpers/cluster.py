"""Cluster-mode test helpers: settings, GPU worker subprocesses on the doubles, and the HTTP steps of a
test (upload, generate, status). The fixtures built on them (``workers``, ``api_nodes``) are in
tests/fixtures/cluster.py."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from tests.fakes import image_bytes
from tests.fixtures.service import REPO, wait_until

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
             "job_attempts", "drain_seconds", "log_level", "webhook_secret", "webhook_allow_private",
             "webhook_retry_base_seconds", "storage_url", "s3_endpoint_url", "s3_addressing_style", "s3_max_attempts",
             "download_redirect")
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
        return self.start_env({**settings_env(settings), "FAKE_STEP_SECONDS": str(step_seconds), **env_extra}, name=name)

    def start_env(self, twin_env: dict[str, str], *, name: str | None = None,
                  components: str | None = "tests.fake_server_app:worker_components") -> subprocess.Popen:
        """A worker with exactly these TWIN_* variables; ``components=None``: the real engines."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
        env.update(twin_env)
        env["PYTHONUNBUFFERED"] = "1"
        name = name or f"w{len(self.procs)}"
        log = open(self.tmp / f"worker-{name}.log", "wb")
        extra = ["--components", components] if components else []
        p = subprocess.Popen([sys.executable, "-m", "utils.service.gpu_worker", "--name", name, *extra],
                             cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        p.name = name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def wait_registered(self, conn, names: list[str], timeout: float = 60.0) -> None:
        from rq import Worker

        from utils.jobs.cluster.routing import make_queue

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
