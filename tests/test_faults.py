"""Faults the service must survive: a full volume (uploads and job outputs), GPU out-of-memory inside a
real job, and a graceful stop (drain) in process. The gunicorn SIGTERM run is tests/test_shutdown.py.

A full volume is real where the test runs as root: the data folder is a small tmpfs, filled with a
ballast file. Quota errors (EDQUOT), which tmpfs cannot produce, are injected at the write layer.
"""
from __future__ import annotations

import errno
import io
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fakes import FakeFaceService, FakeGenerator, image_bytes
from tests.helpers.http import assert_error, finished, upload
from tests.helpers.wait import wait_until
from utils import errors

TERMINAL = ("succeeded", "failed", "canceled")


# --- a small real volume ------------------------------------------------------------------------

class Volume:
    """A tmpfs of ``size_kb`` mounted at ``path``; ``fill(leave_kb)`` writes a ballast file until only
    that much is free, ``free()`` removes it."""

    def __init__(self, path: Path, size_kb: int) -> None:
        self.path = path
        self.ballast = path / "ballast.bin"
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], check=True,
                       capture_output=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_kb: int) -> None:
        target = self.free_bytes() - leave_kb * 1024
        chunk = b"\0" * 65536
        with open(self.ballast, "ab") as fh:
            while target > 0:
                try:
                    fh.write(chunk[:min(len(chunk), target)])
                    fh.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
                target -= min(len(chunk), target)
        assert self.free_bytes() <= leave_kb * 1024 + 4096

    def release(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (the EDQUOT injection test covers the write layer)"
    return None


@pytest.fixture
def volume(tmp_path):
    why = _can_mount()
    if why:
        pytest.skip(why)
    vols = []

    def make(size_kb: int) -> Volume:
        try:
            v = Volume(tmp_path / f"vol{len(vols)}", size_kb)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot mount a tmpfs here: {e.stderr.decode(errors='replace').strip()}")
        vols.append(v)
        return v

    yield make
    for v in vols:
        v.unmount()


def leftovers(data: Path) -> list[str]:
    """Anything half-written: staging folders, temp files."""
    return sorted(str(p.relative_to(data)) for p in data.rglob("*")
                  if p.name.startswith(".staging-") or p.name.endswith(".part"))


def session_dirs(data: Path) -> list[str]:
    from utils.storage import is_valid_id
    return [p.name for p in data.iterdir() if p.is_dir() and is_valid_id(p.name)]


class NoisyGenerator(FakeGenerator):
    """FakeGenerator whose images are noise, so their PNGs have a realistic size (a 512² one ~790 KB)."""

    def generate(self, req, on_progress=None, should_cancel=None):
        result = super().generate(req, on_progress, should_cancel)
        rng = np.random.default_rng(0)
        result.images = [Image.fromarray(rng.integers(0, 256, (im.height, im.width, 3), dtype=np.uint8))
                         for im in result.images]
        return result


def big_selfies(n=3):
    return [image_bytes(color=(i * 20, 90, 60), size=(160, 160)) for i in range(n)]  # ~77 KB each


# --- uploads on a full volume -------------------------------------------------------------------

@pytest.mark.parametrize("leave_kb, min_free_mb, status, code", [
    (2048, 0, 200, None),                       # room: the upload is stored
    (16, 0, 507, "insufficient_storage"),       # ENOSPC half-way through writing the originals
    (0, 0, 507, "insufficient_storage"),        # not one free block
    (2048, 3, 507, "insufficient_storage"),     # room, but it would eat into TWIN_MIN_FREE_MB
])
def test_upload_on_a_full_volume(volume, make_app, service_settings, leave_kb, min_free_mb, status, code):
    vol = volume(4096)
    data = vol.path / "data"
    c = make_app(service_settings.replace(data_dir=data, min_free_mb=min_free_mb)).test_client()
    store = c.application.extensions["twin"].store
    vol.fill(leave_kb)
    used_before = vol.free_bytes()
    r = upload(c, big_selfies())
    if status == 200:
        assert r.status_code == 200, r.data
        assert session_dirs(data) == [r.json["session_id"]]
        return
    err = assert_error(r, status, code)
    assert "full" in err["message"] or "TWIN_MIN_FREE_MB" in err["message"]
    # Nothing half-written: no session folder, no staging folder, no temp file, no record, no space held.
    assert session_dirs(data) == [] and leftovers(data) == []
    assert store._one("SELECT COUNT(*) FROM sessions")[0] == 0
    assert vol.free_bytes() >= used_before
    # Space comes back: the same upload now works, and a job runs on it.
    vol.release()
    c.application.extensions["twin"].storage.min_free_mb = 0
    r = upload(c, big_selfies())
    assert r.status_code == 200, r.data
    job = finished(c, c.post("/generate", json={"prompt": "a"}).json["id"])
    assert job["status"] == "succeeded"


def test_upload_over_quota_is_507_and_leaves_nothing(make_app, service_settings, monkeypatch):
    """EDQUOT (a user quota) at the write layer: the same 507 and the same clean folder."""
    c = make_app().test_client()
    real_write_bytes = Path.write_bytes

    def over_quota(self, data):
        if "originals" in self.parts:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", over_quota)
    assert_error(upload(c), 507, "insufficient_storage", "full")
    assert session_dirs(service_settings.data_dir) == [] and leftovers(service_settings.data_dir) == []
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    assert upload(c).status_code == 200


# --- job outputs on a full volume ---------------------------------------------------------------

@pytest.mark.parametrize("case, leave_kb, min_free_mb", [
    ("output write fails", 512, 0),     # the first 790 KB PNG hits ENOSPC; the DB still has room
    ("reserve refuses", 4096, 6),       # submit refused up front: the outputs would eat the reserve
    ("database full", 0, 0),            # not one block: even the job record cannot be written
])
def test_job_on_a_full_volume(volume, make_app, service_settings, case, leave_kb, min_free_mb):
    vol = volume(8192)
    data = vol.path / "data"
    c = make_app(service_settings.replace(data_dir=data, min_free_mb=min_free_mb),
                 generator=NoisyGenerator()).test_client()
    rt = c.application.extensions["twin"]
    rt.storage.min_free_mb = 0
    assert upload(c).status_code == 200
    rt.storage.min_free_mb = min_free_mb
    vol.fill(leave_kb)
    payload = {"prompt": "a", "num_images": 4, "width": 512, "height": 512, "quality_mode": "fast"}
    r = c.post("/generate", json=payload)
    if case == "output write fails":
        assert r.status_code == 202, r.data
        job = finished(c, r.json["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "insufficient_storage", job
        assert "full" in job["error"]["message"]
        assert job["outputs"] == []
        for n in range(1, 5):  # nothing half-written is downloadable, nothing is left on disk
            assert c.get(f"/download/{job['id']}/avatar_{n:03d}.png").status_code == 404
        assert leftovers(data) == []
        assert not list(data.glob(f"*/outputs/{job['id']}/*.png"))
    else:
        assert_error(r, 507, "insufficient_storage")
        assert rt.store.counts()["queued"] == 0
    # Space comes back: the service works again without a restart.
    vol.release()
    rt.storage.min_free_mb = 0
    job = finished(c, c.post("/generate", json=payload).json["id"])
    assert job["status"] == "succeeded" and len(job["outputs"]) == 4, job
    for o in job["outputs"]:
        Image.open(io.BytesIO(c.get(o["url"]).data)).verify()


def test_worker_survives_a_database_it_cannot_write(make_app, service_settings, monkeypatch):
    """The job record cannot be claimed or finished for a while (full volume): the worker waits, the job
    stays queued (not lost), and runs once writes work again."""
    c = make_app().test_client()
    assert upload(c).status_code == 200
    rt = c.application.extensions["twin"]
    real_claim = rt.store.claim
    blocked = threading.Event()
    blocked.set()

    def claim(job_id):
        if blocked.is_set():
            raise errors.InsufficientStorage("the data volume is full: the job database cannot be written")
        return real_claim(job_id)

    monkeypatch.setattr(rt.store, "claim", claim)
    job_id = c.post("/generate", json={"prompt": "a"}).json["id"]
    time.sleep(1.5)
    assert c.get(f"/status/{job_id}").json["status"] == "queued"
    assert all(t.is_alive() for t in rt.queue._threads)
    blocked.clear()
    assert finished(c, job_id, timeout=10)["status"] == "succeeded"


def test_delete_on_a_full_database_still_removes_the_files(make_app, service_settings, monkeypatch):
    """Deleting (user or retention) when the records cannot be written: the biometric files go anyway
    (and free space), the answer is 507, and a retry removes the records."""
    c = make_app().test_client()
    sid = upload(c).json["session_id"]
    rt = c.application.extensions["twin"]
    real = rt.store.delete_session_records

    def full(session_id):
        raise errors.InsufficientStorage("the data volume is full: the job database cannot be written")

    monkeypatch.setattr(rt.store, "delete_session_records", full)
    assert_error(c.delete(f"/sessions/{sid}"), 507, "insufficient_storage")
    assert not (service_settings.data_dir / sid).exists()
    monkeypatch.setattr(rt.store, "delete_session_records", real)
    assert c.delete(f"/sessions/{sid}").status_code == 200
    assert rt.store.get_session(sid) is None


# --- GPU out of memory inside a real job --------------------------------------------------------

def _oom():
    import torch
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")


@pytest.mark.parametrize("where", ["unet_step_2", "vae_decode"])
def test_out_of_memory_in_a_real_job_then_the_next_job_succeeds(make_app, tiny_generator, where, monkeypatch):
    """The real tiny pipeline; a one-shot torch.OutOfMemoryError (what CUDA raises) from inside it."""
    pipe = tiny_generator.models.pipe
    target, attr = (pipe.unet, "forward") if where == "unet_step_2" else (pipe.vae, "decode")
    real = getattr(target, attr)
    calls = {"n": 0}
    fire_at = 3 if where == "unet_step_2" else 1  # unet: step 1 (one call with CFG batched), then step 2

    def faulty(*a, **kw):
        calls["n"] += 1
        if calls["n"] == fire_at:
            raise _oom()
        return real(*a, **kw)

    c = make_app(generator=tiny_generator, faces=FakeFaceService()).test_client()
    assert upload(c).status_code == 200
    monkeypatch.setattr(target, attr, faulty)
    payload = {"prompt": "portrait", "quality_mode": "fast", "width": 64, "height": 64, "seed": 1}
    first = finished(c, c.post("/generate", json=payload).json["id"], timeout=60)
    assert first["status"] == "failed" and first["error"]["code"] == "out_of_memory", first
    assert "out of GPU memory" in first["error"]["message"] and first["outputs"] == []
    if where == "unet_step_2":
        assert first["progress"]["step"] >= 1  # it failed mid-denoising, not before
    second = finished(c, c.post("/generate", json=payload).json["id"], timeout=60)
    assert second["status"] == "succeeded" and len(second["outputs"]) == 1, second
    Image.open(io.BytesIO(c.get(second["outputs"][0]["url"]).data)).verify()
    assert calls["n"] > fire_at  # the second job went through the same (patched) pipeline


def test_out_of_memory_encoding_selfies_is_503(make_app, tiny_generator, monkeypatch):
    """The image encoder runs at upload time (identity): an OOM there is a 503, and the next upload works."""
    enc = tiny_generator.models.pipe.image_encoder
    if enc is None:
        pytest.skip("this adapter variant has no image encoder")
    real = enc.forward
    calls = {"n": 0}

    def faulty(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise _oom()
        return real(*a, **kw)

    monkeypatch.setattr(enc, "forward", faulty)
    c = make_app(generator=tiny_generator, faces=FakeFaceService()).test_client()
    err = assert_error(upload(c), 503, "out_of_memory")
    assert "20.00 GiB" not in err["message"]
    assert upload(c).status_code == 200


# --- graceful stop (in process) -----------------------------------------------------------------

@pytest.mark.parametrize("step_seconds, drain_seconds, running_ends", [
    (0.05, 10.0, "succeeded"),   # the running job fits in the drain window: it finishes
    (0.5, 0.3, "requeued"),      # it does not: stopped at its next step, back in the queue
])
def test_drain_finishes_or_requeues_and_loses_nothing(make_app, service_settings, step_seconds, drain_seconds, running_ends):
    s = service_settings.replace(drain_seconds=drain_seconds)
    gen = FakeGenerator(step_seconds=step_seconds)
    c = make_app(s, generator=gen).test_client()
    assert upload(c).status_code == 200
    ids = [c.post("/generate", json={"prompt": "a", "quality_mode": "high_fidelity"}).json["id"] for _ in range(3)]
    wait_until(lambda: c.get(f"/status/{ids[0]}").json["progress"]["step"] >= 1, 10)
    rt = c.application.extensions["twin"]
    rt.begin_drain()  # what SIGTERM does first
    r = c.post("/generate", json={"prompt": "a"})
    err = assert_error(r, 503, "shutting_down")
    assert int(r.headers["Retry-After"]) > 0 and "shutting down" in err["message"]
    assert_error(upload(c), 503, "shutting_down")
    assert c.get(f"/status/{ids[0]}").status_code == 200  # pollers keep working
    assert c.get("/health").json["draining"] is True
    outcome = rt.drain()
    from utils.jobs.local.store import SqliteJobStore
    store = SqliteJobStore(s.data_dir / "jobs.db")
    rows = {j: store.get(j) for j in ids}
    store.close()
    first = rows[ids[0]]
    if running_ends == "succeeded":
        assert first["status"] == "succeeded" and outcome["finished"] == [ids[0]]
    else:
        assert first["status"] == "queued" and outcome["requeued"] == [ids[0]]
        assert first["step"] == 0 and first["attempts"] == 0 and first["outputs"] == []
    assert [rows[j]["status"] for j in ids[1:]] == ["queued", "queued"]  # never started, still queued
    # Restart on the same data: every job ends succeeded, nothing lost.
    c2 = make_app(s, generator=FakeGenerator()).test_client()
    rt2 = c2.application.extensions["twin"]
    wait_until(lambda: all(rt2.store.get(j)["status"] in TERMINAL for j in ids), 20)
    assert [rt2.store.get(j)["status"] for j in ids] == ["succeeded"] * 3
