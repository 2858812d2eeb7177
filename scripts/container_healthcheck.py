"""The container's HEALTHCHECK (Dockerfile): exit 0 = healthy, 1 = not (yet).

api / all: GET http://$TWIN_HOST:$TWIN_PORT/health (loopback when bound to all interfaces) must answer "state": "ready" (/health itself always
answers 200, also while models load or after a failed set-up, so the status code alone says nothing).
worker: no HTTP server; the worker process is PID 1's child (the container ends with it), so healthy means
the Redis at TWIN_QUEUE_URL answers, i.e. the worker can take jobs.
The role comes from the file the entrypoint writes (scripts/docker-entrypoint.sh); without it: api/all.
Standard library only, except the Redis client for the worker role (in the image's venv).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def check_http(host: str, port: str, timeout: float) -> tuple[bool, str]:
    if host in ("", "0.0.0.0", "::", "[::]"):  # bound to every interface: loopback answers
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as r:
            body = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as e:
        return False, f"/health did not answer: {e}"
    state = body.get("state")
    if state != "ready":
        return False, f"state {state!r}" + (f": {body['error']}" if body.get("error") else "")
    return True, "ready" + (" (draining)" if body.get("draining") else "")


def check_queue(url: str, timeout: float) -> tuple[bool, str]:
    if not url:
        return False, "TWIN_QUEUE_URL is not set"
    import redis
    try:
        redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping()
    except redis.RedisError as e:
        return False, f"Redis at {url.split('@')[-1]} does not answer: {e}"
    return True, "Redis answers"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role-file", default=os.environ.get("CONTAINER_ROLE_FILE", "/tmp/twin-role"))
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    try:
        with open(args.role_file, encoding="utf-8") as f:
            role = f.read().strip() or "all"
    except OSError:
        role = "all"
    if role == "worker":
        ok, why = check_queue(os.environ.get("TWIN_QUEUE_URL", ""), args.timeout)
    else:
        ok, why = check_http(os.environ.get("TWIN_HOST", ""), os.environ.get("TWIN_PORT", "5000"), args.timeout)
    print(f"{role}: {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
