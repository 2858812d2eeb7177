"""Security: access control, hostile input, rate limits, privacy deletion, logs.

Figures (attempts tried, escapes, successes) are reported with ``report_metric`` and printed in the
terminal summary; each test also asserts the figure it reports.
"""
from __future__ import annotations

import base64
import io
import itertools
import logging
import os
import struct
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.fakes import FakeFaceService, FakeGenerator, image_bytes
from tests.helpers.http import error_of, fake_selfies, finished, upload
from tests.helpers.images import PNG_SIGNATURE, png_chunk
from tests.helpers.wait import wait_until
from utils import errors
from utils.storage import ID_BYTES, new_id

_TOTALS: dict[str, set] = {}


def tally(report_metric, name: str, item) -> int:
    """Count distinct items across parametrized cases and report the running total."""
    seen = _TOTALS.setdefault(name, set())
    seen.add(item)
    report_metric(name, len(seen))
    return len(seen)


def add(report_metric, name: str, n: int) -> int:
    box = _TOTALS.setdefault(name, set())
    box.add(("n", len(box), n))
    total = sum(x[2] for x in box)
    report_metric(name, total)
    return total


# What these tests have always uploaded when they need any two selfies.
SELFIES = fake_selfies(2, colour=(90, 40), name="s{}.png")


# --- ids -----------------------------------------------------------------------------------------

def test_ids_carry_at_least_128_random_bits(client, report_metric):
    assert ID_BYTES * 8 >= 128
    body = upload(client, SELFIES).get_json()
    job = client.post("/generate", json={"prompt": "p"}).get_json()
    ids = {"session": body["session_id"], "job": job["id"], "client_token": body["client_token"]}
    for kind, value in ids.items():
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        assert len(raw) * 8 >= 128, (kind, value)
    sample = [new_id() for _ in range(5000)]
    assert len(set(sample)) == len(sample)
    # Every bit position varies: the ids are not a counter or a timestamp with a short random tail.
    bits = [int.from_bytes(base64.urlsafe_b64decode(i), "big") for i in sample]
    ones = [sum((b >> k) & 1 for b in bits) for k in range(ID_BYTES * 8)]
    assert all(1500 < c < 3500 for c in ones)
    report_metric("id random bits (session, job, client token)", ID_BYTES * 8)


# --- access control --------------------------------------------------------------------------------

def _two_callers(make_app, service_settings, mode):
    """(app, alice client, alice headers, alice session id, bob client, bob headers)."""
    if mode == "api_keys":
        app = make_app(service_settings.replace(api_keys="key-alice-0123456789,key-bob-9876543210"))
        ha, hb = {"Authorization": "Bearer key-alice-0123456789"}, {"Authorization": "Bearer key-bob-9876543210"}
    else:
        app = make_app()
        ha = hb = None
    a, b = app.test_client(use_cookies=False), app.test_client(use_cookies=False)
    body_a, body_b = upload(a, SELFIES, headers=ha).get_json(), upload(b, SELFIES, headers=hb).get_json()
    if mode != "api_keys":
        ha, hb = {"X-Client-Token": body_a["client_token"]}, {"X-Client-Token": body_b["client_token"]}
    return app, a, ha, body_a["session_id"], b, hb


@pytest.mark.parametrize("mode", ["api_keys", "tokens"])
def test_cross_caller_reads_all_fail(make_app, service_settings, mode, report_metric):
    app, a, ha, sid, b, hb = _two_callers(make_app, service_settings, mode)
    done = finished(a, a.post("/generate", json={"prompt": "alice private prompt", "num_images": 2}, headers=ha)
                    .get_json()["id"], ha)
    queued = a.post("/generate", json={"prompt": "alice queued"}, headers=ha).get_json()["id"]
    alice_png = a.get(done["outputs"][0]["url"], headers=ha).data
    assert alice_png[:8] == b"\x89PNG\r\n\x1a\n"

    # Other callers: bob; nobody; bob presenting alice's ids where a credential goes.
    others = [hb, {}, {"X-Client-Token": sid}, {"X-Client-Token": done["id"]},
              {**hb, "X-Client-Token": sid}, {"Cookie": f"twin_client={sid}"}]
    if mode == "api_keys":
        others += [{"Authorization": "Bearer " + sid}, {"Authorization": "bearer key-alice-012345678"},
                   {"Authorization": "Bearer key-alice-0123456789x"}]
    attempts = successes = 0
    for h in others:
        for method, path, kw in [
            ("get", f"/status/{done['id']}", {}), ("get", f"/status/{queued}", {}),
            ("post", f"/cancel/{queued}", {}), ("post", f"/cancel/{done['id']}", {}),
            ("get", done["outputs"][0]["url"], {}), ("get", done["outputs"][1]["url"], {}),
            ("get", done["outputs"][0]["url"] + "?inline=1", {}),
            ("delete", f"/sessions/{sid}", {}),
            ("post", "/generate", {"json": {"prompt": "x", "session_id": sid}}),
        ]:
            r = getattr(b, method)(path, headers=h, **kw)
            attempts += 1
            # An error may name the id the caller sent; it must carry nothing of alice's beyond that.
            leaked = (r.status_code < 400 or alice_png[100:164] in r.data or b"alice" in r.data
                      or b"avatar_" in r.data or b"outputs" in r.data)
            successes += leaked
            assert not leaked, (h, method, path, r.status_code, r.data[:200])
            expected = 401 if mode == "api_keys" and "Authorization" not in h or (
                mode == "api_keys" and h.get("Authorization", "").split(" ")[-1] not in (
                    "key-alice-0123456789", "key-bob-9876543210")) else 404
            assert r.status_code == expected, (h, method, path, r.status_code)
        # A generate without session_id never lands on alice's session.
        r = b.post("/generate", json={"prompt": "x"}, headers=h)
        attempts += 1
        successes += (r.status_code == 202 and r.get_json()["session_id"] == sid)
        assert not (r.status_code == 202 and r.get_json()["session_id"] == sid)
    # Alice still has everything: the refused deletes/cancels changed nothing.
    assert a.get(f"/status/{done['id']}", headers=ha).status_code == 200
    assert a.get(done["outputs"][0]["url"], headers=ha).data == alice_png
    assert a.get(f"/status/{queued}", headers=ha).get_json()["status"] in ("queued", "running", "succeeded")
    add(report_metric, "cross-caller reads tried", attempts)
    add(report_metric, "cross-caller reads succeeded", successes)
    assert attempts >= 40 and successes == 0


