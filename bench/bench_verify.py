"""How long `python model_loader.py verify` takes on a FULL-SIZE SDXL layout (CPU, no GPU needed).

verify reads headers only, so the tensors' bytes never matter: this writes the real layout with the real
shapes (the same meta-device SDXL that bench_generate builds, the ViT-H encoder, the Plus-Face adapter, a
single-file fine-tune checkpoint, a kohya-format Lightning LoRA and a style LoRA at published ranks,
tokenizers with CLIP's 49408 tokens, a GFPGAN-sized restoration ONNX) as SPARSE safetensors files (a real
header, a hole of the real data size: ~7 GB per checkpoint on the file system, ~0 on disk). The ONNX file
is written for real (340 MB), because ONNX has no header and verify parses the whole protobuf.

    .venv/bin/python bench/bench_verify.py [--dir /tmp/verify-full] [--runs 3]

Prints the layout's apparent size and, per run, the wall time of the `verify` command (a new process:
imports included) and of `model_loader.verify()` alone, plus the verify lines of the last run.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_SIZES = {"F16": 2, "F32": 4}


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple], dtype: str = "F16", extra: dict | None = None) -> int:
    """A valid safetensors file whose data section is a hole: the header lists ``shapes``; ``extra`` maps
    names to small real tensors written as F32 (kohya's scalar alphas). Returns the apparent size."""
    import numpy as np
    header, off, blobs = {}, 0, []
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * _SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    for name, value in (extra or {}).items():
        b = np.asarray(value, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(value)), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    tail = b"".join(blobs)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # the format pads the header to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.seek(8 + len(raw) + off - len(tail))
        f.write(tail)
        f.truncate(8 + len(raw) + off)
    return 8 + len(raw) + off


def clip_tokenizer_files(folder: Path, pad_token: str | None = None) -> int:
    """A byte-level CLIP tokenizer with CLIP's 49408 tokens (512 byte symbols, 48894 merges, 2 specials), in
    the real repo's classic vocab.json + merges.txt form."""
    from transformers import CLIPTokenizer
    from utils.models.tiny import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for a in symbols:
        for b in symbols:
            if len(merges) == 49408 - 2 - 512:
                break
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    kw = {"pad_token": pad_token} if pad_token else {}
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **kw).save_pretrained(str(folder))
    (folder / "tokenizer.json").unlink(missing_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return len(vocab)


def lora_shapes(unet, rank: int, kohya: bool) -> tuple[dict, dict]:
    """LoRA shapes over the UNet's attention and feed-forward projections (what SDXL-Lightning and most
    style LoRAs target): kohya keys with alphas, or diffusers/peft keys."""
    import torch
    shapes, alphas = {}, {}
    wanted = (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".ff.net.0.proj", ".ff.net.2")
    for name, m in unet.named_modules():
        if not isinstance(m, torch.nn.Linear) or not name.endswith(wanted):
            continue
        out_f, in_f = m.weight.shape
        if kohya:
            stem = "lora_unet_" + name.replace(".", "_")
            shapes[f"{stem}.lora_down.weight"] = (rank, in_f)
            shapes[f"{stem}.lora_up.weight"] = (out_f, rank)
            alphas[f"{stem}.alpha"] = float(rank)
        else:
            shapes[f"unet.{name}.lora_A.weight"] = (rank, in_f)
            shapes[f"unet.{name}.lora_B.weight"] = (out_f, rank)
    return shapes, alphas


def restore_onnx(path: Path, mb: int = 340) -> None:
    """GFPGAN 1.4's I/O (input [1,3,512,512] -> output) with ~340 MB of initialisers, as the export has."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 512, 512])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 512, 512])
    w = numpy_helper.from_array(np.zeros(mb * 1024 * 1024 // 4, dtype=np.float32), "blob")
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "gfpgan_sized", [x], [y], [w])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))


def write_layout(root: Path, size: str = "full", restore_mb: int = 340) -> float:
    """The layout under ``root`` (TWIN_MODEL_DIR), SDXL ``size`` (bench_generate.SIZES; tests use "small").
    Returns the apparent size in GB."""
    from bench_generate import SIZES, build_random_parts
    from model_loader import (ADAPTER_FILES, BASE_DIR, CHECKPOINT_DIR, ENCODER_SUB, LIGHTNING_DIR, RESTORE_DIR,
                              adapter_tensors, to_single_file)
    from types import SimpleNamespace
    parts, _ = build_random_parts(None, "meta", "plus-face", size, meta_only=True)
    base = root / BASE_DIR
    total = 0
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = parts[sub]
        (base / sub).mkdir(parents=True, exist_ok=True)
        if sub in ("unet", "vae"):
            m.save_config(str(base / sub))
            name = "diffusion_pytorch_model.fp16.safetensors"
        else:
            m.config.save_pretrained(str(base / sub))
            name = "model.fp16.safetensors"
        total += write_sparse_safetensors(base / sub / name, {k: tuple(v.shape) for k, v in m.state_dict().items()})
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (base / "scheduler").mkdir(exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    clip_tokenizer_files(base / "tokenizer")
    clip_tokenizer_files(base / "tokenizer_2", pad_token="!")
    repo, sub, weight, _ = ADAPTER_FILES["plus-face"]
    enc = root / repo / ENCODER_SUB
    enc.mkdir(parents=True, exist_ok=True)
    parts["image_encoder"].config.save_pretrained(str(enc))
    total += write_sparse_safetensors(enc / "model.safetensors",
                                      {k: tuple(v.shape) for k, v in parts["image_encoder"].state_dict().items()})
    ad = adapter_tensors(parts["unet"], "plus-face", None, img_hidden=SIZES[size]["vit"]["hidden_size"],
                         img_proj=SIZES[size]["vit"]["projection_dim"], meta=True)   # the published Resampler width (1280),
    # which verify expects on the sdxl profile, whatever the size
    total += write_sparse_safetensors(root / repo / sub / weight, {k: tuple(v.shape) for k, v in ad.items()})
    ck = to_single_file(SimpleNamespace(**{k: parts[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2")}))
    total += write_sparse_safetensors(root / CHECKPOINT_DIR / "sdxl-random-alt.safetensors",
                                      {k: tuple(v.shape) for k, v in ck.items()})
    shapes, alphas = lora_shapes(parts["unet"], 64, kohya=True)
    total += write_sparse_safetensors(root / LIGHTNING_DIR / "sdxl_lightning_4step_lora.safetensors", shapes, extra=alphas)
    shapes, _ = lora_shapes(parts["unet"], 32, kohya=False)
    total += write_sparse_safetensors(root / "loras" / "style.safetensors", shapes)
    restore_onnx(root / RESTORE_DIR / "gfpgan_1.4.onnx", restore_mb)
    total += (root / RESTORE_DIR / "gfpgan_1.4.onnx").stat().st_size
    return total / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="model_dir to write (default a new temporary folder)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="verify-full-"))
    t0 = time.perf_counter()
    gb = write_layout(root)
    print(f"full-size layout in {root}: {gb:.2f} GB apparent, written in {time.perf_counter() - t0:.1f} s")
    env = {**os.environ, "TWIN_MODEL_PROFILE": "sdxl", "TWIN_MODEL_DIR": str(root),
           "TWIN_DATA_DIR": str(root / "data"), "TWIN_IP_ADAPTER_VARIANT": "plus-face"}
    for i in range(args.runs):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "model_loader.py"), "verify"], env=env, capture_output=True,
                              text=True, cwd=REPO)
        print(f"run {i + 1}: `model_loader.py verify` {time.perf_counter() - t0:.2f} s (exit {proc.returncode})")
    from utils.config import Settings
    import model_loader as ml
    s = Settings(data_dir=root / "data", model_dir=root, model_profile="sdxl", ip_adapter_variant="plus-face")
    ml.verify(s)   # imports, once
    t0 = time.perf_counter()
    checks = ml.verify(s)
    print(f"model_loader.verify() after imports: {time.perf_counter() - t0:.2f} s, {len(checks)} lines")
    print(proc.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
