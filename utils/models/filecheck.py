"""One line of the preflight (``FileCheck``) and the header-only comparisons it is made from: a weight file's
keys, shapes and dtypes against what the code will build, without reading the tensors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class FileCheck:
    path: str                 # relative to the folder it was looked for in (or absolute for the face pack)
    status: str               # ok | absent | skipped | missing | wrong_shape | missing_key | unexpected_key | wrong_dtype | corrupt
    detail: str = ""
    # False for files the service does not load at start-up (single-file checkpoints: only POST /models/load
    # reads one, and a failed load there keeps the old model serving): a problem is printed as a warning but
    # does not fail the preflight, so one odd checkpoint in the folder never keeps the service down.
    blocking: bool = True

    @property
    def ok(self) -> bool:
        # "absent": an optional file (Lightning, style LoRAs, checkpoints, restoration models) that is not
        # there. Said, but not a failure: the product runs without it; a present but broken one is a failure.
        # "skipped": another family's file in a shared folder (LoRAs, checkpoints), checked with that family.
        return self.status in ("ok", "absent", "skipped")

    def line(self) -> str:
        note = "" if self.ok or self.blocking else " (warning only: loaded by POST /models/load, not at start-up)"
        return f"{self.status.upper():<15} {self.path}" + (f": {self.detail}" if self.detail else "") + note


def corrupt(rel: str, e: BaseException) -> FileCheck:
    """A file whose header (or graph) did not parse: truncated, or not the format its name says."""
    return FileCheck(rel, "corrupt", f"{type(e).__name__}: {str(e)[:160]}")


def rel_path(p: Path, top: Path) -> str:
    """``p`` as the preflight names it: relative to ``top`` with ``top``'s own name in front, else absolute."""
    try:
        return f"{top.name}/{p.relative_to(top).as_posix()}"
    except ValueError:
        return str(p)


_FLOATS = ("F16", "BF16", "F32", "torch.float16", "torch.bfloat16", "torch.float32")


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} without reading the tensors: the safetensors header, or torch.load with
    weights_only + mmap for a .bin (nested {"image_proj": .., "ip_adapter": ..} keys are flattened)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
        return out
    import torch
    sd = torch.load(str(path), weights_only=True, mmap=True, map_location="cpu")
    flat: dict[str, Any] = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in flat.items()}


def open_header(rel: str, path: Path) -> dict[str, tuple[tuple[int, ...], str]] | FileCheck:
    """The file's header (``read_header``), or the FileCheck that says why there is none."""
    if not path.is_file():
        return FileCheck(rel, "missing")
    try:
        return read_header(path)
    except Exception as e:  # truncated / not a weight file: every loader error means "corrupt"
        return corrupt(rel, e)


def compare(rel: str, path: Path, expected: dict[str, tuple], wildcard: set[tuple[str, int]] = frozenset()) -> FileCheck:
    """expected: {key: shape}; wildcard: (key, dim) pairs whose size is free (LoRA rank)."""
    got = open_header(rel, path)
    return got if isinstance(got, FileCheck) else compare_header(rel, got, expected, wildcard)


def compare_header(rel: str, got: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, tuple],
                   wildcard: set[tuple[str, int]] = frozenset()) -> FileCheck:
    """A read header against {key: shape}: the first missing key, wrong shape or unexpected key, else dtypes."""
    for key in sorted(expected):
        if key not in got:
            extra = sorted(set(got) - set(expected))
            hint = f" (file has unexpected {extra[0]!r})" if extra else ""
            return FileCheck(rel, "missing_key", f"key {key!r} not in file{hint}")
        shape, want = got[key][0], tuple(expected[key])
        same = len(shape) == len(want) and all(a == b or (key, i) in wildcard for i, (a, b) in enumerate(zip(shape, want)))
        if not same:
            return FileCheck(rel, "wrong_shape", f"key {key!r} has shape {list(shape)}, expected {list(want)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        return FileCheck(rel, "unexpected_key", f"key {extra[0]!r} is not built by the code ({len(extra)} such keys)")
    return dtype_check(rel, got)


def dtype_check(rel: str, tensors: dict[str, tuple[tuple[int, ...], str]], note: str = "") -> FileCheck:
    """The last check of a weight file whose keys and shapes passed: every tensor a float type; the OK
    line says how many tensors and which dtypes."""
    bad = sorted(k for k, (_, dt) in tensors.items() if dt not in _FLOATS)
    if bad:
        return FileCheck(rel, "wrong_dtype", f"key {bad[0]!r} has dtype {tensors[bad[0]][1]}, expected a float type")
    names = {"torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32"}
    dtypes = sorted({names.get(dt, dt) for _, dt in tensors.values()})
    return FileCheck(rel, "ok", f"{len(tensors)} tensors, {'/'.join(dtypes)}{note}")


def meta_model(build):
    """``build()`` on the meta device: the model's parameter names and shapes, no memory."""
    import torch
    with torch.device("meta"):
        return build()


def meta_state(build) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in meta_model(build).state_dict().items()}


def weight_file(folder: Path, stem: str, fp16: bool) -> Path:
    """The component's weight file as from_pretrained picks it (the fp16 variant first when asked for)."""
    for name in ([f"{stem}.fp16.safetensors"] if fp16 else []) + [f"{stem}.safetensors"]:
        if (folder / name).is_file():
            return folder / name
    return folder / (f"{stem}.fp16.safetensors" if fp16 else f"{stem}.safetensors")