def test_protected_endpoints_answer_401_before_parsing(make_app, service_settings):
    c = make_app(service_settings.replace(api_keys="k-one-abcdefghijklmnop")).test_client()
    for method, path, kw in [("post", "/upload", {"data": "x", "content_type": "application/json"}),
                             ("post", "/generate", {"data": "{bad", "content_type": "application/json"}),
                             ("get", f"/status/{new_id()}", {}), ("post", f"/cancel/{new_id()}", {}),
                             ("get", f"/download/{new_id()}/avatar_001.png", {}),
                             ("delete", f"/sessions/{new_id()}", {})]:
        r = getattr(c, method)(path, **kw)
        assert r.status_code == 401 and error_of(r)["code"] == "unauthorized", (path, r.status_code)
        assert r.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/health", "/openapi.json", "/system-status"):
        assert c.get(path).status_code == 200


@pytest.mark.parametrize("change, expected, absent", [
    ({"api_keys": "sekrit-key-1234567890,other-key-abcdefghij"}, "authentication on", ["sekrit-key", "other-key"]),
    ({}, "authentication off", []),
    ({"host": "0.0.0.0", "allow_anonymous": True}, "non-loopback", []),
])
def test_startup_log_says_whether_auth_is_on(make_app, service_settings, change, expected, absent, caplog):
    caplog.set_level(logging.INFO, logger="twin.app")
    make_app(service_settings.replace(**change))
    auth = [r for r in caplog.records if r.name == "twin.app" and hasattr(r, "auth")]
    assert len(auth) == 1 and expected in auth[0].getMessage()
    text = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    for secret in absent:
        assert secret not in text


# --- path traversal on /download -----------------------------------------------------------------

def _traversal_payloads(other_session, other_job, own_session, secret_path):
    targets = [
        "../../../../../../etc/passwd", "/etc/passwd", "../meta.json", "../../meta.json", "../../../meta.json",
        "../../originals/000.png", "../../crops/000.png", "../../embeddings.safetensors",
        "../../identity.safetensors", "../../../jobs.db", "../../../../jobs.db",
        f"../../../{other_session}/outputs/{other_job}/avatar_001.png", f"../{other_job}/avatar_001.png",
        f"../../../{own_session}/meta.json", str(secret_path), "../" * 12 + str(secret_path).lstrip("/"),
        "avatar_001.png/../../../meta.json", "....//....//....//etc/passwd", "..;/..;/etc/passwd",
    ]
    encoders = [
        lambda p: p,
        lambda p: p.replace("../", "%2e%2e%2f"),
        lambda p: p.replace("../", "%2e%2e/"),
        lambda p: p.replace("../", "..%2f"),
        lambda p: p.replace("../", "%252e%252e%252f"),
        lambda p: p.replace("../", "..%252f"),
        lambda p: p.replace("../", "..\\").replace("/", "\\"),
        lambda p: p.replace("../", "..%5c"),
        lambda p: p.replace("../", "%c0%ae%c0%ae%c0%af"),               # overlong UTF-8
        lambda p: p.replace("../", "\u2024\u2024/"),                    # one-dot leaders
        lambda p: p.replace("../", "\uff0e\uff0e/"),                    # full-width full stops
        lambda p: p.replace("/", "%2f"),
        lambda p: p + "%00avatar_001.png",
        lambda p: "avatar_001.png%00" + p,
    ]
    out = []
    for t, enc in itertools.product(targets, encoders):
        out.append(enc(t))
    out += ["avatar_001.png%00", "avatar_001.png\x00", "avatar_001.png%00.txt", "avatar_001.png/",
            "avatar_001.png%2f", "avatar_001.png;.txt", "avatar_001.png?x=../../meta.json",
            "a" * 300 + ".png", "avatar_" + "0" * 5000 + "1.png", "avatar_001.png " , " avatar_001.png",
            "AVATAR_001.PNG", "avatar_001.png.", "avatar_001.png::$DATA", "./avatar_001.png", "%2e/avatar_001.png",
            "C:\\Windows\\win.ini", "\\\\server\\share\\x.png", "~/avatar_001.png", "%7e/avatar_001.png"]
    return out


