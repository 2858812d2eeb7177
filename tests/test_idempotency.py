"""Idempotency-Key on POST /generate and POST /upload: a repeated request answers the first answer.

Every app test runs on both stores (local mode's SQLite, cluster mode's Redis on a real redis-server);
the two-API-node behaviour is in tests/test_cluster.py."""
from __future__ import annotations

import threading
import time

import pytest

from tests.helpers.http import assert_error, fake_selfies, upload

KEY = {"Idempotency-Key": "order-7f3a-0001"}


@pytest.fixture(params=["sqlite", "redis"])
def idem_store(request, service_settings):
    """None: the app builds local mode's store; "redis": the cluster store on a real redis-server."""
    if request.param == "sqlite":
        yield None
        return
    from utils.jobs.cluster.idempotency import RedisIdempotencyStore
    server = request.getfixturevalue("redis_server")
    yield RedisIdempotencyStore(server.client(), service_settings.idempotency_hours)


@pytest.fixture
def app(make_app, fake_generator, fake_faces, idem_store, service_settings):
    if idem_store is None:
        yield make_app(generator=fake_generator, faces=fake_faces)
        return
    from app import create_app
    from tests.fakes import fake_safety
    a = create_app(service_settings, generator=fake_generator, faces=fake_faces, idempotency_store=idem_store,
                   safety=fake_safety(service_settings))
    a.extensions["twin"].wait_ready(10)
    yield a
    a.extensions["twin"].shutdown()


def idem_of(app):
    """The app's store (the hook create_app registered for session deletes is its bound method)."""
    return next(h.__self__ for h in app.extensions["twin"].sessions.deleted_hooks
                if h.__name__ == "forget_session")


def gen(client, key=KEY, **payload):
    return client.post("/generate", json={"prompt": "a portrait", **payload}, headers=key or {})


def job_count(app) -> int:
    return sum(app.extensions["twin"].store.counts().values())


def test_same_key_same_body_answers_the_first_job_and_makes_no_second(app, client):
    upload(client)
    first = gen(client, seed=1)
    again = gen(client, seed=1)
    assert first.status_code == again.status_code == 202
    assert again.json["id"] == first.json["id"] and again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert job_count(app) == 1


@pytest.mark.parametrize("second, status, code", [
    ({"seed": 2}, 422, "idempotency_key_reused"),              # same key, other body
    ({"seed": 1, "num_images": 2}, 422, "idempotency_key_reused"),
])
def test_same_key_other_body_is_refused_naming_the_key(app, client, second, status, code):
    upload(client)
    assert gen(client, seed=1).status_code == 202
    assert_error(gen(client, **second), status, code, "order-7f3a-0001")
    assert job_count(app) == 1


def test_key_order_of_json_fields_does_not_matter(app, client):
    upload(client)
    a = client.post("/generate", data='{"prompt": "p", "seed": 3}', content_type="application/json", headers=KEY)
    b = client.post("/generate", data='{"seed": 3, "prompt": "p"}', content_type="application/json", headers=KEY)
    assert a.json["id"] == b.json["id"]


def test_keys_belong_to_their_caller(app):
    alice, bob = app.test_client(), app.test_client()
    upload(alice)
    upload(bob)
    a, b = gen(alice, seed=1), gen(bob, seed=1)
    assert a.status_code == b.status_code == 202 and a.json["id"] != b.json["id"]
    assert "Idempotent-Replayed" not in b.headers


def test_a_request_in_flight_with_the_key_gets_409(app, client, monkeypatch):
    upload(client)
    runtime = app.extensions["twin"]
    entered, release = threading.Event(), threading.Event()
    real_submit = runtime.jobs.submit

    def slow_submit(*a, **kw):
        entered.set()
        release.wait(10)
        return real_submit(*a, **kw)
    monkeypatch.setattr(runtime.jobs, "submit", slow_submit)
    got = {}
    t = threading.Thread(target=lambda: got.update(r=gen(client, seed=5)))
    t.start()
    assert entered.wait(10)
    r = gen(client, seed=5)
    assert_error(r, 409, "idempotency_in_flight")
    assert r.headers["Retry-After"] == "1"
    release.set()
    t.join(10)
    assert got["r"].status_code == 202 and gen(client, seed=5).json["id"] == got["r"].json["id"]


def test_a_failed_request_keeps_nothing_so_the_key_can_be_retried(app, client):
    upload(client)
    assert_error(gen(client, num_images=9), 400, "invalid_request", "num_images=9")
    assert gen(client, num_images=1).status_code == 202  # the same key, now with a valid body


