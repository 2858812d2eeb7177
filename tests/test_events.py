"""GET /events/<job_id>: Server-Sent Events of a job (status, progress, output, done), resumable with
Last-Event-ID, bounded in number, owner-checked; in-process on the Flask client and on real gunicorn."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.fakes import QUALITY_STEPS, FakeGenerator, image_bytes
from tests.fixtures.service import FAKE_APP, server_env, wait_until
from tests.helpers.events import parse_sse
from tests.test_api import assert_error, finished, upload
from utils.jobs.events import MemoryEventLog


def submit(client, **payload):
    r = client.post("/generate", json={"prompt": "a portrait", **payload})
    assert r.status_code == 202, r.data
    return r.json["id"]


def check_complete(events: list[dict], num_images: int, steps: int) -> None:
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))  # dense: no gap, no duplicate
    assert [e["data"]["status"] for e in events if e["event"] == "status"] == ["queued", "running", "succeeded"]
    assert [e["data"]["step"] for e in events if e["event"] == "progress"] == list(range(1, steps + 1))
    outputs = [e["data"] for e in events if e["event"] == "output"]
    assert [o["filename"] for o in outputs] == [f"avatar_{i:03d}.png" for i in range(1, num_images + 1)]
    assert all(o["url"].startswith("/download/") and "path" not in o for o in outputs)
    assert events[-1]["event"] == "done" and events[-1]["data"]["status"] == "succeeded"


@pytest.fixture
def slow_app(make_app):
    return make_app(generator=FakeGenerator(step_seconds=0.01))


def test_stream_carries_every_event_once_then_closes(slow_app):
    client = slow_app.test_client()
    upload(client)
    job_id = submit(client, num_images=2, quality_mode="fast")
    r = client.get(f"/events/{job_id}")  # buffered: returns when the stream ends (after done)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "private, no-store"
    events, _ = parse_sse(r.get_data(as_text=True))
    check_complete(events, 2, QUALITY_STEPS["fast"])
    assert events[-1]["data"] == client.get(f"/status/{job_id}").json | {"position": None}


@pytest.mark.parametrize("resume_after", [0, 1, 3, 6])
def test_last_event_id_resumes_without_gaps_or_duplicates(slow_app, resume_after):
    client = slow_app.test_client()
    upload(client)
    job_id = submit(client, quality_mode="fast")
    full, _ = parse_sse(client.get(f"/events/{job_id}").get_data(as_text=True))
    rest, _ = parse_sse(client.get(f"/events/{job_id}", headers={"Last-Event-ID": str(resume_after)})
                        .get_data(as_text=True))
    assert [e["id"] for e in rest] == [e["id"] for e in full if e["id"] > resume_after]
    assert [e["event"] for e in rest] == [e["event"] for e in full if e["id"] > resume_after]


def test_resuming_past_the_end_of_a_finished_job_ends_the_stream(slow_app):
    client = slow_app.test_client()
    upload(client)
    job_id = submit(client)
    finished(client, job_id)
    r = client.get(f"/events/{job_id}", headers={"Last-Event-ID": "999"})
    assert r.status_code == 200 and parse_sse(r.get_data(as_text=True))[0] == []


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "9" * 20])
def test_bad_last_event_id_is_a_400_naming_it(slow_app, value):
    client = slow_app.test_client()
    upload(client)
    job_id = submit(client)
    assert_error(client.get(f"/events/{job_id}", headers={"Last-Event-ID": value}), 400, "invalid_request",
                 "Last-Event-ID")


def test_other_callers_and_unknown_jobs_get_404(slow_app):
    alice, bob = slow_app.test_client(), slow_app.test_client()
    upload(alice)
    upload(bob)
    job_id = submit(alice)
    assert_error(bob.get(f"/events/{job_id}"), 404, "not_found")
    assert_error(alice.get("/events/" + "a" * 24), 404, "not_found")


def test_streams_beyond_the_limit_get_429_and_a_closed_stream_frees_its_slot(make_app, service_settings):
    gen = FakeGenerator()
    gen.hold = True  # the job stays running: streams stay open
    app = make_app(service_settings.replace(max_event_streams=2), generator=gen)
    client = app.test_client()
    upload(client)
    job_id = submit(client)
    open_ = [client.get(f"/events/{job_id}", buffered=False) for _ in range(2)]
    assert all(r.status_code == 200 for r in open_)
    r = client.get(f"/events/{job_id}")
    assert_error(r, 429, "too_many_streams", "TWIN_MAX_EVENT_STREAMS")
    assert int(r.headers["Retry-After"]) > 0
    open_[0].close()
    gen.release.set()
    r = client.get(f"/events/{job_id}")
    assert r.status_code == 200 and parse_sse(r.get_data(as_text=True))[0][-1]["event"] == "done"
    open_[1].close()


def test_idle_stream_sends_heartbeats(make_app, service_settings):
    app = make_app(service_settings.replace(event_heartbeat_seconds=0.05), generator=FakeGenerator(step_seconds=0.1))
    client = app.test_client()
    upload(client)
    job_id = submit(client, quality_mode="fast")
    events, beats = parse_sse(client.get(f"/events/{job_id}").get_data(as_text=True))
    assert beats >= 2 and events[-1]["event"] == "done"


def test_a_finished_job_without_a_live_log_streams_its_final_state(slow_app):
    client = slow_app.test_client()
    upload(client)
    job_id = submit(client)
    finished(client, job_id)
    slow_app.extensions["twin"].events.forget(job_id)  # as after a restart, or once the log expired
    events, _ = parse_sse(client.get(f"/events/{job_id}").get_data(as_text=True))
    assert [(e["id"], e["event"], e["data"]["status"]) for e in events] == [(1, "status", "succeeded"),
                                                                          (2, "done", "succeeded")]


def test_deleting_the_session_ends_its_streams_and_forgets_the_events(make_app):
    gen = FakeGenerator()
    gen.hold = True
    app = make_app(generator=gen)
    client = app.test_client()
    sid = upload(client).json["session_id"]
    job_id = submit(client)
    wait_until(gen.started.is_set)
    got = {}
    t = threading.Thread(target=lambda: got.update(body=client.get(f"/events/{job_id}").get_data(as_text=True)))
    t.start()
    time.sleep(0.2)
    threading.Timer(0.3, gen.release.set).start()
    assert client.delete(f"/sessions/{sid}").status_code == 200
    t.join(10)
    assert not t.is_alive()
    assert not app.extensions["twin"].events.known(job_id)


def test_event_log_caps_progress_but_never_drops_a_terminal_event():
    log = MemoryEventLog(max_events_per_job=3)
    ids = [log.publish("j", "progress", {"step": i, "total": 9}) for i in range(1, 6)]
    assert ids == [1, 2, 3, None, None]
    assert log.publish("j", "done", {}) == 4
    assert [e.type for e in log.read("j", after=2)] == ["progress", "done"]


def test_event_log_forgets_finished_jobs_after_keep_seconds():
    now = [0.0]
    log = MemoryEventLog(keep_seconds=10, clock=lambda: now[0])
    log.publish("old", "done", {})
    log.publish("live", "status", {})
    now[0] = 11
    log.publish("new", "status", {})  # expiry runs on publish
    assert not log.known("old") and log.known("live") and log.known("new")


@pytest.mark.slow
def test_real_gunicorn_streams_a_running_job_and_resumes_mid_job(start_server, tmp_path):
    env = server_env(tmp_path / "data", FAKE_STEP_SECONDS="0.05", TWIN_MAX_EVENT_STREAMS="2")
    server = start_server(env, app_spec=FAKE_APP)
    s = requests.Session()
    files = [("files", (f"s{i}.png", image_bytes(color=(i * 40, 90, 30)), "image/png")) for i in range(2)]
    assert s.post(server.url + "/upload", files=files, timeout=30).status_code == 200
    job = s.post(server.url + "/generate", json={"prompt": "p", "quality_mode": "balanced"}, timeout=30).json()
    url = f"{server.url}/events/{job['id']}"
    # Read part of the stream while the job runs, drop the connection, resume from the last id seen.
    first: list[dict] = []
    with s.get(url, stream=True, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        buf = ""
        for chunk in r.iter_content(chunk_size=None, decode_unicode=True):
            buf += chunk
            first = parse_sse(buf.rsplit("\n\n", 1)[0] + "\n\n")[0]
            if any(e["event"] == "progress" and e["data"]["step"] >= 3 for e in first):
                break
    assert first and first[-1]["event"] != "done"
    # Two streams are open elsewhere: a third is refused with 429, not a held thread.
    holders = [s.get(url, stream=True, timeout=30) for _ in range(2)]
    wait_until(lambda: s.get(url, timeout=30).status_code == 429, timeout=10)
    for h in holders:
        h.close()
    rest_text = wait_until(lambda: (lambda r: r.text if r.status_code == 200 else None)(
        s.get(url, headers={"Last-Event-ID": str(first[-1]["id"])}, timeout=60)), timeout=20)
    rest = parse_sse(rest_text)[0]
    assert rest[0]["id"] == first[-1]["id"] + 1
    check_complete(first + rest, 1, QUALITY_STEPS["balanced"])



def test_each_output_has_a_jpeg_thumbnail_served_and_deleted_with_the_session(app, client):
    import io
    from PIL import Image
    upload(client)
    r = client.post("/generate", json={"prompt": "p", "num_images": 2, "width": 640, "height": 384})
    job = finished(client, r.json["id"])
    runtime = app.extensions["twin"]
    paths = []
    for o in job["outputs"]:
        assert o["thumbnail_url"] == f"/download/{job['id']}/{o['filename'][:-4]}.thumb.jpg"
        got = client.get(o["thumbnail_url"] + "?inline=1")
        assert got.status_code == 200 and got.mimetype == "image/jpeg"
        im = Image.open(io.BytesIO(got.data))
        assert im.format == "JPEG" and max(im.size) == 256 and im.size == (256, 154)
        paths.append(runtime.jobs.output_path(job["id"], o["filename"][:-4] + ".thumb.jpg", runtime.store.get(job["id"])["owner"]))
    assert all(p.exists() for p in paths)
    assert client.delete(f"/sessions/{job['session_id']}").status_code == 200
    assert not any(p.exists() for p in paths)
