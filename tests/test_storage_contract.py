"""The Storage contract (utils/contracts.py) on both backends: the data folder and an S3 bucket on a real
S3-protocol server (moto's standalone server on loopback, or TWIN_TEST_S3_URL; tests/fixtures/s3.py).
Each behaviour is one table row run against each backend, so the two stay interchangeable."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.fakes import FakeFaceService, FakeGenerator, image_bytes
from tests.fixtures.s3 import S3_KINDS
from utils import contracts, errors
from utils.storage import new_id

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["local"] + S3_KINDS)
def storage(request, tmp_path, open_s3):
    """The data folder, or a bucket on moto / TWIN_TEST_S3_URL."""
    from utils.config import Settings
    from utils.service import wiring
    if request.param == "local":
        return wiring.build_storage(Settings(data_dir=tmp_path / "data"))
    return wiring.build_storage(open_s3(request.param).settings(tmp_path))


def accepted_upload(n: int = 3):
    faces = FakeFaceService()
    faces.setup()
    files = [(f"s{i}.jpg" if i % 2 else f"s{i}.png", image_bytes((30 * i, 90, 40))) for i in range(n)]
    return files, faces.validate_selfies(files)


def stored_session(storage, identity: bool = True) -> tuple[str, list, object]:
    files, report = accepted_upload()
    gen = FakeGenerator()
    ident = gen.build_identity([a.crop for a in report.accepted], [a.embedding for a in report.accepted],
                               face_model=report.model_name) if identity else None
    sid = new_id()
    storage.write_session(sid, owner_hash="h", files=files, report=report, identity=ident, created_at=1000.0,
                          self_similarity=0.61)
    return sid, files, report


def test_both_backends_are_storage(storage):
    assert isinstance(storage, contracts.Storage)
    assert isinstance(storage, contracts.PresignedDownloads) is (storage.backend == "s3")


def test_session_round_trip(storage):
    sid, files, report = stored_session(storage)
    faces = storage.session_faces(sid)
    assert faces.indices == [a.index for a in report.accepted]
    assert [c.size for c in faces.crops] == [a.crop.size for a in report.accepted]
    np.testing.assert_allclose(np.stack(faces.embeddings), np.stack([a.embedding for a in report.accepted]))
    np.testing.assert_allclose(storage.load_template(sid), report.template)
    assert storage.session_self_similarity(sid) == 0.61
    assert storage.session_created_at(sid) == 1000.0
    assert sid in list(storage.session_ids())
    name, data = storage.accepted_original(sid, 1)
    assert (name, data) == ("001.jpg", files[1][1])
    assert storage.accepted_original(sid, 7) is None


def test_identities_are_saved_and_listed_upload_first(storage):
    from tests.fakes import FakeSessionIdentity
    sid, _, report = stored_session(storage)
    gen = FakeGenerator()

    class Other(FakeSessionIdentity):
        cache_key = "other-method"
    first = gen.identity_type.load(storage.identity_paths(sid)[0])
    storage.save_identity(sid, Other(first.vector, first.face_model, first.n))
    paths = storage.identity_paths(sid)
    assert [p.name for p in paths][0] == "identity.safetensors" and len(paths) == 2
    assert paths[1].name.startswith("identity-") and gen.identity_type.load(paths[1]).n == first.n


@pytest.mark.parametrize("name", ["avatar_001.png", "avatar_001.thumb.jpg", "avatar_002_raw.png"])
def test_job_files_are_written_whole_read_back_and_removed(storage, name):
    sid, _, _ = stored_session(storage, identity=False)
    job = new_id()
    data = image_bytes((1, 2, 3))
    ref = storage.save_output(sid, job, name, data)
    assert ref == f"{sid}/outputs/{job}/{name}"
    assert storage.open_output(ref).read() == data
    storage.remove([ref])
    with pytest.raises(errors.NotFound):
        storage.open_output(ref)


@pytest.mark.parametrize("ref", ["../x/outputs/y/avatar_001.png", "a" * 24 + "/crops/000.png",
                                 "a" * 24 + "/outputs/" + "b" * 24 + "/../../meta.json", "/etc/passwd"])
def test_a_reference_outside_job_files_is_not_found(storage, ref):
    with pytest.raises(errors.NotFound):
        storage.open_output(ref)


def test_init_image_put_get_and_gone_with_the_session(storage):
    sid, _, _ = stored_session(storage, identity=False)
    job = new_id()
    assert storage.init_image(sid, job) is None
    storage.put_init_image(sid, job, b"png-bytes")
    assert storage.init_image(sid, job) == b"png-bytes"
    assert storage.delete_session(sid) is True
    assert storage.delete_session(sid) is False
    assert sid not in list(storage.session_ids())
    with pytest.raises(errors.NotFound):
        storage.session_faces(sid)


def test_the_probe_writes_reads_and_deletes(storage):
    steps = storage.probe()
    assert [e for _, e in steps] == [None] * len(steps) and {"write", "read", "delete"} <= {s for s, _ in steps}
    assert storage.ping() is True


# --- the bucket only ------------------------------------------------------------------------------------

@pytest.fixture
def bucket_storage(s3, tmp_path):
    from utils.service import wiring
    st = wiring.build_storage(s3.settings(tmp_path, s3_sse="AES256"))
    return s3, st


def test_server_side_encryption_is_asked_for_every_object(bucket_storage):
    s3, st = bucket_storage
    sid, _, _ = stored_session(st)
    keys = s3.keys(sid + "/")
    assert len(keys) >= 8
    c = s3.client()
    assert {c.head_object(Bucket=s3.bucket, Key=k).get("ServerSideEncryption") for k in keys} == {"AES256"}


def test_a_large_object_goes_up_as_one_multipart_upload(bucket_storage):
    from utils.storage.bucket import MULTIPART_BYTES
    s3, st = bucket_storage
    sid, _, _ = stored_session(st, identity=False)
    data = np.random.default_rng(0).bytes(MULTIPART_BYTES + 1024)
    ref = st.save_output(sid, new_id(), "avatar_001.png", data)
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{ref}")
    assert head["ETag"].strip('"').endswith("-2")        # S3's ETag of a two-part upload
    assert st.open_output(ref).read() == data


def test_an_upload_that_fails_half_way_leaves_no_object(bucket_storage, monkeypatch):
    s3, st = bucket_storage
    real_put = st.bucket.put

    def put(rel, data, content_type=None):
        if rel.endswith("meta.json"):
            raise errors.StorageUnavailable("the bucket went away")
        return real_put(rel, data, content_type)
    monkeypatch.setattr(st.bucket, "put", put)
    files, report = accepted_upload()
    sid = new_id()
    with pytest.raises(errors.StorageUnavailable):
        st.write_session(sid, owner_hash="h", files=files, report=report)
    assert s3.keys(sid + "/") == []


def test_reads_come_from_the_local_cache_once_fetched(s3, s3_proxy, tmp_path):
    """What a GPU worker reads (face features, crops, identities) is fetched once; with the bucket away the
    cached copies still serve, and the session's copies go when it is deleted here."""
    from utils.service import wiring
    st = wiring.build_storage(s3.settings(tmp_path, url=s3_proxy.url))
    sid, _, _ = stored_session(st)
    st.session_faces(sid)
    st.identity_paths(sid)
    assert st.cached_sessions() == [sid]
    s3_proxy.down()
    assert len(st.session_faces(sid).crops) == 3          # no request reaches the bucket
    assert st.load_template(sid) is not None
    s3_proxy.up()
    assert st.delete_session(sid) is True
    assert st.cached_sessions() == []


