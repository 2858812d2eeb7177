"""A small bounded cache of bucket objects on this machine's disk, shared by the processes that use the
same folder (a GPU worker, the API node, several workers of one box).

Objects of a session never change once written (ids are random and never reused; an identity file
rewritten by two workers holds the same identity), so a cached copy stays right for as long as the
object exists; the service checks the session record before it uses one, and a deleted session's copies
are dropped (``forget``) by the process that deletes it and by every node's sweep.

Safe with several processes without a shared lock on reads: a copy is written to a unique temp file in
its folder and renamed into place (readers see all or nothing; two processes fetching one object both
write and the last rename wins). A hit sets the file's mtime: the LRU clock. Trimming takes an exclusive
``flock`` on ``.lock`` (one trimmer at a time; the others skip) and never removes a file used in the last
``grace_s`` seconds, so a path just handed out is still there when its caller opens it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

from utils.errors import NotFound
from utils.storage.files import TMP_SUFFIX, suppress_os
from utils.storage.names import is_valid_id

_LOCK = ".lock"


class ObjectCache:
    def __init__(self, root: Path, max_bytes: int, *, grace_s: float = 60.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.grace_s = grace_s

    def path(self, key: str) -> Path:
        """The copy's place: the key relative to the bucket prefix (``<session>/<name>``), checked."""
        parts = key.split("/")
        if not parts or not is_valid_id(parts[0]) or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise NotFound(f"not found: {key!r}")
        return self.root.joinpath(*parts)

    def get(self, key: str, fetch: Callable[[BinaryIO], None]) -> Path:
        """The local copy of ``key``; ``fetch(file)`` writes the object into ``file`` on a miss."""
        p = self.path(key)
        try:
            os.utime(p)        # a hit: mark it used
            return p
        except FileNotFoundError:
            pass
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix="." + p.name + ".", suffix=TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as fh:
                fetch(fh)
            os.replace(tmp, p)
        except BaseException:
            with suppress_os():
                os.unlink(tmp)
            raise
        self.trim()
        return p

    def put_file(self, key: str, src: Path) -> Path:
        """Move ``src`` (a file this process just uploaded as ``key``) into the cache."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, p)
        self.trim()
        return p

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh temp file name inside the cache (same volume: ``put_file`` is a rename)."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".new-", suffix=suffix + TMP_SUFFIX)
        os.close(fd)
        return Path(tmp)

    def forget(self, session_id: str) -> bool:
        """Drop every copy of a session's objects (it was deleted)."""
        if not is_valid_id(session_id):
            return False
        d = self.root / session_id
        existed = d.exists()
        shutil.rmtree(d, ignore_errors=True)
        return existed

    def sessions(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_valid_id(p.name))

    def usage(self) -> dict:
        files = list(self._entries())
        return {"files": len(files), "bytes": sum(size for _, size, _ in files), "max_bytes": self.max_bytes}

    def _entries(self):
        """(last use, size, path) of each finished copy."""
        for dirpath, _dirs, names in os.walk(self.root):
            for name in names:
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except FileNotFoundError:   # trimmed by another process meanwhile
                    continue
                yield st.st_mtime, st.st_size, p

    def trim(self) -> int:
        """Remove least recently used copies until the cache fits ``max_bytes``. Returns bytes removed."""
        with open(self.root / _LOCK, "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0                  # another process is trimming now
            self._drop_stale_temps()
            entries = sorted(self._entries())
            total = sum(size for _, size, _ in entries)
            removed, now = 0, time.time()
            for used, size, path in entries:
                if total <= self.max_bytes:
                    break
                if now - used < self.grace_s:
                    continue              # handed out just now: its caller is about to open it
                with suppress_os():
                    path.unlink()
                    total -= size
                    removed += size
            return removed

    def _drop_stale_temps(self, older_than_s: float = 3600.0) -> None:
        """Temp files a killed process left (a live fetch renames its file within seconds)."""
        now = time.time()
        for p in self.root.rglob("*" + TMP_SUFFIX):
            with suppress_os():
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
