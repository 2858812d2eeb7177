"""What a training run writes in its working folder: checkpoints (to resume a killed run at its step), the
LoRA in diffusers' layout (``load_lora_weights``) with a kohya-layout copy, and the training record."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LORA_FILE = "twin_lora.safetensors"
KOHYA_FILE = "twin_lora_kohya.safetensors"
RECORD_FILE = "record.json"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = ".train.lock"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(work_dir: Path, state: dict[str, Any]) -> None:
    """``state``: run_id, step, trainable tensors by name, optimiser state, RNG state, losses, seconds."""
    import torch
    _atomic(Path(work_dir) / CHECKPOINT_FILE, lambda p: torch.save(state, p))


def load_checkpoint(work_dir: Path, run_id: str) -> dict[str, Any] | None:
    """The last checkpoint of this run (the same job), or None: another run's is never resumed."""
    import torch
    path = Path(work_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a torn file (it is written by rename, so only from outside): start over
        return None
    return state if state.get("run_id") == run_id else None


def remove_run_files(work_dir: Path, *, keep_result: bool) -> None:
    """Checkpoints (and unless ``keep_result`` the LoRA and the record) of a finished or stopped run."""
    names = [CHECKPOINT_FILE, CHECKPOINT_FILE + ".part"]
    if not keep_result:
        names += [LORA_FILE, KOHYA_FILE, RECORD_FILE]
    for n in names:
        try:
            (Path(work_dir) / n).unlink()
        except FileNotFoundError:
            pass


def save_lora(work_dir: Path, unet_layers: dict, te_layers: dict | None, te2_layers: dict | None) -> dict[str, int]:
    """Write ``twin_lora.safetensors`` (diffusers' SDXL LoRA file: ``unet.`` / ``text_encoder.`` prefixes on
    peft's ``lora_A`` / ``lora_B`` names) and the kohya copy (``lora_unet_…`` keys with alphas). Returns the
    file sizes."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft
    from safetensors.torch import save_file
    work_dir = Path(work_dir)
    tmp_name = LORA_FILE + ".part.safetensors"
    StableDiffusionXLPipeline.save_lora_weights(work_dir, unet_lora_layers=unet_layers,
                                                text_encoder_lora_layers=te_layers,
                                                text_encoder_2_lora_layers=te2_layers,
                                                weight_name=tmp_name, safe_serialization=True)
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(work_dir / tmp_name))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state))
    _atomic(work_dir / KOHYA_FILE, lambda p: save_file({k: v.contiguous() for k, v in kohya.items()}, str(p)))
    os.replace(work_dir / tmp_name, work_dir / LORA_FILE)
    return {"lora_bytes": (work_dir / LORA_FILE).stat().st_size, "kohya_bytes": (work_dir / KOHYA_FILE).stat().st_size}


def write_record(work_dir: Path, record: dict[str, Any]) -> None:
    _atomic(Path(work_dir) / RECORD_FILE, lambda p: p.write_text(json.dumps(record, indent=2, sort_keys=True)))


def read_record(work_dir: Path) -> dict[str, Any] | None:
    path = Path(work_dir) / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
