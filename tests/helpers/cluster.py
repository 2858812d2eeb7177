"""Cluster mode (TWIN_QUEUE_URL) from the outside: settings and the TWIN_* environment a GPU worker gets,
GPU worker subprocesses (``python -m utils.service.gpu_worker``), and the HTTP steps against API nodes with
the caller's token. The fixtures built on them (``api_nodes``, ``workers``) are in tests/fixtures/cluster.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO
from tests.helpers.http import TOKEN_HEADER, fake_selfies, upload_ok
from tests.helpers.wait import wait_until

__all__ = ["TOKEN_HEADER", "Workers", "cluster_selfies", "cluster_settings", "generate", "settings_env", "status",
           "upload_session", "wait_status"]


def cluster_settings(tmp_path: Path, redis_url: str, **kw):
    from utils.config import Settings
    base = dict(data_dir=tmp_path / "data", queue_url=redis_url, retention_hours=0, warmup=False,
                rate_limit_upload="100000/minute", rate_limit_generate="100000/minute",
                worker_heartbeat_seconds=0.5, retry_backoff="1", job_attempts=3, drain_seconds=25.0)
    base.update(kw)
    return Settings(**base)


def settings_env(settings) -> dict[str, str]:
    """The TWIN_* variables that give a worker process the cluster part of ``settings``."""
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
    """GPU worker subprocesses on the doubles; ``stop_all`` kills them (the ``workers`` fixture does)."""

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


def cluster_selfies(n: int = 3) -> list[tuple[str, bytes]]:
    """The fake selfies the cluster tests upload: s0.png, s1.png, ..."""
    return fake_selfies(n, colour=(90, 40), name="s{}.png")


def upload_session(client, token: str | None = None) -> tuple[str, str]:
    """Upload three fake selfies (as ``token``, or as a new caller) -> (session_id, token)."""
    body = upload_ok(client, cluster_selfies(3), headers={TOKEN_HEADER: token} if token else {})
    return body["session_id"], token or body["client_token"]


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
