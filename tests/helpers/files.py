"""Cheap copies of a model folder for tests that break one file at a time."""
from __future__ import annotations

import os
from pathlib import Path


def clone(src: Path, dst: Path) -> Path:
    """A copy of the tiny folder made of symlinks, so one case can break one file cheaply."""
    for f in src.rglob("*"):
        if f.is_file():
            t = dst / f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f, t)
    return dst


def own(path: Path) -> Path:
    """Replace the symlink ``path`` by a private copy of its file (to change it)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def truncate(p: Path):
    data = own(p).read_bytes()
    p.write_bytes(data[: len(data) // 2])


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple], dtype: str = "BF16") -> None:
    """A valid safetensors file of full-size ``shapes`` whose data section is a hole (sparse: no disk used):
    what a header-only reader (verify) sees of a real 24 GB checkpoint."""
    import json
    import math
    import struct
    size = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header, off = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