def _plant_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_download_traversal_variants_never_escape(make_app, tmp_path, report_metric):
    app = make_app()
    rt = app.extensions["twin"]
    alice, bob = app.test_client(use_cookies=False), app.test_client(use_cookies=False)
    ta = {"X-Client-Token": upload(alice, SELFIES).get_json()["client_token"]}
    bob_body = upload(bob, SELFIES).get_json()
    tb = {"X-Client-Token": bob_body["client_token"]}
    a_job = finished(alice, alice.post("/generate", json={"prompt": "a"}, headers=ta).get_json()["id"], ta)
    b_job = finished(bob, bob.post("/generate", json={"prompt": "b", "seed": 99}, headers=tb).get_json()["id"], tb)
    a_sid, b_sid = a_job["session_id"], b_job["session_id"]
    secret = tmp_path / "outside-secret.txt"
    secret.write_bytes(b"TOP-SECRET-OUTSIDE-DATA-DIR " * 20)
    root = rt.storage.root
    secrets_ = {
        "outside file": secret.read_bytes()[:40],
        "bob's portrait": (root / b_sid / "outputs" / b_job["id"] / "avatar_001.png").read_bytes()[60:120],
        "alice meta": b'"owner"',
        "jobs.db": b"SQLite format 3",
        "alice original": (root / a_sid / "originals" / "000.png").read_bytes()[60:120],
    }
    if Path("/etc/passwd").is_file():
        secrets_["/etc/passwd"] = b"root:"
    own = alice.get(f"/download/{a_job['id']}/avatar_001.png", headers=ta)
    assert own.status_code == 200 and own.data[:8] == b"\x89PNG\r\n\x1a\n"

    payloads = _traversal_payloads(b_sid, b_job["id"], a_sid, secret)
    urls = set()
    for p in payloads:
        enc = quote(p, safe="/%;=:~\\")  # "?" is encoded: a real query string would just ask for the own file
        urls.add(f"/download/{a_job['id']}/{enc}")          # as the file name
        urls.add(f"/download/{enc}/avatar_001.png")          # as the job id
        urls.add(f"/download/{enc}")                         # as both
    urls |= {f"/download/{b_job['id']}/avatar_001.png", f"/download/{a_job['id']}/../{b_job['id']}/avatar_001.png",
             f"/download/{a_job['id']}/%2e%2e/{b_job['id']}/avatar_001.png", f"/download/{new_id()}/avatar_001.png",
             f"/download/{a_sid}/avatar_001.png", f"/download/{b_sid}/avatar_001.png"}

    tried = escapes = 0
    statuses: dict[int, int] = {}
    for url in sorted(urls):
        r = alice.get(url, headers=ta)
        tried += 1
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        leaked = [name for name, needle in secrets_.items() if needle in r.data]
        if not 400 <= r.status_code < 500 or leaked:
            escapes += 1
        assert 400 <= r.status_code < 500 and not leaked, (url, r.status_code, leaked)

    # The same payloads where the other endpoints take an id.
    id_tried = id_escapes = 0
    for p in payloads:
        enc = quote(p, safe="/%;=:~\\")
        for method, url in (("get", f"/status/{enc}"), ("post", f"/cancel/{enc}"), ("delete", f"/sessions/{enc}")):
            r = getattr(alice, method)(url, headers=ta)
            id_tried += 1
            leaked = [name for name, needle in secrets_.items() if needle in r.data]
            id_escapes += bool(not 400 <= r.status_code < 500 or leaked)
            assert 400 <= r.status_code < 500 and not leaked, (url, r.status_code, leaked)
    assert alice.get(f"/status/{a_job['id']}", headers=ta).status_code == 200   # nothing was deleted
    report_metric("id-path traversal variants tried on /status, /cancel, /sessions", id_tried)
    report_metric("id-path traversal escapes", id_escapes)
    assert id_escapes == 0

    # Symlinks planted inside twin_data: the recorded path must resolve to itself.
    out_dir = root / a_sid / "outputs" / a_job["id"]
    own_file = out_dir / "avatar_001.png"
    plants = [
        ("file -> outside secret", lambda: _symlink(own_file, secret)),
        ("file -> /etc/passwd", lambda: _symlink(own_file, Path("/etc/passwd"))),
        ("file -> bob's portrait", lambda: _symlink(own_file, root / b_sid / "outputs" / b_job["id"] / "avatar_001.png")),
        ("file -> jobs.db", lambda: _symlink(own_file, root / "jobs.db")),
        ("job dir -> bob's job dir", lambda: _symlink(out_dir, root / b_sid / "outputs" / b_job["id"])),
        ("outputs dir -> bob's outputs", lambda: _symlink(out_dir.parent, root / b_sid / "outputs")),
        ("job dir -> outside dir", lambda: _symlink(out_dir, _outside_dir(tmp_path, secret))),
    ]
    backup = tmp_path / "backup"
    import shutil
    shutil.copytree(root / a_sid, backup)
    for name, plant in plants:
        plant()
        r = alice.get(f"/download/{a_job['id']}/avatar_001.png", headers=ta)
        tried += 1
        leaked = [k for k, needle in secrets_.items() if needle in r.data] or (r.status_code == 200)
        escapes += bool(leaked)
        assert r.status_code == 404 and not leaked, (name, r.status_code)
        shutil.rmtree(root / a_sid)
        shutil.copytree(backup, root / a_sid)
    assert alice.get(f"/download/{a_job['id']}/avatar_001.png", headers=ta).data == own.data
    assert alice.get("/health").get_json()["state"] == "ready"
    report_metric("download traversal variants tried", tried)
    report_metric("download traversal escapes", escapes)
    report_metric("download traversal answers by status", dict(sorted(statuses.items())))
    assert tried >= 200 and escapes == 0


