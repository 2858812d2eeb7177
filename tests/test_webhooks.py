"""Webhooks on POST /generate: Standard Webhooks signatures, ordered at-least-once delivery with retries,
SSRF refusals, attempts in the job JSON. A real HTTP receiver on loopback takes the deliveries."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.fakes import FakeGenerator
from tests.fixtures.service import wait_until
from tests.helpers.webhooks import Receiver
from tests.test_api import assert_error, finished, upload
from utils.jobs.webhooks import check_target, WebhookRefused

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes length!").decode()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hook_app(make_app, service_settings):
    s = service_settings.replace(webhook_secret=SECRET, webhook_allow_private=True, webhook_retry_base_seconds=0.01,
                                 webhook_max_attempts=3)
    return make_app(s, generator=FakeGenerator())


def submit(client, **payload):
    r = client.post("/generate", json={"prompt": "a portrait", **payload})
    assert r.status_code == 202, r.data
    return r.json


def readme_verify():
    """The receiver example from README.md (the block headed '# webhook receiver'), executed."""
    from tests.fixtures.service import REPO
    text = (REPO / "README.md").read_text()
    block = text.split("```python\n# webhook receiver\n", 1)[1].split("```", 1)[0]
    assert 0 < len(block.strip().splitlines()) <= 10
    ns: dict = {}
    exec(block, ns)
    return ns["verify"], ns["WebhookVerificationError"]


def test_events_arrive_signed_in_order_and_are_recorded(hook_app, receiver):
    client = hook_app.test_client()
    upload(client)
    job = submit(client, webhook=receiver.url, webhook_events=["start", "progress", "output", "completed"],
                 num_images=2, quality_mode="fast")
    done = finished(client, job["id"])
    wait_until(lambda: "job.completed" in receiver.events(), timeout=10)
    assert receiver.events() == ["job.start"] + ["job.progress"] * 4 + ["job.output"] * 2 + ["job.completed"]
    verify, _ = readme_verify()
    for r in receiver.received:
        event = verify(SECRET, r["body"], r["headers"])
        assert event["data"]["job_id"] == job["id"]
    last = json.loads(receiver.received[-1]["body"])["data"]
    assert last["status"] == "succeeded" and last["outputs"] == ["avatar_001.png", "avatar_002.png"]
    ids = [r["headers"]["webhook-id"] for r in receiver.received]
    assert len(set(ids)) == len(ids)
    deliveries = wait_until(lambda: (lambda w: w if len(w["deliveries"]) == 8 else None)(
        client.get(f"/status/{job['id']}").json["webhook"]))["deliveries"]
    assert [d["status"] for d in deliveries] == [204] * 8 and all(d["attempt"] == 1 for d in deliveries)
    assert done["webhook"]["url"] == receiver.url


def test_a_forged_signature_does_not_verify(hook_app, receiver):
    client = hook_app.test_client()
    upload(client)
    submit(client, webhook=receiver.url)
    wait_until(lambda: "job.completed" in receiver.events(), timeout=10)
    verify, Error = readme_verify()
    r = receiver.received[0]
    with pytest.raises(Error):
        verify(SECRET, r["body"].replace(b"job.start", b"job.stolen"), r["headers"])
    with pytest.raises(Error):
        verify("whsec_" + base64.b64encode(b"another secret").decode(), r["body"], r["headers"])


@pytest.mark.parametrize("script, attempts, statuses", [
    ([500, 503], 3, [500, 503, 204]),      # 5xx retried with backoff until it goes through
    ([500, 500, 500], 3, [500, 500, 500]),  # gives up after the last attempt
    ([404], 1, [404]),                      # 4xx: never retried
    ([429], 2, [429, 204]),                 # too many requests: retried
])
def test_retries_5xx_not_4xx_and_gives_up_after_the_last_attempt(hook_app, script, attempts, statuses):
    rec = Receiver(script)
    try:
        client = hook_app.test_client()
        upload(client)
        job = submit(client, webhook=rec.url, webhook_events=["completed"])
        deliveries = wait_until(lambda: (lambda w: w if len(w["deliveries"]) == attempts else None)(
            client.get(f"/status/{job['id']}").json["webhook"]), timeout=10)["deliveries"]
        assert [d["status"] for d in deliveries] == statuses
        assert [d["attempt"] for d in deliveries] == list(range(1, attempts + 1))
        assert len({r["headers"]["webhook-id"] for r in rec.received}) == 1  # one message, retried
    finally:
        rec.close()


def test_a_slow_receiver_never_holds_up_the_job(make_app, service_settings):
    import time
    gate = threading.Event()

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            gate.wait(10)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        app = make_app(service_settings.replace(webhook_secret=SECRET, webhook_allow_private=True))
        client = app.test_client()
        upload(client)
        t0 = time.monotonic()
        job = submit(client, webhook=f"http://127.0.0.1:{server.server_port}/", webhook_events=["start", "completed"])
        assert finished(client, job["id"])["status"] == "succeeded"
        assert time.monotonic() - t0 < 5
    finally:
        gate.set()
        server.shutdown()


@pytest.mark.parametrize("url, needle", [
    ("https://127.0.0.1/hook", "127.0.0.1"),
    ("https://10.1.2.3/hook", "10.1.2.3"),
    ("https://169.254.169.254/latest/meta-data", "169.254.169.254"),
    ("https://[::1]/hook", "::1"),
    ("https://localhost/hook", "localhost"),
    ("https://192.168.0.10:8443/x", "192.168.0.10"),
    ("https://[::ffff:127.0.0.1]/x", "127.0.0.1"),
    ("http://example.com/hook", "must use https"),
    ("ftp://example.com/hook", "https://"),
    ("https://user:pw@example.com/", "user name"),
    ("not a url", "https://"),
])
def test_ssrf_targets_are_refused_at_submit_naming_the_host(make_app, service_settings, url, needle):
    app = make_app(service_settings.replace(webhook_secret=SECRET))
    client = app.test_client()
    upload(client)
    r = client.post("/generate", json={"prompt": "p", "webhook": url})
    assert_error(r, 400, "webhook_refused", needle)
    assert sum(app.extensions["twin"].store.counts().values()) == 0


def test_a_name_that_later_resolves_to_a_private_address_is_refused_at_delivery():
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # public at submit, loopback at delivery (rebinding)
    resolver = lambda host, port: next(answers)
    assert check_target("https://rebind.example/hook", allow_private=False, resolver=resolver)
    with pytest.raises(WebhookRefused, match="127.0.0.1"):
        check_target("https://rebind.example/hook", allow_private=False, resolver=resolver)


@pytest.mark.parametrize("payload, status, code", [
    ({"webhook": "https://example.com/h", "webhook_events": ["finished"]}, 400, "invalid_request"),
    ({"webhook": "https://example.com/h", "webhook_events": "completed"}, 400, "invalid_request"),
    ({"webhook_events": ["completed"]}, 400, "invalid_request"),
    ({"webhook": 5}, 400, "invalid_request"),
])
def test_bad_webhook_fields_are_400(hook_app, payload, status, code):
    client = hook_app.test_client()
    upload(client)
    assert_error(client.post("/generate", json={"prompt": "p", **payload}), status, code)


def test_webhooks_off_without_a_secret(app, client):
    upload(client)
    assert_error(client.post("/generate", json={"prompt": "p", "webhook": "https://example.com/h"}), 400,
                 "webhooks_disabled", "TWIN_WEBHOOK_SECRET")
