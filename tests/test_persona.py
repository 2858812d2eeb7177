"""Persona-only avatars: ``POST /generate`` with ``"identity": "none"`` makes an avatar from the prompt,
``persona`` and ``attributes`` alone, with no selfies. The job gets a persona session of its own (its
owner, retention and delete path); best-of-N is not ranked; restoration still runs; without
``identity: none`` the caller's latest upload (or 400 no_session) applies as before.

The API on the doubles through the Flask test client, the request rules of the real request class, and
one run on the tiny SDXL model with the real face backend."""
from __future__ import annotations

import json

import pytest

from tests.fakes import FakeFaceService, FakeGenerator, PhotoGenerator
from tests.helpers.http import assert_error, finished, upload
from utils import errors
from utils.config import Settings
from utils.engine.request import GenerationRequest
from utils.faces.restore import RESTORE_MODELS, write_standin

PERSONA = {"name": "Mara", "age": 34, "traits": ["confident", "warm"]}
ATTRIBUTES = {"gender": "female", "hair": "short curly black", "eyes": "green"}
HOUR = 3600.0


def persona_job(c, **body) -> dict:
    r = c.post("/generate", json={"prompt": "a portrait on a city street", "identity": "none", **body})
    assert r.status_code == 202, r.json
    return r.json