def _symlink(link: Path, target: Path) -> None:
    import shutil
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target)


def _outside_dir(tmp_path: Path, secret: Path) -> Path:
    d = tmp_path / "outside-dir"
    d.mkdir(exist_ok=True)
    (d / "avatar_001.png").write_bytes(secret.read_bytes())
    return d


@pytest.mark.parametrize("rel", ["../etc/passwd", "/etc/passwd", "a/../../x", "x/./../../y"])
def test_storage_resolve_relative_refuses_escapes(tmp_path, rel):
    from utils.storage import Storage
    with pytest.raises(errors.NotFound):
        Storage(tmp_path / "d").resolve_relative(rel)


# --- hostile uploads -------------------------------------------------------------------------------

def _png(w: int, h: int, idat: bytes | None = None, extra: bytes = b"") -> bytes:
    if idat is None:
        idat = zlib.compress(b"".join(b"\0" + b"\0" * w for _ in range(h)), 9)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + extra
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def _face_png() -> bytes:
    """A photo the real face service accepts (checked in test_mixed_upload...), as PNG."""
    from tests.photos import astronaut, to_bytes
    return to_bytes(astronaut(), "PNG")


def _face_jpeg() -> bytes:
    from tests.photos import selfie_set
    return selfie_set(1)[0][1]


def _zip() -> bytes:
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.js", "alert(document.cookie)")
    return buf.getvalue()


def _bomb_chunk(kind: bytes, head: bytes) -> bytes:
    return png_chunk(kind, head + zlib.compress(b"\0" * (64 * 1024 * 1024), 9))


def _with_chunk(png: bytes, chunk: bytes) -> bytes:
    return png[:33] + chunk + png[33:]     # right after IHDR (8 + 25 bytes)


