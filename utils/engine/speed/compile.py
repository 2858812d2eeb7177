"""torch.compile of the SDXL UNet (regional: its repeated transformer blocks; full: the whole UNet and the
VAE decoder), with the compiled kernels kept on disk across restarts and the recompiles for new shapes capped.

The on-disk cache is inductor's own (FX graph + autotune caches, TORCHINDUCTOR_CACHE_DIR), in one sub-folder
per torch version and device: kernels built by another torch or for another GPU are never read (their
folders are named in one log line). A folder whose stamp does not match what its name says (copied by hand,
half-written) is emptied with one log line."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from utils.engine.speed.plan import Device

log = logging.getLogger("twin.speed")
STAMP = "stamp.json"
WARMUP_LIMIT = 64          # recompiles allowed while set-up warms the configured shapes


def cache_key(device: Device) -> str:
    import torch
    return f"torch-{torch.__version__}-{device.slug}".replace("+", "_")


def prepare_cache(root: Path, device: Device) -> Path:
    """The cache folder for this torch and device, made and stamped; inductor is pointed at it. Never raises
    for a bad cache: an unreadable stamp means an empty folder and a log line."""
    import torch
    key = cache_key(device)
    folder = Path(root) / key
    others = sorted(p.name for p in Path(root).glob("torch-*") if p.is_dir() and p.name != key) if Path(root).is_dir() else []
    if others:
        log.info("compile cache: ignoring caches of another torch or device", extra={"ignored": others, "using": key})
    stamp = {"torch": torch.__version__, "device": device.name, "capability": list(device.capability)}
    try:
        found = json.loads((folder / STAMP).read_text()) if (folder / STAMP).is_file() else None
    except (OSError, ValueError):
        found = "unreadable"
    if found is not None and found != stamp:
        log.warning("compile cache: stale or unreadable cache emptied", extra={"folder": str(folder)})
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).write_text(json.dumps(stamp))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def compile_unet(pipe, mode: str, device: Device) -> str:
    """Compile in place; returns what was compiled (for /system-status). The first shape compiles static;
    dynamo's automatic dynamic then makes what changes symbolic at its first change (batch, size, and the
    identity adapter's scale, a float attribute the attention processors read): with static shapes every
    identity strength a request names would be a new graph (measured on tiny: one recompile per value). The
    recompile cap bounds the rest."""
    import torch
    torch._dynamo.config.recompile_limit = WARMUP_LIMIT
    if mode == "regional":
        # diffusers' regional compile: each BasicTransformerBlock (UNet2DConditionModel._repeated_blocks) is
        # compiled; the blocks share code, so SDXL's 70 blocks compile as a handful of graphs.
        pipe.unet.compile_repeated_blocks(fullgraph=True)
        return "unet transformer blocks"
    # max-autotune with CUDA graphs only on a GPU: on the CPU they do not exist and autotuning is minutes.
    opts = {"mode": "max-autotune"} if device.kind == "cuda" else {}
    pipe.unet.compile(fullgraph=False, **opts)
    pipe.vae.decoder.compile(fullgraph=False, **opts)
    return "unet, vae decoder"


def cap_recompiles(max_recompiles: int) -> int:
    """After the warm-up: each compiled code object may compile ``max_recompiles`` more shapes than the
    warm-up made; past it dynamo runs that shape eager (its default on hitting the limit)."""
    import torch
    from torch._dynamo.utils import counters
    made = int(counters["stats"].get("unique_graphs", 0))
    limit = max(1, made) + max_recompiles
    torch._dynamo.config.recompile_limit = limit
    return limit
