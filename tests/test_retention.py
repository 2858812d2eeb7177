"""Retention: sessions older than TWIN_RETENTION_HOURS go completely (files, session and job records,
outputs), on a schedule and once at start-up; tested against a fake clock."""
from __future__ import annotations

import json
import time

import pytest

from tests.helpers.http import finished, upload
from tests.helpers.wait import wait_until

HOUR = 3600.0


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, hours: float) -> None:
        self.t += hours * HOUR


def make_sessions(c, clock, ages_hours):
    """One session (with one finished job) per age; returns [(session_id, job_id, output_url)]."""
    start = clock.t
    out = []
    for age in sorted(ages_hours, reverse=True):
        clock.t = start - age * HOUR
        sid = upload(c).json["session_id"]
        job = finished(c, c.post("/generate", json={"prompt": "a", "session_id": sid}).json["id"])
        assert job["status"] == "succeeded"
        out.append((age, sid, job["id"], job["outputs"][0]["url"]))
    clock.t = start
    return out


@pytest.mark.parametrize("retention_hours, ages, expect_deleted", [
    (72, [100, 73, 71, 1], [100, 73]),
    (72, [71.9, 0], []),
    (1, [2, 0.5], [2]),
    (24 * 30, [24 * 29, 24 * 31], [24 * 31]),
])
def test_sweep_deletes_old_sessions_completely(make_app, service_settings, retention_hours, ages, expect_deleted):
    clock = FakeClock(1_800_000_000.0)
    app = make_app(service_settings.replace(retention_hours=retention_hours, retention_sweep_minutes=600))
    rt = app.extensions["twin"]
    rt.clock = clock
    c = app.test_client()
    made = make_sessions(c, clock, ages)
    deleted = rt.sessions.sweep()
    assert sorted(deleted) == sorted(sid for age, sid, _, _ in made if age in expect_deleted)
    for age, sid, job_id, url in made:
        gone = age in expect_deleted
        assert (service_settings.data_dir / sid).exists() is not gone
        assert (rt.store.get_session(sid) is None) is gone
        assert (rt.store.get(job_id) is None) is gone
        assert c.get(f"/status/{job_id}").status_code == (404 if gone else 200)
        assert c.get(url).status_code == (404 if gone else 200)
    assert rt.sessions.sweep() == []  # idempotent


def test_sweep_cancels_a_running_job_of_an_expired_session(make_app, service_settings):
    from tests.fakes import FakeGenerator
    clock = FakeClock(1_800_000_000.0)
    app = make_app(service_settings.replace(retention_hours=1, retention_sweep_minutes=600),
                   generator=FakeGenerator(step_seconds=0.1))
    rt = app.extensions["twin"]
    rt.clock = clock
    c = app.test_client()
    sid = upload(c).json["session_id"]
    job_id = c.post("/generate", json={"prompt": "a", "quality_mode": "high_fidelity"}).json["id"]
    wait_until(lambda: c.get(f"/status/{job_id}").json["status"] == "running", 5)
    clock.advance(2)
    assert rt.sessions.sweep() == [sid]
    assert not (service_settings.data_dir / sid).exists() and rt.store.get(job_id) is None
    assert rt.store.counts()["running"] == 0


def test_sweep_removes_orphan_folders_by_their_meta_time(make_app, service_settings):
    """A folder whose record was never written (killed between rename and insert) expires too."""
    clock = FakeClock(1_800_000_000.0)
    app = make_app(service_settings.replace(retention_hours=72, retention_sweep_minutes=600))
    rt = app.extensions["twin"]
    rt.clock = clock
    c = app.test_client()
    sid = upload(c).json["session_id"]
    rt.store.delete_session_records(sid)  # the record is gone, the folder is not
    assert rt.sessions.sweep() == []                # young: kept
    clock.advance(73)
    assert rt.sessions.sweep() == [sid] and not (service_settings.data_dir / sid).exists()


def test_sweep_runs_on_its_schedule(make_app, service_settings):
    """The background loop, not a manual call: with a 0.6 s interval, advancing the fake clock past the
    retention makes the session disappear within about one interval."""
    clock = FakeClock(1_800_000_000.0)
    app = make_app(service_settings.replace(retention_hours=1, retention_sweep_minutes=0.01))
    rt = app.extensions["twin"]
    rt.clock = clock
    c = app.test_client()
    sid = upload(c).json["session_id"]
    time.sleep(1.5)
    assert (service_settings.data_dir / sid).exists()  # swept at least twice, still young
    clock.advance(1.01)
    t0 = time.perf_counter()
    # Files go first, then the record (a storage outage must leave the session in place for a retry).
    wait_until(lambda: not (service_settings.data_dir / sid).exists() and rt.store.get_session(sid) is None, 5)
    assert time.perf_counter() - t0 < 2.0


def test_sweep_runs_at_start_up(make_app, service_settings):
    """A server that was down past the retention deletes expired sessions when it starts, not one
    interval later."""
    s = service_settings.replace(retention_hours=72, retention_sweep_minutes=600)
    app = make_app(s)
    sid = upload(app.test_client()).json["session_id"]
    rt = app.extensions["twin"]
    old = time.time() - 100 * HOUR
    rt.store._exec("UPDATE sessions SET created_at=? WHERE id=?", (old, sid))
    meta = service_settings.data_dir / sid / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "created_at": old}))
    rt.shutdown()
    app2 = make_app(s)
    wait_until(lambda: not (service_settings.data_dir / sid).exists(), 5)
    assert app2.extensions["twin"].store.get_session(sid) is None


def test_retention_zero_disables_the_sweeper(make_app, service_settings):
    app = make_app(service_settings.replace(retention_hours=0))
    assert app.extensions["twin"].sweeper is None
