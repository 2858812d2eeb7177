"""The API through a Flask test client: upload selfies, wait for a job, check an error answer."""
from __future__ import annotations

import io

from tests.fakes import image_bytes
from tests.fixtures.service import wait_until


def files_field(*blobs: bytes, names=None):
    names = names or [f"selfie_{i}.png" for i in range(len(blobs))]
    return {"files": [(io.BytesIO(b), n) for b, n in zip(blobs, names)]}


def upload(client, n=2, headers=None, **kw):
    blobs = [image_bytes(color=(i * 10, 100, 50)) for i in range(n)]
    return client.post("/upload", data=files_field(*blobs), content_type="multipart/form-data",
                       headers=headers or {}, **kw)


def finished(client, job_id, headers=None, timeout=10):
    return wait_until(lambda: (lambda j: j if j["status"] in ("succeeded", "failed", "canceled") else None)(
        client.get(f"/status/{job_id}", headers=headers or {}).json), timeout)


def assert_error(resp, status, code, *in_message):
    assert resp.status_code == status, resp.data
    body = resp.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    for part in in_message:
        assert part in body["error"]["message"]
    return body["error"]
