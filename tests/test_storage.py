"""Storage: ids, safe paths, atomic writes, staging, clean-up."""
from __future__ import annotations

import os

import pytest

from utils import errors
from utils.storage import (Storage, atomic_write_bytes, hash_secret, is_output_name, is_valid_id, new_id,
                           output_name, safe_extension)


def test_new_ids_are_unique_and_long():
    ids = {new_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(is_valid_id(i) and len(i) == 24 for i in ids)  # 18 bytes = 144 bits


@pytest.mark.parametrize("value, ok", [
    ("A" * 24, True), ("abc_DEF-123456789012345678", True), ("short", False), ("../../etc/passwd", False),
    ("a" * 22 + "/", False), ("a" * 23 + ".", False), ("", False), (None, False), ("a" * 65, False),
])
def test_id_format(value, ok):
    assert is_valid_id(value) is ok


@pytest.mark.parametrize("value, ok", [
    ("avatar_001.png", True), ("avatar_123.png", True), ("avatar_1.png", False), ("avatar_001.PNG", False),
    ("../avatar_001.png", False), ("avatar_001.png\n", False), ("avatar_0001.png", False),
])
def test_output_name_format(value, ok):
    assert is_output_name(value) is ok


@pytest.mark.parametrize("i, name", [(1, "avatar_001.png"), (4, "avatar_004.png"), (12, "avatar_012.png")])
def test_output_name(i, name):
    assert output_name(i) == name


@pytest.mark.parametrize("filename, ext", [
    ("me.JPG", "jpg"), ("a.b.png", "png"), ("x.heic", "heic"), ("evil.php", "bin"), ("noext", "bin"),
    ("../../x.png", "png"), (None, "bin"),
])
def test_safe_extension(filename, ext):
    assert safe_extension(filename) == ext


def test_hash_secret_is_stable_and_not_the_secret():
    assert hash_secret("tok") == hash_secret("tok") != "tok"
    assert len(hash_secret("tok")) == 64


@pytest.mark.parametrize("bad", ["../x" + "a" * 22, "a" * 5, "/etc/passwd", ""])
def test_session_dir_rejects_bad_ids(tmp_path, bad):
    with pytest.raises(errors.NotFound):
        Storage(tmp_path).session_dir(bad)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]  # no temp file left


def test_clean_partial_files(tmp_path):
    s = Storage(tmp_path)
    sid, jid = new_id(), new_id()
    out = s.output_dir(sid, jid)
    out.mkdir(parents=True)
    (out / "avatar_001.png").write_bytes(b"done")
    (out / ".avatar_002.png.x.part").write_bytes(b"half")
    s.staging_dir(new_id())
    assert s.clean_partial_files() == 2
    assert [p.name for p in out.iterdir()] == ["avatar_001.png"]
    assert not any(p.name.startswith(".staging-") for p in tmp_path.iterdir())


def test_write_session_failure_leaves_nothing(tmp_path):
    from tests.fakes import FakeFaceService, image_bytes

    class BrokenIdentity:
        def save(self, path):
            raise OSError("disk full")
    faces = FakeFaceService()
    faces.setup()
    report = faces.validate_selfies([("a.png", image_bytes())])
    s = Storage(tmp_path)
    with pytest.raises(OSError):
        s.write_session(new_id(), owner_hash="h", files=[("a.png", image_bytes())], report=report,
                        identity=BrokenIdentity())
    assert list(tmp_path.iterdir()) == []


def test_delete_session(tmp_path):
    s = Storage(tmp_path)
    sid = new_id()
    (s.session_dir(sid) / "outputs").mkdir(parents=True)
    assert s.delete_session(sid) is True
    assert s.delete_session(sid) is False
