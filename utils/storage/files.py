"""Atomic file writes, a full volume, and the encodings written (PNG, JPEG thumbnail)."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from utils.errors import InsufficientStorage

TMP_SUFFIX = ".part"

# --- a full volume --------------------------------------------------------------------------

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full", "os error 28",
               "os error 122")


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT, whether raised by the OS or reported by a library that wraps it (SQLite's
    SQLITE_FULL, safetensors' Rust I/O error, PIL)."""
    while exc is not None:
        if isinstance(exc, InsufficientStorage):
            return True
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == 13:  # SQLITE_FULL
            return True
        if any(t in str(exc) for t in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def full_error(what: str) -> InsufficientStorage:
    return InsufficientStorage(f"the data volume is full: could not write {what}; free space under "
                               "TWIN_DATA_DIR and retry")


# --- atomic writes ---------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: readers see all or nothing.
    A full volume (ENOSPC/EDQUOT) raises InsufficientStorage and leaves no temp file behind."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with suppress_os():
                os.unlink(tmp)
        if is_disk_full(e) and not isinstance(e, InsufficientStorage):
            raise full_error(path.name) from e
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def png_bytes(image) -> bytes:
    import io
    buf = io.BytesIO()
    # compress_level 1: a 1024² portrait encodes several times faster than at the default 6, for ~10% more bytes.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumbnail_bytes(image, side: int) -> bytes:
    """A JPEG no larger than side × side (aspect kept) for galleries."""
    import io
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side))  # reduce() first, then a filtered resize: cheap even from 1024²
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85, optimize=True)
    return buf.getvalue()


def atomic_save_png(path: Path, image) -> None:
    atomic_write_bytes(path, png_bytes(image))


class suppress_os:
    """``with suppress_os():`` ignores an OSError (clean-up that may find nothing to clean)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


class StoredFile:
    """One stored file opened for a download: ``path`` where the backend has a local file (the folder:
    served with sendfile, ranges and ETag as before), else ``stream`` (a bucket object's body, read in
    chunks) with its ``size`` and ``etag``."""

    def __init__(self, *, path: Path | None = None, stream=None, size: int | None = None,
                 etag: str | None = None, modified: float | None = None) -> None:
        self.path, self.stream, self.size, self.etag, self.modified = path, stream, size, etag, modified

    def read(self) -> bytes:
        """All of it (an init image taken from an output); closes the stream."""
        if self.path is not None:
            return self.path.read_bytes()
        try:
            return self.stream.read()
        finally:
            self.stream.close()
