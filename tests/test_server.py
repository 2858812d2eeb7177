"""The real server: gunicorn on a free loopback port, driven by test_api.sh to the downloaded PNG."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_test_api_sh_against_gunicorn(server_kind, start_server, tmp_path):
    kind, app_spec, env = server_kind
    server = start_server(env, app_spec=app_spec)
    out = tmp_path / "downloads"
    proc = subprocess.run([str(REPO / "test_api.sh"), server.url], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT_DIR": str(out), "POLL_TIMEOUT": "300"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nserver:\n{server.log_tail()}"
    pngs = list(out.glob("avatar_*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The walk-through's avatar without selfies (identity: none), through the generator process on "real".
    assert (out / "persona_avatar_001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The server logs JSON lines with ids and never image bytes.
    log = server.log_tail(200_000)
    assert '"job_id"' in log and '"request_id"' in log
    health = requests.get(server.url + "/health", timeout=5).json()
    assert health["state"] == "ready"
    if kind == "real":
        assert health["profile"] == "tiny" and health["is_demo"] is True


def test_start_app_serves_the_whole_api_on_tiny_flux_offline(start_server, tiny_models, tmp_path):
    """TWIN_MODEL_PROFILE=tiny-flux ./start_app.sh: the preflight passes on the FLUX folder, gunicorn serves
    the API on FLUX (test_api.sh's walk-through to the PNG), and GET /models lists both families."""
    from tests.fixtures.service import server_env
    env = server_env(tmp_path / "data", tiny_models, TWIN_MODEL_PROFILE="tiny-flux", SKIP_VENV_SETUP="1",
                     VENV=str(Path(sys.executable).parent.parent))
    server = start_server(env, command=[REPO / "start_app.sh"], wait_ready=240)
    proc = subprocess.run([str(REPO / "test_api.sh"), server.url], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT_DIR": str(tmp_path / "out"), "POLL_TIMEOUT": "300",
                                            "PYTHON": sys.executable})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nserver:\n{server.log_tail()}"
    log = server.log_tail(200_000)
    assert "verify: " in log and "0 problem(s) (profile tiny, family flux" in log     # start_app's preflight
    st = requests.get(server.url + "/system-status", timeout=10).json()
    assert (st["model"]["family"], st["model"]["model_name"], st["model"]["is_demo"]) == ("flux", "tiny-flux", True)
    models = requests.get(server.url + "/models", timeout=10).json()
    assert {m["name"]: m["family"] for m in models["models"]} == {
        "tiny-flux": "flux", "tiny-sdxl": "sdxl", "tiny-alt": "sdxl", "tiny-flux-alt": "flux"}
    assert models["active"] == "tiny-flux"


def test_test_api_sh_uses_the_callers_venv(tmp_path):
    """VENV=/elsewhere ./test.sh must not fall back to a venv path of one machine: the script runs $VENV's python."""
    venv = tmp_path / "elsewhere"
    (venv / "bin").mkdir(parents=True)
    marker = tmp_path / "used"
    fake = venv / "bin" / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    proc = subprocess.run([str(REPO / "test_api.sh"), "http://127.0.0.1:9"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**env, "VENV": str(venv)})
    assert proc.returncode != 0 and "FAIL" in proc.stderr  # nothing listens there
    assert marker.exists() and "import" in marker.read_text(), proc.stderr


def test_test_api_sh_fails_when_server_is_down(tmp_path):
    proc = subprocess.run([str(REPO / "test_api.sh"), "http://127.0.0.1:9"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "FAIL" in proc.stderr


@pytest.mark.parametrize("env, message", [
    ({"TWIN_PORT": "abc"}, "TWIN_PORT='abc' is not a valid int"),
    ({"TWIN_HOST": "0.0.0.0"}, "set TWIN_API_KEYS"),
    ({"TWIN_QUEUE_MAXX": "3"}, "unknown setting(s): TWIN_QUEUE_MAXX"),
])
def test_start_app_refuses_bad_settings(env, message):
    import sys
    from pathlib import Path
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run([str(REPO / "start_app.sh")], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env, "VENV": str(venv), "SKIP_VENV_SETUP": "1"})
    assert proc.returncode == 2 and message in proc.stderr


def test_deploy_dry_run_renders_unit():
    proc = subprocess.run([str(REPO / "deploy_production.sh")], cwd=REPO, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "DRY_RUN": "1", "PREFIX": "/srv/twin"})
    assert proc.returncode == 0, proc.stderr
    for line in ("ExecStart=/srv/twin/.venv/bin/gunicorn -c /srv/twin/gunicorn.conf.py app:create_app()",
                 "EnvironmentFile=/etc/digital-twin/env", "TWIN_DATA_DIR=/srv/twin/twin_data", "WantedBy=multi-user.target"):
        assert line in proc.stdout


def test_readme_documents_every_setting_and_starts_with_the_two_commands():
    from utils.config import Settings
    readme = (REPO / "README.md").read_text()
    missing = [var for var, _, _ in Settings.documented() if f"`{var}`" not in readme]
    assert missing == [], f"README settings table lacks {missing}: regenerate with `python -m utils.config`"
    block = readme.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split()[0] for line in block[:2]] == ["./start_app.sh", "./test.sh"]