def test_a_versioned_bucket_loses_every_version_and_marker(bucket_storage):
    s3, st = bucket_storage
    s3.client().put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    sid, _, _ = stored_session(st)
    c = s3.client()
    key = f"{s3.prefix}/{sid}/report.json"
    c.put_object(Bucket=s3.bucket, Key=key, Body=b"{}")        # a second version
    c.delete_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{sid}/meta.json")   # a delete marker
    assert len(s3.versions(sid + "/")) >= 10
    assert st.delete_session(sid) is True
    assert s3.versions(sid + "/") == [] and s3.keys(sid + "/") == []


def test_a_presigned_url_answers_with_the_asked_headers(bucket_storage):
    import requests
    s3, st = bucket_storage
    sid, _, _ = stored_session(st, identity=False)
    data = image_bytes((9, 9, 9))
    ref = st.save_output(sid, new_id(), "avatar_001.png", data)
    url = st.download_url(ref, disposition="attachment; filename=avatar_001.png", content_type="image/png",
                          expires=60)
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-Disposition"] == "attachment; filename=avatar_001.png"
    st.remove([ref])
    with pytest.raises(errors.NotFound):
        st.download_url(ref, disposition="inline", content_type="image/png", expires=60)


def test_storage_images_open(storage):
    """A stored crop is a real PNG the face service can read back (guards the encoding)."""
    sid, _, report = stored_session(storage, identity=False)
    crop = storage.session_faces(sid).crops[0]
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).size == report.accepted[0].crop.size
