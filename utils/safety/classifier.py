"""The output safety classifier: the probability that a generated image is sexually explicit.

Choice: ``Falconsai/nsfw_image_detection``, a ViT-B/16 image classifier (transformers
``ViTForImageClassification``, 86 M parameters, one 343 MB float32 safetensors file, labels
``normal`` / ``nsfw``, Apache-2.0). Why not diffusers' CLIP safety checker
(``CompVis/stable-diffusion-safety-checker``): that one is a 1.2 GB CLIP ViT-L/14 that compares image
embeddings with fixed concept embeddings and hard thresholds and answers yes/no, with no usable score to
tune or log, and it ships no licence of its own; the ViT gives a calibrated two-class probability, runs
in ~0.2 s per image on two CPU cores (docs/SAFETY.md) and loads with the same transformers code as the
rest of the project.

- ``SafetyClassifier``: the contract (``name``, ``score(images) -> list[float]``); test doubles obey it.
- ``ViTSafetyClassifier(folder).load()``: from a local folder (config.json, model.safetensors,
  preprocessor_config.json); ``find_classifier`` looks there and then in the Hugging Face cache
  (never downloads). The score is the summed probability of the explicit labels (``UNSAFE_LABELS``).
- ``DOWNLOAD``: what ``model_loader.py download`` fetches; ``verify_classifier(folder)``: a header-only
  check of the three files against the config (the model CLI's preflight); ``write_standin(folder)``: a
  tiny random-initialised ViT in the real layout (the tiny profile and tests), biased to "normal".
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from PIL import Image

from utils.errors import ModelWeightsMissing

log = logging.getLogger(__name__)

REPO_ID = "Falconsai/nsfw_image_detection"
LOCAL_NAME = "nsfw_image_detection"
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
LICENCE = "Apache-2.0"
#: Labels whose probabilities add up to the score (other NSFW classifiers with the same layout use some of
#: these: porn / hentai besides neutral / drawings / sexy).
UNSAFE_LABELS = ("nsfw", "porn", "hentai", "explicit", "sexual")
STANDIN_NAME = "nsfw-classifier-standin"

#: The real preprocessor_config.json (ViTImageProcessor: 224², bilinear, [-1, 1]); the stand-in uses it too.
PREPROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
                "rescale_factor": 1 / 255, "size": {"height": 224, "width": 224}}
#: The real config.json's architecture (what ``full_size_config`` builds for timing).
REAL_ARCH = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY_ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@dataclass(frozen=True)
class DownloadSpec:
    repo_id: str
    files: tuple[str, ...]
    local_name: str
    licence: str
    purpose: str


DOWNLOAD = DownloadSpec(REPO_ID, FILES, LOCAL_NAME, LICENCE, "NSFW image classifier for the output safety check")


@runtime_checkable
class SafetyClassifier(Protocol):
    name: str

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        """One probability of explicit content (0-1) per image, in order."""
        ...


# --------------------------------------------------------------------------------------------------
# Loading and scoring
def find_classifier(folder: Path, repo_id: str = REPO_ID, *, cache_dir: Path | None = None) -> Path | None:
    """``folder`` when it holds the three files, else the Hugging Face cache's snapshot of ``repo_id``
    (``cache_dir``: the default cache; local_files_only, so nothing is ever fetched), else None."""
    folder = Path(folder)
    if all((folder / f).is_file() for f in FILES):
        return folder
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(repo_id, allow_patterns=list(FILES), local_files_only=True,
                                        cache_dir=None if cache_dir is None else str(cache_dir)))
    except Exception:  # not cached, or the hub library refuses offline: both mean "not here"
        return None
    return cached if all((cached / f).is_file() for f in FILES) else None


class ViTSafetyClassifier:
    """A transformers image classifier scoring explicit content. ``load()`` once; ``score`` is thread-safe
    (inference only, no state)."""

    def __init__(self, folder: Path, *, name: str | None = None, device: str = "cpu", dtype: Any = None) -> None:
        self.folder = Path(folder)
        self.name = name or self.folder.name
        self.device = device
        self.dtype = dtype
        self._model = None
        self._processor = None
        self._unsafe: list[int] = []

    def load(self) -> "ViTSafetyClassifier":
        import torch
        from transformers import AutoModelForImageClassification, ViTImageProcessorPil

        missing = [f for f in FILES if not (self.folder / f).is_file()]
        if missing:
            raise ModelWeightsMissing(f"safety classifier folder {self.folder} lacks {', '.join(missing)}; "
                                      f"fetch {REPO_ID} with `python model_loader.py download` or set TWIN_SAFETY_MODEL_DIR",
                                      code="safety_model_missing")
        dtype = self.dtype or torch.float32
        model = AutoModelForImageClassification.from_pretrained(str(self.folder), local_files_only=True, dtype=dtype)
        labels = {int(i): str(label).lower() for i, label in model.config.id2label.items()}
        self._unsafe = sorted(i for i, label in labels.items() if label in UNSAFE_LABELS)
        if not self._unsafe:
            raise ModelWeightsMissing(f"safety classifier {self.folder}: labels {sorted(labels.values())} name no "
                                      f"explicit class (expected one of {', '.join(UNSAFE_LABELS)})",
                                      code="safety_model_missing")
        self._model = model.to(self.device).eval()
        self._processor = ViTImageProcessorPil.from_pretrained(str(self.folder))
        log.info("safety classifier %s loaded from %s on %s", self.name, self.folder, self.device)
        return self

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        import torch

        if self._model is None:
            raise RuntimeError("ViTSafetyClassifier.load() was not called")
        if not images:
            return []
        pixels = self._processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            logits = self._model(pixel_values=pixels.to(self.device, self._model.dtype)).logits
        probs = torch.softmax(logits.float(), dim=-1)[:, self._unsafe].sum(dim=-1)
        return [float(p) for p in probs.cpu()]


def load_classifier(folder: Path, repo_id: str = REPO_ID, *, name: str | None = None, device: str = "cpu",
                    dtype: Any = None, cache_dir: Path | None = None) -> ViTSafetyClassifier:
    """The classifier from ``folder`` or the Hugging Face cache; ModelWeightsMissing says where it looked."""
    found = find_classifier(folder, repo_id, cache_dir=cache_dir)
    if found is None:
        raise ModelWeightsMissing(f"safety classifier not found in {folder} nor in the Hugging Face cache of {repo_id}; "
                                  "fetch it with `python model_loader.py download` (or set TWIN_SAFETY_MODEL_DIR), "
                                  "or set TWIN_SAFETY_MODE=off", code="safety_model_missing")
    return ViTSafetyClassifier(found, name=name or repo_id, device=device, dtype=dtype).load()


# --------------------------------------------------------------------------------------------------
# Stand-in and full-size random models (tiny profile, tests, timing)
def vit_config(arch: dict[str, int]) -> Any:
    from transformers import ViTConfig

    return ViTConfig(image_size=224, patch_size=16, num_channels=3, qkv_bias=True, hidden_act="gelu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
                     id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1},
                     problem_type="single_label_classification", architectures=["ViTForImageClassification"],
                     **arch)


def random_model(arch: dict[str, int], *, seed: int = 0, normal_bias: float = 0.0) -> Any:
    """A ViTForImageClassification with random weights (``REAL_ARCH``: the real model's size). A positive
    ``normal_bias`` makes it answer "normal" with confidence on any image."""
    import torch
    from transformers import ViTForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(vit_config(arch)).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([normal_bias, -normal_bias]))
    return model


def write_standin(folder: Path, *, seed: int = 0) -> Path:
    """A tiny classifier in the real layout (the three files; ~40 kB). Its random weights answer "normal"
    (score ~1e-3) so the tiny profile's outputs pass in block mode; tests inject scores through a double."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    random_model(TINY_ARCH, seed=seed, normal_bias=4.0).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------
# Header-only check (the model CLI's preflight)
@dataclass(frozen=True)
class WeightCheck:
    """Same fields and status words as model_loader.FileCheck: ``FileCheck(**asdict(check))``."""
    path: str
    status: str          # ok | missing | corrupt | missing_key | unexpected_key | wrong_shape | wrong_dtype
    detail: str = ""


def verify_classifier(folder: Path) -> list[WeightCheck]:
    """One check per file: present, parsable, and the weights' names / shapes / dtypes equal to what the
    config builds (safetensors header and a meta-device model: nothing is loaded)."""
    folder = Path(folder)
    missing = [WeightCheck(str(folder / f), "missing", f"fetch {REPO_ID} (`python model_loader.py download`)")
               for f in FILES if not (folder / f).is_file()]
    if missing:
        return missing
    checks = [_check_preprocessor(folder / FILES[2])]
    config_check, expected = _check_config(folder)
    checks.insert(0, config_check)
    if expected is not None:
        checks.insert(1, _check_weights(folder / FILES[1], expected))
    return checks


def _check_config(folder: Path) -> tuple[WeightCheck, dict[str, tuple[int, ...]] | None]:
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    rel = str(folder / FILES[0])
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForImageClassification.from_config(config)
    except Exception as e:  # unreadable JSON, unknown model_type: the load would fail the same way
        return WeightCheck(rel, "corrupt", f"{type(e).__name__}: {str(e)[:160]}"), None
    labels = sorted(str(v).lower() for v in config.id2label.values())
    if not set(labels) & set(UNSAFE_LABELS):
        return WeightCheck(rel, "corrupt", f"labels {labels} name no explicit class ({', '.join(UNSAFE_LABELS)})"), None
    return WeightCheck(rel, "ok", f"{config.model_type}, labels {labels}"), _file_layout(model)


def _file_layout(model: Any) -> dict[str, tuple[int, ...]]:
    """{key: shape} as the weight file stores them. transformers 5 renames some modules in memory (ViT's
    ``attention.attention.key`` is ``attention.k_proj``) and renames back when saving; the published
    files keep the saved names."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time renaming stores what it builds
        return {k: tuple(v.shape) for k, v in state.items()}
    return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, state).items()}


def _check_weights(path: Path, expected: dict[str, tuple[int, ...]]) -> WeightCheck:
    from safetensors import safe_open

    rel = str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # truncated or not safetensors
        return WeightCheck(rel, "corrupt", f"{type(e).__name__}: {str(e)[:160]}")
    for key in sorted(expected):
        if key not in got:
            return WeightCheck(rel, "missing_key", f"key {key!r} not in file")
        if got[key][0] != expected[key]:
            return WeightCheck(rel, "wrong_shape", f"key {key!r} has shape {list(got[key][0])}, expected {list(expected[key])}")
    extra = sorted(set(got) - set(expected))
    if extra:
        return WeightCheck(rel, "unexpected_key", f"key {extra[0]!r} is not built by the config ({len(extra)} such keys)")
    bad = sorted(k for k, (_, dt) in got.items() if dt not in ("F16", "BF16", "F32"))
    if bad:
        return WeightCheck(rel, "wrong_dtype", f"key {bad[0]!r} has dtype {got[bad[0]][1]}, expected a float type")
    return WeightCheck(rel, "ok", f"{len(got)} tensors, {'/'.join(sorted({dt for _, dt in got.values()}))}")


def _check_preprocessor(path: Path) -> WeightCheck:
    rel = str(path)
    try:
        data = json.loads(path.read_text())
        size = data["size"]
        side = (int(size["height"]), int(size["width"])) if "height" in size else (int(size["shortest_edge"]),) * 2
        ok = len(data["image_mean"]) == 3 and len(data["image_std"]) == 3 and min(side) > 0
    except (OSError, ValueError, KeyError, TypeError) as e:
        return WeightCheck(rel, "corrupt", f"{type(e).__name__}: {str(e)[:160]}")
    if not ok:
        return WeightCheck(rel, "corrupt", "image_mean and image_std must have 3 values each")
    return WeightCheck(rel, "ok", f"{side[0]}x{side[1]}, mean {data['image_mean']}, std {data['image_std']}")