def _pil(fmt: str, size=(64, 64)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.effect_noise(size, 50).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


# (kind, files as [(name, bytes)] or a raw request, expected status, expected code, per-file codes)
BAD_UPLOADS = [
    ("empty multipart body", {"raw": (b"", "multipart/form-data; boundary=x")}, 400, "invalid_request", None),
    ("no content type", {"raw": (b"files=1", "")}, 415, "unsupported_media_type", None),
    ("JSON instead of multipart", {"raw": (b'{"files": []}', "application/json")}, 415, "unsupported_media_type", None),
    ("text/plain body", {"raw": (b"hello", "text/plain")}, 415, "unsupported_media_type", None),
    ("multipart without files field", {"fields": {"other": "x"}}, 400, "invalid_request", None),
    ("multipart without a boundary", {"raw": (b"garbage", "multipart/form-data")}, 400, "invalid_request", None),
    ("multipart cut inside a part", {"raw": (b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"'
                                             b"\r\n\r\n\x89PNG", "multipart/form-data; boundary=x")},
     400, "invalid_request", None),
    ("multipart with a 5000-character boundary", {"raw": (b"\xff" * 100, "multipart/form-data; boundary=" + "b" * 5000)},
     400, "invalid_request", None),
    ("more files than TWIN_MAX_SELFIES", {"files": lambda: [(f"{i}.png", image_bytes()) for i in range(4)]},
     413, "payload_too_large", None),
    ("form parts beyond the parser's limit", {"files": lambda: [(f"{i}.png", b"x") for i in range(40)]},
     413, "payload_too_large", None),
    ("a file over TWIN_MAX_FILE_MB", {"files": lambda: [("big.png", image_bytes() + b"\0" * 1_100_000)]},
     413, "payload_too_large", None),
    ("whole request over TWIN_MAX_UPLOAD_MB", {"files": lambda: [(f"{i}.png", b"\0" * 600_000) for i in range(3)]},
     413, "payload_too_large", None),
    ("zero-byte file", {"files": lambda: [("empty.jpg", b"")]}, 422, "no_usable_selfies", ["empty_file"]),
    ("text named .jpg", {"files": lambda: [("note.jpg", b"just some text, not a photo\n" * 20)]},
     422, "no_usable_selfies", ["not_an_image"]),
    ("HTML named .png", {"files": lambda: [("x.png", b"<html><script>alert(1)</script></html>")]},
     422, "no_usable_selfies", ["not_an_image"]),
    ("SVG", {"files": lambda: [("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')]},
     422, "no_usable_selfies", ["not_an_image"]),
    ("truncated JPEG", {"files": lambda: [("cut.jpg", _face_jpeg()[:3000])]}, 422, "no_usable_selfies",
     ["truncated_image"]),
    ("30000x30000 header", {"files": lambda: [("huge.png", _png(30000, 30000, idat=zlib.compress(b"\0" * 64)))]},
     422, "no_usable_selfies", ["too_many_pixels"]),
    ("decompression bomb (8000x8000 zeros)", {"files": lambda: [("bomb.png", _png(8000, 8000))]},
     422, "no_usable_selfies", ["too_many_pixels"]),
    ("zTXt chunk inflating to 64 MB", {"files": lambda: [("ztxt.png", _with_chunk(_face_png(), _bomb_chunk(b"zTXt", b"Comment\0\0")))]},
     422, "no_usable_selfies", ["corrupt_image"]),
    ("iTXt chunk inflating to 64 MB", {"files": lambda: [("itxt.png", _with_chunk(_face_png(), _bomb_chunk(b"iTXt", b"Comment\0\1\0\0\0")))]},
     422, "no_usable_selfies", ["corrupt_image"]),
    ("iCCP chunk inflating to 64 MB", {"files": lambda: [("iccp.png", _with_chunk(_face_png(), _bomb_chunk(b"iCCP", b"icc\0\0")))]},
     422, "no_usable_selfies", ["corrupt_image"]),
    ("polyglot JPEG+ZIP", {"files": lambda: [("poly.jpg", _face_jpeg() + _zip())]}, 422, "no_usable_selfies",
     ["polyglot"]),
    ("polyglot PNG+HTML", {"files": lambda: [("poly.png", _face_png() + b"<html><script>alert(1)</script>")]},
     422, "no_usable_selfies", ["polyglot"]),
    ("polyglot GIF+JS", {"files": lambda: [("gif.js", b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00*/=alert(1);//;")]},
     422, "no_usable_selfies", ["unsupported_format"]),
    ("GIF", {"files": lambda: [("x.gif", _pil("GIF"))]}, 422, "no_usable_selfies", ["unsupported_format"]),
    ("BMP", {"files": lambda: [("x.bmp", _pil("BMP"))]}, 422, "no_usable_selfies", ["unsupported_format"]),
    ("TIFF", {"files": lambda: [("x.tif", _pil("TIFF"))]}, 422, "no_usable_selfies", ["unsupported_format"]),
    ("absurd aspect 1x20000", {"files": lambda: [("thin.png", _png(1, 20000))]}, 422, "no_usable_selfies", ["no_face"]),
    ("absurd aspect 20000x1", {"files": lambda: [("wide.png", _png(20000, 1))]}, 422, "no_usable_selfies", ["no_face"]),
    ("PNG with a corrupt IDAT", {"files": lambda: [("bad.png", _png(64, 64, idat=b"\x78\x9c" + os.urandom(200)))]},
     422, "no_usable_selfies", ["corrupt_image"]),
    ("only bad files, several kinds", {"files": lambda: [("a.jpg", b""), ("c.png", _png(8000, 8000)),
                                                         ("d.jpg", _face_jpeg() + _zip())]},
     422, "no_usable_selfies", ["empty_file", "too_many_pixels", "polyglot"]),
]


@pytest.fixture
def real_faces_app(make_app, service_settings, face_service):
    """The app on the real (dlib) face service, with small limits so the limit cases stay small."""
    s = service_settings.replace(max_selfies=3, max_file_mb=1.0, max_upload_mb=1.5)
    return make_app(s, faces=face_service)


@pytest.mark.parametrize("kind, request_, status, code, file_codes", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_get_their_4xx(real_faces_app, kind, request_, status, code, file_codes, report_metric):
    c = real_faces_app.test_client()
    if "raw" in request_:
        body, ctype = request_["raw"]
        r = c.post("/upload", data=body, content_type=ctype) if ctype else c.post("/upload", data=body)
    elif "fields" in request_:
        r = c.post("/upload", data=request_["fields"], content_type="multipart/form-data")
    else:
        r = upload(c, request_["files"]())
    tally(report_metric, "bad-upload kinds tried", kind)
    e = error_of(r)
    assert (r.status_code, e["code"]) == (status, code), e
    if file_codes is not None:
        assert [f["code"] for f in e["details"]["report"]["files"]] == file_codes
        if "inflating" in kind:
            assert "zip bomb" in e["details"]["report"]["files"][0]["message"]
        assert all(f["status"] == "rejected" for f in e["details"]["report"]["files"])
    assert len(e["message"]) < 1000
    # Nothing kept, and the server still serves.
    root = real_faces_app.extensions["twin"].storage.root
    assert [p.name for p in root.iterdir() if p.is_dir()] == []
    assert c.get("/health").get_json()["state"] == "ready"
    tally(report_metric, "bad-upload kinds answered with their 4xx", kind)


@pytest.mark.parametrize("name, status", [
    ("../../../etc/cron.d/evil.jpg", 200), ("/etc/passwd.jpg", 200), ("..\\..\\win.ini.jpg", 200),
    ("\u202egpj.exe", 200), ("x" * 1000 + ".jpg", 200), ("%2e%2e%2fx.jpg", 200),
    ("a\x00b.jpg", 200),
    # werkzeug's multipart parser drops a part whose file name holds a line break: no files, 400.
    ("line\r\nbreak.jpg", 400),
])
def test_hostile_filenames_are_never_paths(real_faces_app, tmp_path, name, status):
    """A good photo under a hostile name is accepted; the name is echoed as data, never used as a path."""
    c = real_faces_app.test_client()
    r = upload(c, [(name, _face_jpeg())])
    assert r.status_code == status, r.data[:300]
    root = real_faces_app.extensions["twin"].storage.root
    if status != 200:
        assert error_of(r)["code"] == "invalid_request" and not [p for p in root.iterdir() if p.is_dir()]
        return
    sid = r.get_json()["session_id"]
    originals = sorted(p.name for p in (root / sid / "originals").iterdir())
    assert originals in (["000.jpg"], ["000.bin"])
    every = {p.relative_to(root).parts[0] for p in root.rglob("*")}
    assert every <= {sid, "jobs.db", "jobs.db-wal", "jobs.db-shm"}


def test_mixed_upload_keeps_good_files_and_reports_bad_ones(real_faces_app):
    from tests.photos import selfie_set
    good = selfie_set(1)
    r = upload(real_faces_app.test_client(),
               [good[0], ("bomb.png", _png(8000, 8000)), ("poly.jpg", _face_jpeg() + _zip())])
    assert r.status_code == 200
    body = r.get_json()
    assert [(f["filename"], f["code"]) for f in body["report"]["files"]] == [
        (good[0][0], None), ("bomb.png", "too_many_pixels"), ("poly.jpg", "polyglot")]
    assert (body["accepted_count"], body["rejected_count"]) == (1, 2)


# --- hostile prompts ---------------------------------------------------------------------------------

PROMPTS = [
    ("emoji and CJK", {"prompt": "портрет 肖像 😀👩🏽‍🚀 e\u0301"}, 202, None),
    ("right-to-left with direction marks", {"prompt": "صورة شخصية \u202eevil\u202c \u200f"}, 202, None),
    ("tabs and newlines", {"prompt": "line one\n\tline two\r\n"}, 202, None),
    ("zero-width characters", {"prompt": "por\u200btrait\u2060"}, 202, None),
    ("NUL byte", {"prompt": "portrait\x00; rm -rf /"}, 400, "U+0000"),
    ("C0 control", {"prompt": "bell\x07"}, 400, "U+0007"),
    ("escape sequence", {"prompt": "\x1b[31mred"}, 400, "U+001B"),
    ("C1 control", {"prompt": "next\x85line"}, 400, "U+0085"),
    ("NUL in negative_prompt", {"prompt": "p", "negative_prompt": "a\x00"}, 400, "negative_prompt"),
    ("100 kB prompt", {"prompt": "a" * 100_000}, 400, "2000"),
    ("100 kB negative_prompt", {"prompt": "p", "negative_prompt": "b" * 100_000}, 400, "2000"),
    ("100 kB of 4-byte characters", {"prompt": "😀" * 100_000}, 413, "TWIN_MAX_JSON_KB"),
    ("only whitespace", {"prompt": " \n\t "}, 400, "prompt"),
    ("100 kB field name", {"prompt": "p", "k" * 100_000: 1}, 400, "unknown field"),
]


@pytest.fixture
def real_request_client(make_app, tiny_generator):
    """The app on the real tiny generator: its GenerationRequest does the validating."""
    return make_app(generator=tiny_generator).test_client()


@pytest.mark.parametrize("kind, payload, status, in_message", PROMPTS, ids=[p[0] for p in PROMPTS])
def test_hostile_prompts(real_request_client, kind, payload, status, in_message, report_metric):
    client = real_request_client
    upload(client, SELFIES)
    r = client.post("/generate", json=payload)
    tally(report_metric, "hostile prompt kinds tried", kind)
    assert r.status_code == status, r.data[:300]
    if status == 202:
        assert r.get_json()["request"]["prompt"].strip() == payload["prompt"].strip()
    else:
        e = error_of(r)
        assert in_message in e["message"] and len(r.data) < 2000
        assert "rm -rf" not in e["message"]  # the text itself is never echoed
    assert client.get("/health").status_code == 200


def test_lone_surrogate_is_refused(client):
    upload(client, SELFIES)
    r = client.post("/generate", data=b'{"prompt": "a \\ud800 b"}', content_type="application/json")
    assert r.status_code == 400 and "U+D800" in error_of(r)["message"]


# --- rate limits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["api_keys", "anonymous"])
def test_rate_limit_is_429_with_retry_after_per_caller(make_app, service_settings, mode):
    change = {"rate_limit_upload": "2/minute", "rate_limit_generate": "3/minute"}
    if mode == "api_keys":
        change["api_keys"] = "rl-key-a-1234567890,rl-key-b-1234567890"
    app = make_app(service_settings.replace(**change))
    if mode == "api_keys":
        a, b = app.test_client(), app.test_client()
        ha, hb = {"Authorization": "Bearer rl-key-a-1234567890"}, {"Authorization": "Bearer rl-key-b-1234567890"}
    else:
        a = app.test_client()
        b = app.test_client()
        b.environ_base["REMOTE_ADDR"] = "10.9.8.7"
        ha = hb = {}
    assert [upload(a, SELFIES, headers=ha).status_code for _ in range(2)] == [200, 200]
    r = upload(a, SELFIES, headers=ha)
    e = error_of(r)
    assert r.status_code == 429 and e["code"] == "rate_limited" and "2 per 1 minute" in e["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 61   # the rest of the one-minute window, rounded up
    assert upload(b, SELFIES, headers=hb).status_code == 200          # another caller has its own budget
    codes = [a.post("/generate", json={"prompt": "p"}, headers=ha).status_code for _ in range(4)]
    assert codes == [202, 202, 202, 429]
    assert a.get("/health").status_code == 200               # health is never limited


@pytest.mark.parametrize("trusted, second_status", [
    (0, 429),   # X-Forwarded-For is the client's own word: a forged one buys no new budget
    (1, 200),   # behind one trusted proxy the forwarded address is the client's
])
def test_forwarded_for_counts_only_behind_trusted_proxies(make_app, service_settings, trusted, second_status):
    c = make_app(service_settings.replace(rate_limit_upload="1/minute", trusted_proxies=trusted)).test_client()
    assert upload(c, SELFIES, headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 200
    assert upload(c, SELFIES, headers={"X-Forwarded-For": "198.51.100.2"}).status_code == second_status


def test_bad_rate_limit_setting_stops_startup(service_settings):
    from app import create_app
    with pytest.raises(errors.ConfigError, match="TWIN_RATE_LIMIT_UPLOAD"):
        create_app(service_settings.replace(rate_limit_upload="lots"), generator=FakeGenerator(), faces=FakeFaceService())


def test_oversized_json_is_413_before_parsing(client):
    r = client.post("/generate", data=b'{"prompt": "' + b"a" * 300_000 + b'"}', content_type="application/json")
    assert r.status_code == 413 and "TWIN_MAX_JSON_KB" in error_of(r)["message"]


# --- privacy deletion ---------------------------------------------------------------------------------

def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_delete_session_leaves_nothing_on_disk_or_in_jobs_db(make_app, service_settings, face_service):
    from safetensors.numpy import load_file
    from tests.photos import selfie_set
    app = make_app(service_settings, faces=face_service)
    rt = app.extensions["twin"]
    root = rt.storage.root
    alice, bob = app.test_client(), app.test_client()
    photos = selfie_set(2)
    sid = upload(alice, photos).get_json()["session_id"]
    keep = upload(bob, [selfie_set(3)[2]]).get_json()["session_id"]
    marker = "PRIVATE-PROMPT-7f3a9"
    jobs = [finished(alice, alice.post("/generate", json={"prompt": f"{marker} {i}", "num_images": 2}).get_json()["id"])
            for i in range(2)]
    bob_job = finished(bob, bob.post("/generate", json={"prompt": "BOB-KEEPS-THIS"}).get_json()["id"])
    emb = load_file(str(root / sid / "embeddings.safetensors"))["embeddings"]
    crop = (root / sid / "crops" / "000.png").read_bytes()
    needles = {"session id": sid.encode(), "prompt": marker.encode(), "job ids": [j["id"].encode() for j in jobs],
               # From the middle of the scan data: JPEG headers (quantisation tables) are alike across photos.
               "original photo": photos[0][1][len(photos[0][1]) // 2:][:64], "crop": crop[len(crop) // 2:][:64],
               "embedding bytes": emb[0].tobytes()[:32], "output path": f"{sid}/outputs".encode()}
    before = _all_bytes(root)
    assert any(needles["prompt"] in b for b in before.values())      # the scan sees the data while it exists

    r = alice.delete(f"/sessions/{sid}")
    assert r.status_code == 200
    after = _all_bytes(root)
    assert not any(sid in name for name in after)
    found = []
    for name, data in after.items():
        for what, needle in needles.items():
            for n in (needle if isinstance(needle, list) else [needle]):
                if n in data:
                    found.append((what, name))
    assert found == []
    # The other caller's session, job and outputs are untouched.
    assert (root / keep).is_dir() and any(b"BOB-KEEPS-THIS" in d for d in after.values())
    assert bob.get(f"/status/{bob_job['id']}").status_code == 200
    for j in jobs:
        assert alice.get(f"/status/{j['id']}").status_code == 404
        assert rt.store.get(j["id"]) is None
    assert rt.store.get_session(sid) is None


def test_logs_carry_no_biometrics(make_app, service_settings, face_service, caplog):
    from safetensors.numpy import load_file
    from tests.photos import selfie_set
    caplog.set_level(logging.DEBUG)
    app = make_app(service_settings, faces=face_service)
    c = app.test_client()
    photos = selfie_set(2)
    body = upload(c, photos).get_json()
    job = finished(c, c.post("/generate", json={"prompt": "p"}).get_json()["id"])
    c.get(job["outputs"][0]["url"])
    root = app.extensions["twin"].storage.root
    emb = load_file(str(root / body["session_id"] / "embeddings.safetensors"))
    c.delete(f"/sessions/{body['session_id']}")
    # Every record with every extra field, as the JSON formatter would write it.
    text = "\n".join(r.getMessage() + " " + repr(vars(r)) for r in caplog.records)
    assert "selfies validated" in text and "session deleted" in text
    values = [float(v) for v in list(emb["embeddings"].ravel()[:64]) + list(emb["template"].ravel()[:64])]
    for v in values:
        for form in (f"{v:.5f}", repr(v)[:9]):
            assert form not in text, form
    for needle in (body["client_token"], "\\x89PNG", "JFIF", "base64", "embedding\":", "template\":"):
        assert needle not in text, needle
    b64 = base64.b64encode(photos[0][1][1000:1048]).decode()[:40]
    assert b64 not in text


def test_private_answers_are_not_cacheable_or_sniffable(client):
    body = upload(client, SELFIES).get_json()
    job = finished(client, client.post("/generate", json={"prompt": "p"}).get_json()["id"])
    for r in (client.get(job["outputs"][0]["url"]), client.get(f"/status/{job['id']}"),
              client.get(f"/status/{new_id()}"), client.delete(f"/sessions/{body['session_id']}")):
        assert r.headers["Cache-Control"] == "private, no-store"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/health").headers["X-Content-Type-Options"] == "nosniff"


def test_openapi_describes_every_route(app):
    c = app.test_client()
    spec = c.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    routes = {str(r.rule).replace("<", "{").replace(">", "}") for r in app.url_map.iter_rules()
              if r.endpoint != "static"}
    documented = set(spec["paths"])
    assert documented <= routes
    assert routes - documented <= {"/", "/test"}
    body = spec["components"]["schemas"]["GenerateRequest"]
    assert body["properties"]["prompt"]["maxLength"] == app.extensions["twin"].settings.max_prompt_chars
    assert body["additionalProperties"] is False


# --- the same over real HTTP (gunicorn parses the raw request line) -----------------------------

@pytest.mark.slow
def test_traversal_and_hostile_requests_over_real_http(start_server, tmp_path, report_metric):
    """Raw request lines that no client library would normalise, sent to gunicorn on the fakes."""
    import http.client
    import requests
    from tests.fixtures.service import FAKE_APP, server_env
    server = start_server(server_env(tmp_path / "data"), app_spec=FAKE_APP)
    s = requests.Session()
    up = s.post(server.url + "/upload", files=[("files", ("a.png", image_bytes()))]).json()
    token = {"X-Client-Token": up["client_token"]}
    job = s.post(server.url + "/generate", json={"prompt": "p"}, headers=token).json()
    wait_until(lambda: s.get(server.url + f"/status/{job['id']}", headers=token).json()["status"] == "succeeded", 20)
    good = s.get(server.url + f"/download/{job['id']}/avatar_001.png", headers=token)
    assert good.status_code == 200
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"OUTSIDE-SECRET-" * 10)
    needles = [b"root:", b"OUTSIDE-SECRET", b"SQLite format 3", b'"owner"']
    raw_paths = []
    for p in _traversal_payloads(new_id(), new_id(), up["session_id"], secret):
        enc = quote(p, safe="/%;=:~\\")
        raw_paths += [f"/download/{job['id']}/{enc}", f"/download/{enc}"]
    raw_paths += ["/download/../../../../etc/passwd", "/../../../../etc/passwd", "/download/%2e%2e/%2e%2e/jobs.db",
                  f"/download/{job['id']}/..%00/avatar_001.png", "//etc/passwd", "/download/./././" + job["id"]]
    tried = escapes = 0
    host, port = server.url.split("//")[1].split(":")
    for path in raw_paths:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("X-Client-Token", up["client_token"])
        conn.endheaders()
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        tried += 1
        bad = not 400 <= resp.status < 500 or any(n in data for n in needles) or data == good.content
        escapes += bad
        assert not bad, (path, resp.status)
    assert s.get(server.url + "/health").json()["state"] == "ready"
    assert "authentication off" in server.log_tail(200_000)
    report_metric("download traversal variants over real HTTP (gunicorn)", tried)
    report_metric("download traversal escapes over real HTTP", escapes)
    assert tried >= 200 and escapes == 0
