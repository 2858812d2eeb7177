"""The service's HTTP steps as tests take them: build the multipart ``files`` field, upload selfies (Flask
test client, or a real server through requests), submit a job, wait for it to end, read the error body.

Files are given as ``(name, bytes)`` pairs (``files_field`` also takes bare bytes); ``fake_selfies`` makes
the noisy images that tests.fakes.FakeFaceService accepts, ``tests.photos.selfie_set`` real face photos.
"""
from __future__ import annotations

import io

from tests.fakes import image_bytes
from tests.helpers.wait import wait_until

TOKEN_HEADER = "X-Client-Token"
TERMINAL = ("succeeded", "failed", "canceled")


def fake_selfies(n: int = 2, colour: tuple[int, int] = (100, 50),
                 name: str = "selfie_{}.png") -> list[tuple[str, bytes]]:
    """``n`` noisy images (faces to FakeFaceService): image i is ``image_bytes(color=(10*i, *colour))``,
    named ``name.format(i)``."""
    return [(name.format(i), image_bytes(color=(i * 10, *colour))) for i in range(n)]


def files_field(*files, names=None) -> dict:
    """The multipart body ``{"files": [...]}``. Each item is a ``(name, bytes)`` pair or bare bytes, named
    from ``names`` (default ``selfie_{i}.png``)."""
    names = names or [f"selfie_{i}.png" for i in range(len(files))]
    pairs = [f if isinstance(f, tuple) else (n, f) for f, n in zip(files, names)]
    return {"files": [(io.BytesIO(data), name) for name, data in pairs]}


def upload(client, files=None, *, n: int = 2, headers=None, **kw):
    """POST /upload with ``files`` (default: ``fake_selfies(n)``) -> the response."""
    files = fake_selfies(n) if files is None else files
    return client.post("/upload", data=files_field(*files), content_type="multipart/form-data",
                       headers=headers or {}, **kw)


def upload_ok(client, files=None, **kw) -> dict:
    """``upload`` that must answer 200 -> its JSON body."""
    r = upload(client, files, **kw)
    assert r.status_code == 200, r.get_json(silent=True) or r.data[:300]
    return r.get_json()


def upload_token(client, files=None, **kw) -> dict[str, str]:
    """``upload`` -> the caller's token as a request header ``{"X-Client-Token": ...}``."""
    body = upload(client, files, **kw).get_json()
    assert "client_token" in body, body
    return {TOKEN_HEADER: body["client_token"]}


def upload_to_server(http, url: str, files, *, mime: str = "image/jpeg", timeout: float = 120):
    """POST <url>/upload on a real server; ``http`` is ``requests`` or a ``requests.Session``. Must answer 200."""
    r = http.post(url + "/upload", files=[("files", (name, data, mime)) for name, data in files], timeout=timeout)
    assert r.status_code == 200, r.text
    return r


def submit(client, headers=None, **payload) -> dict:
    """POST /generate ``{"prompt": "a portrait", **payload}`` that must answer 202 -> the job JSON."""
    r = client.post("/generate", json={"prompt": "a portrait", **payload}, headers=headers or {})
    assert r.status_code == 202, r.data
    return r.get_json()


def finished(client, job_id: str, headers=None, timeout: float = 10):
    """The job JSON once the job has ended (succeeded, failed or canceled)."""
    return wait_until(lambda: (lambda j: j if j.get("status") in TERMINAL else None)(
        client.get(f"/status/{job_id}", headers=headers or {}).get_json()), timeout)


def error_of(resp) -> dict:
    """The ``error`` object of an error answer, which must be exactly ``{"error": {...}}``."""
    body = resp.get_json(silent=True)
    assert isinstance(body, dict) and set(body) == {"error"}, resp.data[:300]
    return body["error"]


def assert_error(resp, status: int, code: str, *in_message: str) -> dict:
    """An error answer with this status and code whose message holds each of ``in_message``."""
    assert resp.status_code == status, resp.data
    err = error_of(resp)
    assert err["code"] == code
    for part in in_message:
        assert part in err["message"]
    return err
