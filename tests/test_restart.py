"""Hard kill mid-run, restart: every job ends terminal with a reason, nothing half-written is served."""
from __future__ import annotations

import io
import time

import pytest
import requests
from PIL import Image

from tests.helpers.http import upload_to_server
from tests.photos import selfie_set

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "canceled"}


@pytest.mark.parametrize("requeue, interrupted_ends", [("0", "failed"), ("1", "succeeded")])
def test_hard_kill_mid_run_then_restart(server_kind, start_server, requeue, interrupted_ends):
    kind, app_spec, env = server_kind
    if kind == "real" and requeue == "1":
        pytest.skip("re-queue policy is engine-independent: covered on the doubles; saves two ~30 s real starts")
    env = {**env, "TWIN_REQUEUE_INTERRUPTED": requeue}
    if kind == "fake":
        env["FAKE_STEP_SECONDS"] = "0.3"
    first = start_server(env, app_spec=app_spec)
    hdr = {"X-Client-Token": upload_to_server(requests, first.url, selfie_set(3)).json()["client_token"]}
    payload = {"prompt": "portrait", "num_images": 2, "quality_mode": "high_fidelity"}
    if kind == "real":
        payload.update(width=128, height=128)
    ids = []
    for _ in range(3):
        r = requests.post(first.url + "/generate", json=payload, headers=hdr, timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])

    deadline = time.time() + 120
    running = None
    while time.time() < deadline and running is None:
        for j in ids:
            st = requests.get(f"{first.url}/status/{j}", headers=hdr, timeout=10).json()
            if st["status"] == "running" and 0 < st["progress"]["step"] < st["progress"]["total"]:
                running = j
                break
        else:
            time.sleep(0.01)
    assert running, "no job was seen mid-run"
    first.kill_hard()

    second = start_server(env, app_spec=app_spec)
    final = {}
    deadline = time.time() + 300
    while time.time() < deadline and len(final) < len(ids):
        for j in ids:
            st = requests.get(f"{second.url}/status/{j}", headers=hdr, timeout=10).json()
            if st["status"] in TERMINAL:
                final[j] = st
        time.sleep(0.1)
    assert set(final) == set(ids), f"jobs not terminal after restart: {set(ids) - set(final)}"

    interrupted = final[running]
    assert interrupted["status"] == interrupted_ends, interrupted
    if interrupted_ends == "failed":
        assert interrupted["error"]["code"] == "interrupted" and interrupted["error"]["message"]
    for j in ids:
        if j != running:
            assert final[j]["status"] == "succeeded", final[j]
    for st in final.values():
        if st["status"] == "failed":
            assert st["error"]["code"] and st["error"]["message"]
        for out in st["outputs"]:  # whatever is listed is a whole PNG
            r = requests.get(second.url + out["url"], headers=hdr, timeout=10)
            assert r.status_code == 200
            Image.open(io.BytesIO(r.content)).verify()
        for n in range(1, 5):  # whatever is not listed is not served
            name = f"avatar_{n:03d}.png"
            if name not in {o["filename"] for o in st["outputs"]}:
                assert requests.get(f"{second.url}/download/{st['id']}/{name}", headers=hdr,
                                    timeout=10).status_code == 404
    data_dir = env["TWIN_DATA_DIR"]
    from pathlib import Path
    assert not list(Path(data_dir).glob("**/*.part")), "temp files survived the restart"