class CountingFaces(FakeFaceService):
    """A face service that would give every image a high likeness score, and counts how often it is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.scored = 0

    def identity_similarity(self, image, template):
        self.scored += 1
        return 0.9


@pytest.fixture(scope="module")
def restore_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("restore-standins")
    write_standin(d / RESTORE_MODELS["codeformer"].filename, "codeformer")
    return d


# --- the request --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    ({"identity": "nobody"}, "identity='nobody' is not one of session, none"),
    ({"identity": "none", "identity_strength": 0.5}, "identity_strength=0.5 applies to a face identity"),
    ({"identity": "none", "pose": "selfie:1"}, "pose='selfie:1' names a selfie"),
    ({"identity": "none", "init_image": "selfie:0"}, "init_image='selfie:0' names a selfie"),
])
def test_fields_that_need_selfies_are_refused_without_them(extra, needle):
    with pytest.raises(errors.InvalidRequest) as e:
        GenerationRequest.from_dict({"prompt": "p", **extra}, Settings())
    assert needle in e.value.message


@pytest.mark.parametrize("payload, source", [
    ({}, "session"),
    ({"identity": "session", "identity_strength": 0.5}, "session"),
    ({"identity": "none"}, "none"),
    ({"identity": "none", "persona": PERSONA, "attributes": ATTRIBUTES, "pose": "three_quarter_left",
      "candidates": 3}, "none"),
])
def test_identity_field_is_parsed_and_echoed(payload, source):
    req = GenerationRequest.from_dict({"prompt": "p", **payload}, Settings())
    assert req.identity_source == source and req.identity is None
    echo = req.to_dict()
    assert echo["identity"] == source and echo["has_identity"] is False
    assert GenerationRequest.from_dict({k: v for k, v in echo.items() if k in payload or k == "prompt"},
                                       Settings()).identity_source == source


# --- the API on the doubles ---------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"persona": PERSONA}, {"attributes": ATTRIBUTES},
                                   {"persona": PERSONA, "attributes": ATTRIBUTES}],
                         ids=["prompt-only", "persona", "attributes", "persona+attributes"])
def test_persona_only_avatar_succeeds_for_a_caller_without_selfies(app, service_settings, extra):
    c = app.test_client()
    first = persona_job(c, **extra)
    assert first["client_token"] and c.get_cookie("twin_client").value == first["client_token"]
    job = finished(c, first["id"])
    assert job["status"] == "succeeded", job
    assert job["request"]["identity"] == "none"
    assert {k: job["request"][k] for k in ("persona", "attributes")} == {
        "persona": extra.get("persona"), "attributes": extra.get("attributes")}
    assert job["metadata"]["identity"] is None                          # the engine ran with no identity
    (out,) = job["outputs"]
    assert out["identity_similarity"] is None
    assert c.get(out["url"]).status_code == c.get(out["thumbnail_url"]).status_code == 200
    # Its session holds the outputs only: no selfie, face feature or identity is ever written.
    sid = job["session_id"]
    folder = service_settings.data_dir / sid
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "outputs"]
    assert json.loads((folder / "meta.json").read_text())["kind"] == "persona"
    assert app.extensions["twin"].store.get_session(sid)["kind"] == "persona"
    # The same caller again: its token is reused, and the second avatar gets a session of its own.
    second = persona_job(c, **extra)
    assert "client_token" not in second and second["session_id"] != sid
    assert finished(c, second["id"])["status"] == "succeeded"


def _other_caller_requests(job):
    j, s = job["id"], job["session_id"]
    return [("get", f"/status/{j}"), ("get", f"/events/{j}"), ("get", f"/preview/{j}"),
            ("get", f"/download/{j}/avatar_001.png"), ("get", f"/download/{j}/avatar_001.thumb.jpg"),
            ("post", f"/cancel/{j}"), ("delete", f"/sessions/{s}")]


@pytest.mark.parametrize("who", ["uploader", "persona-caller", "no-token"])
def test_another_caller_can_never_read_it(app, who):
    alice, other = app.test_client(), app.test_client()
    job = finished(alice, persona_job(alice)["id"])
    if who == "uploader":
        assert upload(other).status_code == 200
    elif who == "persona-caller":
        persona_job(other)
    for method, path in _other_caller_requests(job):
        r = getattr(other, method)(path)
        assert r.status_code == 404, (method, path, r.json)
    assert alice.get(f"/status/{job['id']}").json["status"] == "succeeded"  # its owner still reads it
    assert alice.get(job["outputs"][0]["url"]).status_code == 200


@pytest.mark.parametrize("num_images, candidates, calls, score_outputs", [
    (1, 3, 1, False), (2, 6, 2, False), (3, 8, 2, True), (2, 2, 1, True)])
def test_best_of_n_without_identity_is_not_ranked(make_app, service_settings, num_images, candidates, calls,
                                                 score_outputs):
    gen, faces = FakeGenerator(), CountingFaces()
    c = make_app(service_settings.replace(score_outputs=score_outputs), generator=gen, faces=faces).test_client()
    job = finished(c, persona_job(c, num_images=num_images, candidates=candidates, seed=10)["id"])
    assert job["status"] == "succeeded", job
    assert gen.calls == calls and faces.scored == 0                       # nothing is scored, nothing ranked
    kept = list(range(10, 10 + num_images))
    assert [o["seed"] for o in job["outputs"]] == kept                     # the first ones, in seed order
    assert [o["identity_similarity"] for o in job["outputs"]] == [None] * num_images
    if candidates > num_images:
        table = job["metadata"]["candidates"]
        assert [(r["seed"], r["identity_similarity"], r["kept"], r["output"]) for r in table] == [
            (s, None, s in kept, kept.index(s) + 1 if s in kept else None) for s in range(10, 10 + candidates)]
        assert job["metadata"]["ranking"]["ranked"] is False
        assert job["metadata"]["ranking"]["note"].startswith("not ranked: identity='none' has no face")
        assert [o["candidate"] for o in job["outputs"]] == list(range(1, num_images + 1))
    else:
        assert "candidates" not in job["metadata"] and "ranking" not in job["metadata"]


def test_best_of_n_of_a_selfie_session_says_it_was_ranked(make_app):
    c = make_app(faces=CountingFaces()).test_client()
    upload(c)
    job = finished(c, c.post("/generate", json={"prompt": "p", "num_images": 1, "candidates": 3}).json["id"])
    assert job["metadata"]["ranking"]["ranked"] is True and job["outputs"][0]["identity_similarity"] == 0.9


def test_restoration_still_applies(make_app, service_settings, face_service, restore_dir):
    c = make_app(service_settings.replace(restore_model_dir=restore_dir), generator=PhotoGenerator(),
                 faces=face_service).test_client()
    job = finished(c, persona_job(c, num_images=2, candidates=3, restore_faces=True,
                                  restore_model="codeformer")["id"], timeout=60)
    assert job["status"] == "succeeded", job
    for out in job["outputs"]:
        assert out["restored"] is True and out["faces_restored"] == 1 and out["restore_model"] == "codeformer"
        assert out["identity_similarity"] is None and "identity_similarity_raw" not in out
        assert c.get(out["url"]).status_code == c.get(out["raw_url"]).status_code == 200
    assert job["metadata"]["ranking"]["ranked"] is False


SID = "<session>"       # the caller's upload
PSID = "<persona>"      # the session of the caller's earlier identity='none' job


@pytest.mark.parametrize("before, body, status, code, needle", [
    ([], {}, 400, "no_session", "identity='none'"),
    ([], {"identity": "session"}, 400, "no_session", "upload selfies first"),
    (["persona"], {}, 400, "no_session", ""),                        # a persona session is never "the latest"
    (["upload"], {"identity": "none", "session_id": SID}, 400, "invalid_request", "takes no session"),
    (["persona"], {"session_id": PSID}, 400, "no_selfies", "has no selfies"),
    (["persona"], {"identity": "none", "session_id": PSID}, 400, "invalid_request", "takes no session"),
    ([], {"identity": "nobody"}, 400, "invalid_request", "identity='nobody'"),
    (["upload", "persona"], {}, 202, None, SID),                     # the latest upload, not the newer persona
    (["upload", "persona"], {"identity": "session"}, 202, None, SID),
    (["persona", "upload"], {"session_id": SID}, 202, None, SID),
])
def test_identity_none_and_no_session_behaviours(app, before, body, status, code, needle):
    c = app.test_client()
    ids = {}
    for step in before:
        if step == "upload":
            ids[SID] = upload(c).json["session_id"]
        else:
            ids[PSID] = finished(c, persona_job(c)["id"])["session_id"]
    body = {k: ids.get(v, v) for k, v in body.items()}
    r = c.post("/generate", json={"prompt": "p", **body})
    if code is not None:
        assert_error(r, status, code, needle)
    else:
        assert r.status_code == status and r.json["session_id"] == ids[needle], r.json
    sessions = app.extensions["twin"].store
    assert all(sessions.get_session(s) is not None for s in ids.values())


def test_a_refused_persona_job_leaves_no_session_behind(make_app, service_settings):
    gen = FakeGenerator()
    gen.hold = True
    c = make_app(service_settings.replace(queue_max=1), generator=gen).test_client()
    try:
        persona_job(c)
        assert gen.started.wait(10)                                 # running: the queue is empty again
        persona_job(c)                                              # queued: the queue is full
        before = sorted(p.name for p in service_settings.data_dir.iterdir() if p.is_dir())
        assert len(before) == 2
        for _ in range(3):
            assert_error(c.post("/generate", json={"prompt": "p", "identity": "none"}), 429, "queue_full")
        assert sorted(p.name for p in service_settings.data_dir.iterdir() if p.is_dir()) == before
    finally:
        gen.release.set()


def test_delete_removes_the_avatar_and_its_records(app, service_settings):
    c = app.test_client()
    job = finished(c, persona_job(c, persona=PERSONA)["id"])
    sid, url = job["session_id"], job["outputs"][0]["url"]
    assert c.delete(f"/sessions/{sid}").json == {"deleted": True, "session_id": sid}
    assert not (service_settings.data_dir / sid).exists()
    assert c.get(f"/status/{job['id']}").status_code == 404 and c.get(url).status_code == 404
    rt = app.extensions["twin"]
    assert rt.store.get_session(sid) is None and rt.store.get(job["id"]) is None


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("retention_hours, ages, expect_deleted", [
    (72, [100, 73, 1], [100, 73]),
    (1, [2, 0.5], [2]),
])
def test_retention_sweep_removes_old_avatars(make_app, service_settings, retention_hours, ages, expect_deleted):
    clock = FakeClock(1_800_000_000.0)
    app = make_app(service_settings.replace(retention_hours=retention_hours, retention_sweep_minutes=600))
    rt = app.extensions["twin"]
    rt.clock = clock
    c = app.test_client()
    made = []
    for age in ages:
        clock.t = 1_800_000_000.0 - age * HOUR
        job = finished(c, persona_job(c)["id"])
        made.append((age, job))
    clock.t = 1_800_000_000.0
    assert sorted(rt.sessions.sweep()) == sorted(j["session_id"] for age, j in made if age in expect_deleted)
    for age, job in made:
        gone = age in expect_deleted
        assert (service_settings.data_dir / job["session_id"]).exists() is not gone
        assert c.get(f"/status/{job['id']}").status_code == (404 if gone else 200)
        assert c.get(job["outputs"][0]["url"]).status_code == (404 if gone else 200)


def test_idempotency_key_replays_the_first_avatar(app):
    c = app.test_client()
    persona_job(c)                                                   # the caller's token
    headers = {"Idempotency-Key": "avatar-1"}
    body = {"prompt": "p", "identity": "none", "persona": PERSONA}
    a, b = (c.post("/generate", json=body, headers=headers) for _ in range(2))
    assert a.status_code == b.status_code == 202 and b.headers.get("Idempotent-Replayed") == "true"
    assert (a.json["id"], a.json["session_id"]) == (b.json["id"], b.json["session_id"])


def test_openapi_lists_the_field(client):
    spec = client.get("/openapi.json").json
    field = spec["components"]["schemas"]["GenerateRequest"]["properties"]["identity"]
    assert field["enum"] == ["session", "none"] and field["nullable"] is True
    assert "identity='none'" in spec["components"]["schemas"]["GenerateRequest"]["description"]
    assert "client_token" in spec["components"]["schemas"]["Job"]["properties"]


def test_a_database_from_before_persona_sessions_reads_every_session_as_an_upload(tmp_path):
    import sqlite3

    from utils.jobs.local.store import SqliteJobStore
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.executescript("CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, "
                     "seq INTEGER NOT NULL); INSERT INTO sessions VALUES ('old', 'tok:a', 1.0, 1);")
    db.close()
    store = SqliteJobStore(tmp_path / "jobs.db")
    try:
        # ... and as a session without an apparent-age gate (from before the gate existed).
        assert store.latest_session("tok:a") == {"id": "old", "owner": "tok:a", "created_at": 1.0, "seq": 1,
                                                 "kind": "selfies", "age_gate": None, "age_gate_reason": None,
                                                 "median_apparent_age": None}
        store.add_session("new", "tok:a", 2.0, kind="persona")
        assert store.latest_session("tok:a")["id"] == "old" and store.get_session("new")["kind"] == "persona"
        assert sorted(store.sessions_older_than(3.0)) == ["new", "old"]   # the retention sweep sees both
    finally:
        store.close()


# --- the tiny SDXL model, real face backend ---------------------------------------------------------

def test_persona_only_on_the_tiny_model(make_app, service_settings, tiny_settings, tiny_generator, face_service,
                                        restore_dir):
    settings = service_settings.replace(tiny_model_dir=tiny_settings.tiny_model_dir, model_profile="tiny",
                                        max_steps=tiny_settings.max_steps, restore_model_dir=restore_dir)
    c = make_app(settings, generator=tiny_generator, faces=face_service).test_client()
    published = c.get("/system-status").json["options"]["request_fields"]["identity"]
    assert (published["enum"], published["default"]) == (["session", "none"], "session")
    job = finished(c, persona_job(c, persona=PERSONA, attributes=ATTRIBUTES, num_images=1, candidates=2, seed=7,
                                  quality_mode="fast", restore_faces=True, restore_model="codeformer")["id"],
                   timeout=120)
    assert job["status"] == "succeeded", job
    meta = job["metadata"]
    assert meta["identity"] is None and meta["identity_strength"] == 0.0
    assert meta["prompt"].startswith("a 34-year-old woman, a portrait on a city street")   # the persona, first
    assert meta["ranking"]["ranked"] is False and [r["seed"] for r in meta["candidates"]] == [7, 8]
    (out,) = job["outputs"]
    assert out["seed"] == 7 and out["identity_similarity"] is None
    assert out["restored"] is False and "no face" in out["note"]     # the tiny model draws no face
    assert c.get(out["url"]).status_code == 200
    # img2img from an output: one's own avatar is a start picture; another caller's is not found.
    own = f"{job['id']}/avatar_001.png"
    again = persona_job(c, init_image=own, strength=0.5, num_images=1, quality_mode="fast")
    assert finished(c, again["id"], timeout=120)["metadata"]["img2img"]["init_image"] == own
    other = c.application.test_client()                              # another caller (a cookie jar of its own)
    assert_error(other.post("/generate", json={"prompt": "p", "identity": "none", "init_image": own}), 404,
                 "not_found")
    assert c.delete(f"/sessions/{job['session_id']}").status_code == 200
    assert c.get(out["url"]).status_code == 404
