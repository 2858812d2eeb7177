"""The container files, checked cheaply in the normal suite (no podman): Dockerfile, .dockerignore, the
compose files, the entrypoint's roles (run against stub scripts), the HEALTHCHECK script and the layer
scanner. scripts/container_test.sh builds and runs the real image (CI stage "containers").
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.service import REPO

ENTRYPOINT = REPO / "scripts" / "docker-entrypoint.sh"
HEALTHCHECK = REPO / "scripts" / "container_healthcheck.py"
SCAN = REPO / "scripts" / "container_scan.py"


# --- Dockerfile and .dockerignore ---

def dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) per stage; stage 0 = before the first FROM."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_the_default_target_runs_as_the_unprivileged_user():
    final = dockerfile_stages()[-1]
    users = [i.split(None, 1)[1] for i in final if i.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:")), final


def test_healthcheck_entrypoint_and_stop_signal_are_declared():
    instructions = [i for stage in dockerfile_stages() for i in stage]
    health = [i for i in instructions if i.upper().startswith("HEALTHCHECK ")]
    assert len(health) == 1 and "scripts/container_healthcheck.py" in health[0]
    assert any(i.startswith("ENTRYPOINT ") and "scripts/docker-entrypoint.sh" in i and "tini" in i for i in instructions)
    assert "STOPSIGNAL SIGTERM" in instructions
    assert any(i.startswith('VOLUME ["/data", "/models", "/cache/huggingface"]') for i in instructions)


@pytest.mark.parametrize("arg, default", [
    ("BASE_IMAGE", "docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04"),  # users: a CUDA runtime base
    ("TORCH", "cuda"),
])
def test_build_arguments_default_to_the_gpu_build(arg, default):
    args = dict(i.split(None, 1)[1].split("=", 1) for stage in dockerfile_stages() for i in stage
                if i.startswith("ARG ") and "=" in i)
    assert args[arg] == default


def test_no_weights_venv_or_data_are_copied_and_the_context_excludes_them():
    copies = [i.split()[1:] for stage in dockerfile_stages() for i in stage if i.upper().startswith(("COPY ", "ADD "))]
    for words in copies:
        if any(w.startswith("--from=") for w in words):
            continue  # between stages (the builder's /opt/venv), not from the build context
        sources = [w for w in words if not w.startswith("--")][:-1]
        assert not [s for s in sources if s.strip("./").split("/")[0] in ("models", ".venv", "twin_data", ".git")], words
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {"models", ".venv", "twin_data", ".git", ".env", "*.env"} <= ignored


def test_the_build_installs_torch_as_deploy_production_does():
    """The same pinned torch; the CUDA index and onnxruntime-gpu swap deploy_production.sh uses."""
    dockerfile = (REPO / "Dockerfile").read_text()
    deploy = (REPO / "deploy_production.sh").read_text()
    index = re.search(r"TORCH_INDEX:-(https://download\.pytorch\.org/whl/cu\d+)", deploy).group(1)
    assert f"TORCH_INDEX_URL:-{index}" in dockerfile
    assert "grep -E '^torch==' /tmp/req/requirements.txt" in dockerfile
    assert "onnxruntime-gpu==" in dockerfile and "onnxruntime-gpu==" in deploy


# --- compose ---

class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: "!reset")


def compose(name: str) -> dict:
    return yaml.load((REPO / name).read_text(), Loader=_ComposeLoader)  # noqa: S506 - SafeLoader subclass


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_compose_has_redis_with_aof_api_and_a_gpu_worker():
    c = compose("docker-compose.yml")
    assert set(c["services"]) == {"redis", "api", "worker"}
    assert "--appendonly" in c["services"]["redis"]["command"] and "redis:/data" in c["services"]["redis"]["volumes"]
    worker, api = c["services"]["worker"], c["services"]["api"]
    assert worker["command"] == ["worker"] and api["command"] == ["api"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in gpu_devices(worker)
    for svc in (worker, api):
        assert svc["environment"]["TWIN_QUEUE_URL"] == "redis://redis:6379/0"
        assert "data:/data" in svc["volumes"] and "models:/models" in svc["volumes"]
        assert svc["env_file"].endswith("twin.env}")


def test_compose_stop_grace_outlasts_gunicorns_drain():
    cfg: dict = {}
    exec((REPO / "gunicorn.conf.py").read_text(), cfg)
    for name in ("api", "worker"):
        grace = compose("docker-compose.yml")["services"][name]["stop_grace_period"]
        assert int(grace.rstrip("s")) > cfg["graceful_timeout"]


def test_cpu_override_drops_the_gpu_and_runs_the_tiny_profile():
    c, base = compose("docker-compose.cpu.yml"), compose("docker-compose.yml")
    for name in ("api", "worker"):
        svc = c["services"][name]
        # a !reset where the base service has no deploy crashes podman-compose 1.6 (copied unresolved)
        assert (svc.get("deploy") == "!reset") == ("deploy" in base["services"][name]), name
        assert svc["environment"]["TWIN_MODEL_PROFILE"] == "tiny" and svc["environment"]["TWIN_DEVICE"] == "cpu"
        assert svc["build"]["args"]["TORCH"] == "cpu"


def test_the_env_example_is_kept_out_of_git_and_the_image():
    assert "twin.env" in (REPO / ".gitignore").read_text().split()
    example = (REPO / "twin.env.example").read_text()
    assert re.search(r"^TWIN_API_KEYS=$", example, re.M)  # no key shipped


# --- README ---

def entrypoint_roles() -> list[str]:
    body = ENTRYPOINT.read_text().split('case $role in', 1)[1]
    return re.findall(r"^  ([a-z]+)\)", body, re.M)


def test_every_entrypoint_role_is_documented():
    roles = entrypoint_roles()
    assert roles == ["all", "api", "worker", "download", "verify"]
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Containers", 1)[1].split("\n## ", 1)[0]
    for role in roles:
        assert re.search(rf"^\| `{role}` \|", section, re.M), f"role {role} missing from README's role table"
    for topic in ("RunPod", "### `docker run` on any GPU host", "--gpus all", "HEALTHCHECK", "stop-timeout", "/models", "/data",
                  "/cache/huggingface", "docker-compose.cpu.yml"):
        assert topic in section, topic


def test_readme_keeps_its_first_two_commands():
    first = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first[0].startswith("./start_app.sh ") and first[1].startswith("./test.sh ")


# --- the entrypoint, against stub scripts ---

STUB_APP = """#!/usr/bin/env bash
echo "start_app queue=${TWIN_QUEUE_URL:-}$*" >> "$STUB_LOG"
"""
STUB_WORKER = """#!/usr/bin/env bash
echo "start_worker gpu=${CUDA_VISIBLE_DEVICES:-none} $*" >> "$STUB_LOG"
trap 'echo "term gpu=${CUDA_VISIBLE_DEVICES:-none}" >> "$STUB_LOG"; exit 0' TERM
[ "${STUB_RUN:-0}" = 1 ] || exit 0
[ "${CUDA_VISIBLE_DEVICES:-}" = "${STUB_EXIT_GPU:-x}" ] && { sleep 0.5; exit 3; }
while :; do sleep 0.05; done
"""
STUB_PYTHON = """#!/usr/bin/env bash
echo "python offline=${HF_HUB_OFFLINE:-unset} $*" >> "$STUB_LOG"
[ "$2" = verify ] && exit "${STUB_VERIFY_RC:-0}"
exit 0
"""


@pytest.fixture
def stub_tree():
    """The entrypoint in a copy of the layout it expects, beside stubs that log how they were called.
    Run as an unprivileged user when the suite runs as root (the entrypoint's root branch is for images)."""
    root = Path(tempfile.mkdtemp(prefix="twin-entrypoint-"))
    (root / "scripts").mkdir()
    shutil.copy(ENTRYPOINT, root / "scripts" / "docker-entrypoint.sh")
    for name, body in (("start_app.sh", STUB_APP), ("start_worker.sh", STUB_WORKER),
                       ("venv/bin/python", STUB_PYTHON)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    (root / "log").touch()
    for p in [root, *root.rglob("*")]:
        p.chmod(0o777 if p.is_dir() or p.name == "log" or p.suffix in (".sh", "") else 0o666)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_entrypoint(root: Path, *args: str, env: dict | None = None, wait: bool = True):
    path = ":".join(p for p in os.environ["PATH"].split(":") if not shutil.which("nvidia-smi", path=p))
    full = {"PATH": path, "STUB_LOG": str(root / "log"), "VENV": str(root / "venv"),
            "CONTAINER_ROLE_FILE": str(root / "role"), "HOSTNAME": "box", **(env or {})}
    kw = {"user": 65534} if os.getuid() == 0 else {}
    proc = subprocess.Popen([str(root / "scripts" / "docker-entrypoint.sh"), *args], env=full, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if wait:
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out, (root / "log").read_text().splitlines()
    return proc


@pytest.mark.parametrize("args, env, rc, log, message", [
    ((), {}, 0, ["start_app queue="], ""),
    (("all",), {"TWIN_QUEUE_URL": "redis://r:6379/0"}, 2, [], "role all is one box without Redis"),
    (("all", "--x"), {}, 2, [], "role all takes no arguments"),
    (("api",), {}, 2, [], "role api needs TWIN_QUEUE_URL"),
    (("api",), {"TWIN_QUEUE_URL": "redis://r:6379/0"}, 0, ["start_app queue=redis://r:6379/0"], ""),
    (("worker",), {}, 2, [], "role worker needs TWIN_QUEUE_URL"),
    (("worker", "--burst"), {"TWIN_QUEUE_URL": "redis://r/0", "WORKER_NAME": "w1"}, 0,
     ["start_worker gpu=none --name w1 --burst"], ""),
    (("worker", "--name", "mine"), {"TWIN_QUEUE_URL": "redis://r/0", "WORKER_GPUS": "2"}, 0,
     ["start_worker gpu=2 --name mine"], ""),
    (("download", "--instantid"), {}, 0, ["python offline=0 model_loader.py download --instantid"], ""),
    (("verify",), {"HF_HUB_OFFLINE": "1"}, 0, ["python offline=1 model_loader.py verify"], ""),
    (("all",), {"DOWNLOAD_WEIGHTS": "1", "STUB_VERIFY_RC": "1", "DOWNLOAD_ARGS": "--faceid"}, 0,
     ["python offline=unset model_loader.py verify", "python offline=0 model_loader.py download --faceid",
      "start_app queue="], "preflight failed: downloading"),
    (("all",), {"DOWNLOAD_WEIGHTS": "1"}, 0,
     ["python offline=unset model_loader.py verify", "start_app queue="], "no download"),
    (("echo", "any", "command"), {}, 0, [], "any command"),
])
def test_entrypoint_roles(stub_tree, args, env, rc, log, message):
    code, out, lines = run_entrypoint(stub_tree, *args, env=env)
    assert code == rc, out
    assert lines == log
    assert message in out


def test_single_worker_gets_a_unique_name(stub_tree):
    names = set()
    for _ in range(2):
        code, out, lines = run_entrypoint(stub_tree, "worker", env={"TWIN_QUEUE_URL": "redis://r/0"})
        assert code == 0, out
        names.add(lines[-1].split("--name ")[1])
    assert len(names) == 2 and all(re.fullmatch(r"box\.[0-9a-f]{8}", n) for n in names), names
    assert (stub_tree / "role").read_text().strip() == "worker"


def wait_for_lines(root: Path, n: int, timeout: float = 10.0) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = (root / "log").read_text().splitlines()
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    raise AssertionError((root / "log").read_text())


def test_several_gpus_one_worker_each_and_sigterm_reaches_all(stub_tree):
    proc = run_entrypoint(stub_tree, "worker", env={"TWIN_QUEUE_URL": "redis://r/0", "WORKER_GPUS": "0 1",
                                                    "WORKER_NAME": "host", "STUB_RUN": "1"}, wait=False)
    started = wait_for_lines(stub_tree, 2)
    assert sorted(started) == ["start_worker gpu=0 --name host.gpu0", "start_worker gpu=1 --name host.gpu1"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, proc.stdout.read()
    assert sorted(wait_for_lines(stub_tree, 4)[2:]) == ["term gpu=0", "term gpu=1"]


def test_a_worker_that_dies_stops_the_others_and_the_container(stub_tree):
    proc = run_entrypoint(stub_tree, "worker", env={"TWIN_QUEUE_URL": "redis://r/0", "WORKER_GPUS": "0 1",
                                                    "STUB_EXIT_GPU": "1", "STUB_RUN": "1"}, wait=False)
    assert proc.wait(10) == 3
    assert "a worker exited (status 3): stopping the others" in proc.stdout.read()
    assert wait_for_lines(stub_tree, 3)[2:] == ["term gpu=0"]


# --- the HEALTHCHECK script ---

@pytest.fixture
def health_server():
    """A stand-in /health that answers whatever body the test sets."""
    body = {"status": "ok", "state": "starting"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address[1], body
    server.shutdown()


def healthcheck(tmp_path: Path, role: str | None, **env) -> subprocess.CompletedProcess:
    role_file = tmp_path / "role"
    if role:
        role_file.write_text(role + "\n")
    return subprocess.run([sys.executable, str(HEALTHCHECK), "--role-file", str(role_file), "--timeout", "2"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("role", ["all", "api", None])
@pytest.mark.parametrize("state, extra, healthy", [
    ("starting", {}, False),
    ("setup_failed", {"error": "weights missing"}, False),
    ("restarting", {}, False),
    ("queue_unavailable", {}, False),
    ("ready", {}, True),
    ("ready", {"draining": True}, True),
])
def test_http_roles_are_healthy_only_when_ready(tmp_path, health_server, role, state, extra, healthy):
    port, body = health_server
    body.update(state=state, **extra)
    r = healthcheck(tmp_path, role, TWIN_HOST="0.0.0.0", TWIN_PORT=str(port))
    assert (r.returncode == 0) is healthy, r.stdout + r.stderr
    assert state in r.stdout or "ready" in r.stdout


def test_http_role_without_a_server_is_unhealthy(tmp_path):
    from tests.fixtures.redis_server import free_port
    r = healthcheck(tmp_path, "all", TWIN_HOST="127.0.0.1", TWIN_PORT=str(free_port()))
    assert r.returncode == 1 and "did not answer" in r.stdout


def test_worker_role_is_healthy_while_its_redis_answers(tmp_path, redis_server):
    assert healthcheck(tmp_path, "worker", TWIN_QUEUE_URL=redis_server.url).returncode == 0
    redis_server.stop()
    r = healthcheck(tmp_path, "worker", TWIN_QUEUE_URL=redis_server.url)
    assert r.returncode == 1 and "does not answer" in r.stdout
    assert healthcheck(tmp_path, "worker", TWIN_QUEUE_URL="").returncode == 1


# --- the layer scanner ---

def fake_cert(seed: int) -> tuple[bytes, bytes]:
    """(PEM, DER) of a certificate-shaped blob: the scanner matches bytes, it does not parse X.509."""
    der = hashlib.sha256(str(seed).encode()).digest() * 24
    b64 = base64.b64encode(der)
    pem = b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64)) \
        + b"\n-----END CERTIFICATE-----\n"
    return pem, der


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_key() -> bytes:
    body = base64.b64encode(hashlib.sha512(b"not a real key").digest() * 4)
    return b"-----BEGIN PRIVATE KEY-----\n" + body[:64] + b"\n" + body[64:128] + b"\n-----END PRIVATE KEY-----\n"


PUBLIC_PEM, _ = fake_cert(1)
HOST_PEM, HOST_DER = fake_cert(2)          # the host's own CA: in its bundle, not public
BUNDLE = PUBLIC_PEM + HOST_PEM
HF = b"hf_" + b"A" * 17 + b"b" * 17


@pytest.mark.parametrize("files, found", [
    ({"usr/lib/python3/x.py": b"print('clean')", "etc/ssl/certs/ca.crt": PUBLIC_PEM}, []),
    ({"etc/pip/cert.pem": BUNDLE}, ["the host's CA bundle (byte for byte)",
                                    "a certificate of the host's CA bundle that is not a public CA"]),
    ({"usr/share/ca.der": b"\0" * 100 + HOST_DER + b"\0"}, ["a certificate of the host's CA bundle that is not a public CA"]),
    ({"app/key.pem": fake_key()}, ["private key"]),
    ({"lib/libtls.so": b"\0-----BEGIN RSA PRIVATE KEY-----\0parser constant"}, []),
    ({"app/config.py": b"TOKEN = '" + HF + b"'"}, ["hugging face token"]),
    ({"app/twin.env": b"TWIN_API_KEYS=" + b"k" * 24 + b"\n"}, ["service key setting"]),
    ({"app/README.md": b"TWIN_API_KEYS=... and hf_hub_download"}, []),
    ({"app/s3.py": b"KEY = 'AKIA" + b"Q3ZT7RXW5PLK2MVB" + b"'"}, ["aws access key"]),
    ({"opt/venv/lib/botocore/data/iam/examples-1.json": b'"AccessKeyId": "AKIAIOSFODNN7EXAMPLE"'}, []),
    ({"models/unet.safetensors": b"weights"}, ["a file in a volume folder (weights or runtime data)"]),
    ({"app/extra.safetensors": b"weights"}, ["a weight file"]),
    ({"opt/venv/lib/onnx/test/model.onnx": b"packaged test model"}, []),
])
def test_scanner_finds_secrets_and_weights(tmp_path, files, found):
    archive = tmp_path / "image.tar"
    archive.write_bytes(tar_bytes({"manifest.json": b"[]", "layer1/layer.tar": tar_bytes({"etc/hostname": b"box"}),
                                   "0123abcd.tar": tar_bytes(files)}))
    (tmp_path / "bundle.pem").write_bytes(BUNDLE)
    (tmp_path / "public.pem").write_bytes(PUBLIC_PEM)
    r = subprocess.run([sys.executable, str(SCAN), str(archive), "--ca-bundle", str(tmp_path / "bundle.pem"),
                        "--public-bundle", str(tmp_path / "public.pem")], capture_output=True, text=True, timeout=60)
    assert "2 layer(s)" in r.stdout and "1 certificate(s) not among 1 public CAs" in r.stdout
    reported = sorted(line.split("): ", 1)[1] for line in r.stdout.splitlines() if line.startswith("[scan] FOUND"))
    assert reported == sorted(found), r.stdout
    assert r.returncode == (1 if found else 0)
    assert HF.decode() not in r.stdout  # what it found is named, never printed


def test_scanner_spares_distribution_files_with_their_recorded_checksum(tmp_path):
    key = fake_key()
    md5 = hashlib.md5(key).hexdigest()
    layer = tar_bytes({"var/lib/dpkg/info/libtls.md5sums": f"{md5}  usr/lib/libtls.so\n".encode(),
                       "usr/lib/libtls.so": key, "usr/lib/libother.so": key})
    archive = tmp_path / "image.tar"
    archive.write_bytes(tar_bytes({"aa.tar": layer}))
    (tmp_path / "bundle.pem").write_bytes(PUBLIC_PEM)
    r = subprocess.run([sys.executable, str(SCAN), str(archive), "--ca-bundle", str(tmp_path / "bundle.pem"),
                        "--public-bundle", str(tmp_path / "bundle.pem")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "checksum as dpkg recorded it (not a failure): usr/lib/libtls.so" in r.stdout
    assert "[scan] FOUND usr/lib/libother.so (aa.tar): private key" in r.stdout