@pytest.mark.parametrize("value", ["", " lead", "trail ", "x" * 256, "tab\there", "caf\u00e9"])
def test_malformed_keys_are_a_400(client, value):
    upload(client)
    r = client.post("/generate", json={"prompt": "p"}, headers={"Idempotency-Key": value.encode("utf-8").decode("latin-1")})
    assert_error(r, 400, "invalid_request", "Idempotency-Key")


def test_upload_with_the_same_key_and_files_answers_the_first_session(app, client):
    upload(client)  # the caller gets its token first: a brand-new caller cannot be repeating itself
    selfies = fake_selfies(2)
    a, b = upload(client, selfies, headers=KEY), upload(client, selfies, headers=KEY)
    assert a.status_code == b.status_code == 200 and a.json["session_id"] == b.json["session_id"]
    assert b.headers["Idempotent-Replayed"] == "true"
    assert_error(upload(client, selfies[:1], headers=KEY), 422, "idempotency_key_reused")


def test_deleting_the_session_deletes_its_records(app, client):
    upload(client)
    first = gen(client, seed=1).json
    rows = idem_of(app).count
    assert rows() == 1
    assert client.delete(f"/sessions/{first['session_id']}").status_code == 200
    assert rows() == 0
    upload(client)
    assert gen(client, seed=1).json["id"] != first["id"]


def test_records_expire_after_the_configured_hours(tmp_path):
    from utils.jobs.local.idempotency import SqliteIdempotencyStore
    now = [1000.0]
    store = SqliteIdempotencyStore(tmp_path / "jobs.db", hours=1, clock=lambda: now[0])
    assert store.begin("owner", "generate", "k", "fp1") is None
    store.complete("owner", "generate", "k", 202, {"id": "j1"}, {}, "s1")
    assert store.begin("owner", "generate", "k", "fp1") == (202, {"id": "j1"}, {})
    now[0] += 3601
    assert store.begin("owner", "generate", "k", "fp2") is None  # expired: the key is free again
    store.close()


def make_store(kind, tmp_path, redis_server_factory, in_flight_seconds):
    from utils.jobs.cluster.idempotency import RedisIdempotencyStore
    from utils.jobs.local.idempotency import SqliteIdempotencyStore
    if kind == "sqlite":
        return SqliteIdempotencyStore(tmp_path / "jobs.db", hours=1, in_flight_seconds=in_flight_seconds)
    return RedisIdempotencyStore(redis_server_factory().client(), hours=1, in_flight_seconds=in_flight_seconds)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_an_unanswered_in_flight_marker_expires(kind, tmp_path, request):
    """The node that claimed the key died before answering: after the in-flight TTL the key runs again."""
    store = make_store(kind, tmp_path, lambda: request.getfixturevalue("redis_server"), in_flight_seconds=0.3)
    assert store.begin("owner", "generate", "k", "fp1") is None  # claimed, never completed nor abandoned
    with pytest.raises(Exception) as e:
        store.begin("owner", "generate", "k", "fp1")
    assert getattr(e.value, "code", None) == "idempotency_in_flight"
    time.sleep(0.5)
    assert store.begin("owner", "generate", "k", "fp1") is None  # claimed again
    store.complete("owner", "generate", "k", 202, {"id": "j2", "outputs": []}, {"Location": "/status/j2"}, "s1")
    time.sleep(0.5)  # a done record keeps the retention hours, not the in-flight TTL
    assert store.begin("owner", "generate", "k", "fp1") == (202, {"id": "j2", "outputs": []}, {"Location": "/status/j2"})
    store.forget_session("s1")
    assert store.count() == 0
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_only_a_hash_of_the_key_is_stored(kind, tmp_path, request):
    server = []
    store = make_store(kind, tmp_path, lambda: server.append(request.getfixturevalue("redis_server")) or server[0], 60)
    secret = "customer-secret-key-4711"
    assert store.begin("owner", "upload", secret, "fp") is None
    store.complete("owner", "upload", secret, 200, {"session_id": "s"}, {}, "s")
    if kind == "sqlite":
        store.close()
        assert secret.encode() not in (tmp_path / "jobs.db").read_bytes() + (
            (tmp_path / "jobs.db-wal").read_bytes() if (tmp_path / "jobs.db-wal").exists() else b"")
    else:
        c = server[0].client()
        dump = b"".join(k + (c.get(k) or b"") for k in c.scan_iter("*") if c.type(k) == b"string")
        dump += b"".join(m for k in c.scan_iter("*") if c.type(k) == b"set" for m in c.smembers(k))
        assert secret.encode() not in dump and store.count() == 1
