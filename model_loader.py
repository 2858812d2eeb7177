"""Model profiles: where the SDXL + IP-Adapter weights come from and how they are loaded.

Profiles (``settings.model_profile``):

* ``sdxl``  real SDXL base 1.0 + IP-Adapter weights from ``settings.model_dir`` or the Hugging Face cache.
* ``tiny``  a deterministic, randomly initialised miniature of the same model family, written to a folder
  with the same layout as the real repos and loaded through the very same ``from_pretrained`` /
  ``load_ip_adapter`` / ``load_lora_weights`` calls. Outputs are noise-like pictures, not portraits.
* ``auto``  ``sdxl`` when its weights are present, else ``tiny`` with a loud warning.

Commands::

    python model_loader.py download [--dir models] [--faceid] [--no-lightning]  # on a connected machine
    python model_loader.py download --instantid | --faceid-plusv2              # only that variant's files
    python model_loader.py download --restore gfpgan [--restore codeformer]    # face restoration ONNX only
    python model_loader.py make-tiny DIR                                       # offline, ~2 s, ~20 MB
    python model_loader.py check                                               # which profile would load
    python model_loader.py verify                                              # preflight of every weight file
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.config import Settings
from utils.errors import ModelWeightsMissing

log = logging.getLogger("twin.models")

# Folder names inside settings.model_dir (and inside the tiny folder): they mirror the hub repos' names,
# so `download` writes exactly what `resolve` looks for.
BASE_DIR = "stable-diffusion-xl-base-1.0"
IPA_DIR = "IP-Adapter"
FACEID_DIR = "IP-Adapter-FaceID"
LIGHTNING_DIR = "SDXL-Lightning"
LORA_DIR = "loras"
INSTANTID_DIR = "InstantID"
CONTROLNET_SUB = "ControlNetModel"          # InstantID's IdentityNet, a ControlNet, inside INSTANTID_DIR
ENCODER_SUB = "models/image_encoder"        # the ViT-H image encoder inside IPA_DIR
ANTELOPE_DIR = "insightface/antelopev2"     # InsightFace pack InstantID was trained with (inside model_dir)

# Per adapter variant: (repo folder, subfolder, weight file, image encoder folder relative to the repo).
ADAPTER_FILES: dict[str, tuple[str, str, str, str | None]] = {
    "plus-face": (IPA_DIR, "sdxl_models", "ip-adapter-plus-face_sdxl_vit-h.safetensors", "models/image_encoder"),
    "plain": (IPA_DIR, "sdxl_models", "ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder"),
    "faceid": (FACEID_DIR, "", "ip-adapter-faceid_sdxl.bin", None),
    # FaceID Plus v2 also needs the ViT-H encoder, which lives in the other repo (IPA_DIR/ENCODER_SUB):
    # it is registered on the pipeline before load_ip_adapter (see ipadapter_manager).
    "faceid-plusv2": (FACEID_DIR, "", "ip-adapter-faceid-plusv2_sdxl.bin", None),
    # InstantID: a Resampler image_proj over the 512-d ArcFace vector; no CLIP encoder.
    "instantid": (INSTANTID_DIR, "", "ip-adapter.bin", None),
}
# Variants that need 512-d ArcFace embeddings (the InsightFace face backend).
ARCFACE_VARIANTS = ("faceid", "faceid-plusv2", "instantid")
INSTANTID_FILES = [f"{CONTROLNET_SUB}/config.json", f"{CONTROLNET_SUB}/diffusion_pytorch_model.safetensors",
                   ADAPTER_FILES["instantid"][2]]
TINY_FACEID_WEIGHT = "ip-adapter-faceid_sdxl.safetensors"  # the tiny one is safetensors (same loader branch)
LIGHTNING_WEIGHT_TINY = "tiny_lightning_4step_lora.safetensors"

BASE_FILES_FP16 = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*", "tokenizer_2/*",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
]


@dataclass(frozen=True)
class RepoSpec:
    """One hub repository the sdxl profile needs: what to fetch and which files must exist locally."""
    repo_id: str
    local_name: str
    allow_patterns: list[str]
    required: list[str]          # files (relative) that must exist for the profile to load
    optional: bool = False
    purpose: str = ""


def wanted_variants(settings: Settings, *, faceid: bool | None = None, instantid: bool = False,
                    faceid_plusv2: bool = False) -> set[str]:
    """Variants whose files to fetch/look for: the configured one, plus the ones asked for. ``--instantid`` /
    ``--faceid-plusv2`` alone select only that variant (plus the base model), so nothing else is fetched."""
    only = {v for v, on in (("instantid", instantid), ("faceid-plusv2", faceid_plusv2)) if on}
    out = set(only) if only else {settings.ip_adapter_variant}
    if faceid or (faceid is None and settings.ip_adapter_variant == "faceid"):
        out.add("faceid")
    return out


def repo_specs(settings: Settings, *, faceid: bool | None = None, lightning: bool = True,
               instantid: bool = False, faceid_plusv2: bool = False) -> list[RepoSpec]:
    """Everything the sdxl profile may use. ``faceid`` defaults to whether that variant is selected."""
    variants = wanted_variants(settings, faceid=faceid, instantid=instantid, faceid_plusv2=faceid_plusv2)
    selected = settings.ip_adapter_variant
    enc = [f"{ENCODER_SUB}/config.json", f"{ENCODER_SUB}/model.safetensors"]
    base_required = [p for p in BASE_FILES_FP16 if "*" not in p] + ["tokenizer/vocab.json", "tokenizer_2/vocab.json"]
    specs = [RepoSpec(settings.sdxl_model_id, BASE_DIR, list(BASE_FILES_FP16), base_required,
                      purpose="SDXL base 1.0 (fp16 variant)")]
    ipa_files = []
    if variants & {"plus-face", "plain"}:
        ipa_files += [f"sdxl_models/{ADAPTER_FILES[v][2]}" for v in ("plus-face", "plain")]
    if variants & {"plus-face", "plain", "faceid-plusv2"}:
        ipa_files += enc
    if ipa_files:
        if selected in ("plus-face", "plain"):
            required = [f"sdxl_models/{ADAPTER_FILES[selected][2]}"] + enc
        else:
            required = enc if selected == "faceid-plusv2" else []
        specs.append(RepoSpec(settings.ip_adapter_repo, IPA_DIR, ipa_files, required,
                              optional=not required,
                              purpose="IP-Adapter Plus-Face / plain SDXL + ViT-H image encoder"))
    faceid_files = [ADAPTER_FILES[v][2] for v in ("faceid", "faceid-plusv2") if v in variants]
    if faceid_files:
        required = [ADAPTER_FILES[selected][2]] if selected in ("faceid", "faceid-plusv2") else []
        specs.append(RepoSpec(settings.faceid_repo, FACEID_DIR, faceid_files, required or faceid_files,
                              optional=not required,
                              purpose="IP-Adapter FaceID / FaceID Plus v2 SDXL (non-commercial licence)"))
    if "instantid" in variants:
        specs.append(RepoSpec(settings.instantid_repo, INSTANTID_DIR, list(INSTANTID_FILES), list(INSTANTID_FILES),
                              optional=selected != "instantid",
                              purpose="InstantID IdentityNet + adapter (weights: research use only)"))
    if lightning:
        specs.append(RepoSpec(settings.lightning_repo, LIGHTNING_DIR, [settings.lightning_weight],
                              [settings.lightning_weight], optional=True, purpose="SDXL-Lightning few-step LoRA"))
    return specs


def download_flag(variant: str) -> str:
    return {"faceid": " --faceid", "faceid-plusv2": " --faceid-plusv2", "instantid": " --instantid"}.get(variant, "")


def download(settings: Settings, *, faceid: bool = False, lightning: bool = True, instantid: bool = False,
             faceid_plusv2: bool = False, snapshot_download=None) -> list[Path]:
    """Fetch exactly what the sdxl profile needs into ``settings.model_dir`` (fp16 weight files only)."""
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    out = []
    for spec in repo_specs(settings, faceid=faceid, lightning=lightning, instantid=instantid,
                           faceid_plusv2=faceid_plusv2):
        target = Path(settings.model_dir) / spec.local_name
        log.info("downloading %s (%s) -> %s", spec.repo_id, spec.purpose, target)
        snapshot_download(repo_id=spec.repo_id, allow_patterns=spec.allow_patterns, local_dir=str(target))
        out.append(target)
    return out


RESTORE_DIR = "face_restore"   # settings.resolved_restore_dir; the tiny folder holds stand-ins under the same name


def download_restore(settings: Settings, names: list[str], hf_hub_download=None) -> list[Path]:
    """Fetch face restoration models (FaceFusion's ONNX exports, Hugging Face ``facefusion/models-3.0.0``:
    gfpgan_1.4.onnx, codeformer.onnx, gpen_bfr_512.onnx) into TWIN_RESTORE_MODEL_DIR (default
    <model_dir>/face_restore). Inputs ``input`` [1,3,512,512] float32 in [-1, 1] RGB (+ CodeFormer's
    ``weight`` double [1]); the first output is the restored face. Licences: GFPGAN Apache-2.0;
    CodeFormer S-Lab 1.0 and GPEN non-commercial."""
    from utils.faces.restore import RESTORE_MODELS, RESTORE_REPO
    if hf_hub_download is None:
        from huggingface_hub import hf_hub_download
    target = settings.resolved_restore_dir
    out = []
    for name in names:
        spec = RESTORE_MODELS[name]
        log.info("downloading %s/%s (%s, licence %s) -> %s", RESTORE_REPO, spec.filename, name, spec.licence, target)
        out.append(Path(hf_hub_download(repo_id=RESTORE_REPO, filename=spec.filename, local_dir=str(target))))
    return out


def _find_repo(spec: RepoSpec, settings: Settings) -> tuple[Path | None, list[str]]:
    """Local folder holding all of spec.required, or None, plus the places that were searched."""
    looked = []
    local = Path(settings.model_dir) / spec.local_name
    looked.append(str(local))
    if all((local / r).is_file() for r in spec.required):
        return local, looked
    looked.append(f"Hugging Face cache ({spec.repo_id})")
    try:
        from huggingface_hub import snapshot_download
        cached = Path(snapshot_download(spec.repo_id, allow_patterns=spec.allow_patterns, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or hub offline: both mean "not here"
        return None, looked
    if all((cached / r).is_file() for r in spec.required):
        return cached, looked
    return None, looked


@dataclass
class ResolvedWeights:
    base: Path
    adapter_repo: Path | None
    lightning: Path | None
    lora_dir: Path | None
    missing_optional: list[str] = field(default_factory=list)
    encoder_repo: Path | None = None     # IPA_DIR (ViT-H encoder) when the adapter lives in another repo


def resolve_sdxl(settings: Settings) -> ResolvedWeights:
    """Find the real weights or raise ModelWeightsMissing naming what, where, and the command."""
    found: dict[str, Path | None] = {}
    missing = []
    optional_missing = []
    for spec in repo_specs(settings):
        path, looked = _find_repo(spec, settings)
        found[spec.local_name] = path
        if path is None:
            if spec.optional:
                optional_missing.append(spec.repo_id)
            else:
                missing.append(f"{spec.repo_id} [{spec.purpose}: {', '.join(spec.required)}] looked in: {'; '.join(looked)}")
    if missing:
        flag = download_flag(settings.ip_adapter_variant)
        raise ModelWeightsMissing(
            "real model weights are missing: " + " | ".join(missing)
            + f". Download them on a connected machine with: python model_loader.py download --dir {settings.model_dir}{flag}"
            + " (or set TWIN_MODEL_PROFILE=tiny for the offline demo model)",
            details={"missing": [m.split(" ")[0] for m in missing]})
    adapter_name = ADAPTER_FILES[settings.ip_adapter_variant][0]
    lora_dir = settings.resolved_lora_dir
    return ResolvedWeights(base=found[BASE_DIR], adapter_repo=found.get(adapter_name),
                           lightning=found.get(LIGHTNING_DIR), lora_dir=lora_dir if lora_dir.is_dir() else None,
                           missing_optional=optional_missing, encoder_repo=found.get(IPA_DIR))


def sdxl_weights_present(settings: Settings) -> bool:
    try:
        resolve_sdxl(settings)
        return True
    except ModelWeightsMissing:
        return False


def choose_profile(settings: Settings) -> str:
    if settings.model_profile != "auto":
        return settings.model_profile
    if sdxl_weights_present(settings):
        return "sdxl"
    log.warning("=" * 70 + "\nNO REAL MODEL WEIGHTS FOUND in %s or the Hugging Face cache: using the TINY DEMO "
                "model. Its outputs are NOT portraits. Run `python model_loader.py download` for real weights.\n"
                + "=" * 70, settings.model_dir)
    return "tiny"


def choose_device_dtype(settings: Settings):
    import torch
    if settings.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = settings.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelWeightsMissing(f"TWIN_DEVICE={settings.device!r} but no CUDA device is available")
    if settings.dtype != "auto":
        dtype = getattr(torch, settings.dtype)
    elif device.startswith("cuda"):
        dtype = torch.float16
    else:
        dtype = torch.float32  # fp16 matmuls on CPU are slow or unsupported
    if device == "cpu" and dtype == torch.float16:
        raise ModelWeightsMissing("TWIN_DTYPE=float16 is not supported on the CPU; use float32 or bfloat16")
    return device, dtype


def dpmpp_karras(config):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=True)


def few_step_scheduler(config):
    # SDXL-Lightning was distilled with Euler and "trailing" timestep spacing; other schedulers drift.
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")


# ---------------------------------------------------------------------------------------------------
# Loaded model bundle
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoadedModels:
    pipe: Any
    profile: str
    model_name: str
    native_resolution: int
    device: str
    dtype: Any
    adapter_repo: Path | None            # folder holding ADAPTER_FILES layout for the selected variant
    adapter_variant: str
    lightning_adapter: str | None        # peft adapter name of the few-step LoRA, when loaded
    loras: dict[str, str]                # style LoRA name -> peft adapter name
    base_scheduler_config: dict
    notes: list[str] = field(default_factory=list)
    encoder_repo: Path | None = None     # IPA_DIR, for the ViT-H encoder of faceid-plusv2
    # What a session identity is bound to: the base model family. A single-file fine-tune of the same base
    # (same shapes, same image encoder and adapter files) takes the same identities, so a base-model switch
    # does not invalidate every uploaded session.
    identity_model: str = ""


def _load_loras(pipe, lora_dir: Path | None) -> dict[str, str]:
    loras = {}
    if lora_dir is None or not lora_dir.is_dir():
        return loras
    for f in sorted(lora_dir.glob("*.safetensors")):
        name = f.stem
        pipe.load_lora_weights(str(lora_dir), weight_name=f.name, adapter_name=f"style_{name}")
        loras[name] = f"style_{name}"
    return loras


@contextlib.contextmanager
def quiet_libraries():
    """diffusers/transformers print progress bars and benign LoRA-prefix warnings on every load."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    old = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # peft warns on every second LoRA loaded into the same UNet; several adapters is the design here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
            yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def load_models(settings: Settings, checkpoint: Path | None = None) -> LoadedModels:
    """Load the pipeline for the chosen profile, with its IP-Adapter variant, LoRAs and scheduler.
    ``checkpoint``: a single-file SDXL ``.safetensors`` (see ``list_checkpoints``) in place of the diffusers
    base folder's weights; the folder still gives the configs and tokenizers (offline, no hub)."""
    with quiet_libraries():
        return _load_models(settings, checkpoint)


def checkpoint_dir(settings: Settings) -> Path:
    """Where single-file base checkpoints live: <tiny>/checkpoints on the tiny profile, else <model_dir>/checkpoints."""
    if choose_profile(settings) == "tiny":
        return settings.resolved_tiny_model_dir / CHECKPOINT_DIR
    return settings.model_dir / CHECKPOINT_DIR


def base_model_name(settings: Settings) -> str:
    return "tiny-sdxl" if choose_profile(settings) == "tiny" else settings.sdxl_model_id


def list_checkpoints(settings: Settings) -> dict[str, Path | None]:
    """Base models available locally: name -> single-file path (None: the diffusers base folder itself)."""
    out: dict[str, Path | None] = {base_model_name(settings): None}
    folder = checkpoint_dir(settings)
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")):
            out.setdefault(f.stem, f)
    return out


def _load_models(settings: Settings, checkpoint: Path | None = None) -> LoadedModels:
    import torch
    from diffusers import StableDiffusionXLPipeline

    profile = choose_profile(settings)
    device, dtype = choose_device_dtype(settings)
    notes: list[str] = []
    if profile == "tiny":
        root = settings.resolved_tiny_model_dir
        if not tiny_is_current(root):
            log.warning("building the tiny demo model in %s (outputs are NOT portraits)", root)
            make_tiny(root)
        if device == "cpu":
            # The tiny model's matmuls are too small to gain from threads; one thread is faster and
            # leaves the other cores to the web server.
            torch.set_num_threads(1)
        base = root / BASE_DIR
        adapter_repo = root / ADAPTER_FILES[settings.ip_adapter_variant][0]
        encoder_repo = root / IPA_DIR
        lightning = root / LIGHTNING_DIR
        lightning_weight = LIGHTNING_WEIGHT_TINY
        lora_dir = root / LORA_DIR
        model_name = "tiny-sdxl"
        native = TINY_RESOLUTION
        variant = None
        log.warning("TINY DEMO MODEL loaded from %s: outputs are NOT portraits", root)
    else:
        w = resolve_sdxl(settings)
        base, adapter_repo, lightning, lora_dir = w.base, w.adapter_repo, w.lightning, w.lora_dir
        encoder_repo = w.encoder_repo
        lightning_weight = settings.lightning_weight
        model_name = settings.sdxl_model_id
        native = 1024
        variant = "fp16"
        if w.missing_optional:
            notes.append("optional weights not present: " + ", ".join(w.missing_optional))

    if settings.ip_adapter_variant == "instantid":
        # InstantID: the same SDXL components in the ControlNet pipeline, with the IdentityNet (a ControlNet
        # that reads the identity tokens instead of the text, see instantid.py) as its controlnet.
        from diffusers import StableDiffusionXLControlNetPipeline
        from instantid import IdentityNet
        net_dir = adapter_repo / CONTROLNET_SUB if adapter_repo is not None else None
        if net_dir is None or not (net_dir / "config.json").is_file():
            raise ModelWeightsMissing(f"InstantID IdentityNet not found in {net_dir}; run: python model_loader.py "
                                      f"download --instantid --dir {settings.model_dir}")
        controlnet = IdentityNet.from_pretrained(str(net_dir), dtype=dtype, local_files_only=True,
                                                 use_safetensors=True)
        if checkpoint is not None:
            pipe = StableDiffusionXLControlNetPipeline.from_single_file(
                str(checkpoint), config=str(base), controlnet=controlnet, torch_dtype=dtype, local_files_only=True)
        else:
            pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
                str(base), controlnet=controlnet, dtype=dtype, variant=variant, local_files_only=True,
                use_safetensors=True)
    elif checkpoint is not None:
        # A fine-tune shipped as one file (RealVisXL, Juggernaut XL): the local base folder is the config,
        # so nothing is fetched from the hub.
        pipe = StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(base), torch_dtype=dtype,
                                                          local_files_only=True)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(base), dtype=dtype, variant=variant,
                                                         local_files_only=True, use_safetensors=True)
    identity_model = model_name
    if checkpoint is not None:
        model_name = Path(checkpoint).stem
    base_config = dict(pipe.scheduler.config)
    pipe.scheduler = dpmpp_karras(base_config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    lightning_adapter = None
    if lightning is not None and (lightning / lightning_weight).is_file():
        pipe.load_lora_weights(str(lightning), weight_name=lightning_weight, adapter_name="lightning")
        lightning_adapter = "lightning"
    loras = _load_loras(pipe, lora_dir)

    models = LoadedModels(pipe=pipe, profile=profile, model_name=model_name, native_resolution=native,
                          device=device, dtype=dtype, adapter_repo=adapter_repo,
                          adapter_variant=settings.ip_adapter_variant, lightning_adapter=lightning_adapter,
                          loras=loras, base_scheduler_config=base_config, notes=notes,
                          encoder_repo=encoder_repo, identity_model=identity_model)
    if device.startswith("cuda"):
        # Must run before the IP-Adapter is loaded (see fuse_qkv below).
        notes += apply_cuda_optimisations(pipe, settings, has_lora=bool(loras or lightning_adapter))
    return models


def apply_cuda_optimisations(pipe, settings: Settings, *, has_lora: bool = False) -> list[str]:
    """Opt-in speed switches; SDPA attention is diffusers' default with torch 2 and needs nothing.
    Returns notes for info() about switches that were asked for but not applied."""
    import torch
    notes = []
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.fuse_qkv:
        # fuse_qkv_projections() installs FusedAttnProcessor2_0 everywhere: done after load_ip_adapter it would
        # drop the IP-Adapter processors (so it runs before), and its fused to_qkv bypasses peft LoRA layers
        # on to_q/to_k/to_v (so it is skipped when any LoRA, including FaceID's, is in use).
        if has_lora or settings.ip_adapter_variant in ("faceid", "faceid-plusv2"):
            notes.append("fuse_qkv skipped: LoRA adapters are loaded and fused projections would bypass them")
            log.warning(notes[-1])
        else:
            pipe.fuse_qkv_projections()
    if settings.torch_compile:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return notes


# ---------------------------------------------------------------------------------------------------
# Tiny profile
# ---------------------------------------------------------------------------------------------------
TINY_RESOLUTION = 128      # native side in pixels; latents are 16x16
TINY_VERSION = 3           # bump when make_tiny writes new files: an older folder is rebuilt on start
TINY_SEED = 20261122
TINY_TE1, TINY_TE2, TINY_PROJ = 32, 64, 32
TINY_CROSS = TINY_TE1 + TINY_TE2
TINY_BLOCKS = (32, 64)
TINY_IMG_HIDDEN, TINY_IMG_PROJ, TINY_IMG_SIZE = 32, 32, 32
TINY_PLUS_TOKENS, TINY_PLUS_DIM = 16, 64


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_TINY_VOCAB: list = [{}, []]


def _tiny_tokenizer(pad_token: str | None = None):
    from transformers import CLIPTokenizer
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = []
    for word in ("portrait", "photo", "person", "light"):
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    kw = {"pad_token": pad_token} if pad_token else {}
    _TINY_VOCAB[:] = [vocab, merges]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **kw), len(vocab)


def write_classic_tokenizers(base: Path) -> None:
    """After ``save_pretrained`` of a pipeline holding ``_tiny_tokenizer``s: the real repo ships the classic
    vocab.json + merges.txt (no tokenizer.json), so the saved folder is loaded the same way."""
    for sub in ("tokenizer", "tokenizer_2"):
        folder = Path(base) / sub
        (folder / "tokenizer.json").unlink(missing_ok=True)
        (folder / "vocab.json").write_text(json.dumps(_TINY_VOCAB[0], ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_VOCAB[1]),
                                           encoding="utf-8")


def _tiny_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, block_out_channels=TINY_BLOCKS,
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TINY_PROJ,
        norm_num_groups=16, cross_attention_dim=TINY_CROSS)


def _tiny_lora_file(path: Path, seed: int, scale: float) -> None:
    """A LoRA over the tiny UNet's attention projections, saved in diffusers' own LoRA format."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(seed)
    unet = _tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.mul_(scale)
    sd = get_peft_model_state_dict(unet)
    StableDiffusionXLPipeline.save_lora_weights(str(path.parent), unet_lora_layers=sd, weight_name=path.name)


def _cross_attn_hidden_sizes(unet) -> list[tuple[int, str, int | None]]:
    """(index in attn_processors, name, hidden size) per processor, as diffusers' IP-Adapter loader walks them."""
    out = []
    cfg = unet.config
    for idx, name in enumerate(unet.attn_processors.keys()):
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        out.append((idx, name, hidden))
    return out


def _tiny_adapter_tensors(unet, variant: str, gen) -> dict[str, Any]:
    # faceid_mult=1 keeps the tiny folder small (the loader reads the multiplier from the shapes); Plus v2's
    # projection is built with a fixed multiplier of 2 by diffusers, so its file keeps the real one.
    return adapter_tensors(unet, variant, gen, img_hidden=TINY_IMG_HIDDEN, img_proj=TINY_IMG_PROJ,
                           plus_tokens=TINY_PLUS_TOKENS, plus_dim=TINY_PLUS_DIM, faceid_mult=1)


# InstantID's Resampler (from its ip-adapter.bin): 16 queries of width 1280 (20 heads x 64) over the 512-d
# ArcFace vector. The tiny one keeps 16 queries and input 512; its width is TINY_PLUS_DIM.
INSTANTID_TOKENS, INSTANTID_DIM, ARCFACE_DIM = 16, 1280, 512
VIT_H_HIDDEN, VIT_H_PROJ = 1280, 1024


def adapter_tensors(unet, variant: str, gen, *, img_hidden: int, img_proj: int, plus_tokens: int = 16,
                    plus_dim: int = 1280, dtype=None, meta: bool = False, faceid_mult: int = 2) -> dict[str, Any]:
    """Random IP-Adapter weights in the original repos' key layout (image_proj.* / ip_adapter.*), shaped
    for ``unet`` and an image encoder of the given widths (also used by the full-size benchmark, and with
    ``meta=True`` by ``verify`` as the list of names and shapes the code will build)."""
    import torch

    def rnd(*shape, std=0.02):
        if meta:
            return torch.empty(*shape, device="meta")
        return (torch.randn(*shape, generator=gen) * std).to(dtype or torch.float32)

    def zeros(*shape):
        return torch.empty(*shape, device="meta") if meta else torch.zeros(*shape)

    def ones(*shape):
        return torch.empty(*shape, device="meta") if meta else torch.ones(*shape)

    def resampler(prefix: str, D: int, n_in: int, n_out: int, inner: int, latents: int | None) -> None:
        # IP-Adapter's Resampler / FacePerceiverResampler: 4 layers of (PerceiverAttention, FeedForward).
        if latents:
            t[f"{prefix}latents"] = rnd(1, latents, D, std=1.0) / D ** 0.5
        t[f"{prefix}proj_in.weight"] = rnd(D, n_in, std=0.2)
        t[f"{prefix}proj_in.bias"] = zeros(D)
        t[f"{prefix}proj_out.weight"] = rnd(n_out, D, std=0.2)
        t[f"{prefix}proj_out.bias"] = zeros(n_out)
        t[f"{prefix}norm_out.weight"] = ones(n_out)
        t[f"{prefix}norm_out.bias"] = zeros(n_out)
        for i in range(4):
            p = f"{prefix}layers.{i}"
            for n in ("0.norm1", "0.norm2", "1.0"):
                t[f"{p}.{n}.weight"] = ones(D)
                t[f"{p}.{n}.bias"] = zeros(D)
            t[f"{p}.0.to_q.weight"] = rnd(inner, D, std=0.1)
            t[f"{p}.0.to_kv.weight"] = rnd(2 * inner, D, std=0.1)
            t[f"{p}.0.to_out.weight"] = rnd(D, inner, std=0.1)
            t[f"{p}.1.1.weight"] = rnd(4 * D, D, std=0.1)
            t[f"{p}.1.3.weight"] = rnd(D, 4 * D, std=0.1)

    def faceid_proj(mult: int = 2) -> None:
        t["image_proj.proj.0.weight"] = rnd(mult * ARCFACE_DIM, ARCFACE_DIM, std=0.05)
        t["image_proj.proj.0.bias"] = zeros(mult * ARCFACE_DIM)
        t["image_proj.proj.2.weight"] = rnd(4 * C, mult * ARCFACE_DIM, std=0.05)
        t["image_proj.proj.2.bias"] = zeros(4 * C)
        t["image_proj.norm.weight"] = ones(C)
        t["image_proj.norm.bias"] = zeros(C)

    C = unet.config.cross_attention_dim
    t: dict[str, Any] = {}
    if variant == "plain":
        t["image_proj.proj.weight"] = rnd(4 * C, img_proj, std=0.2)
        t["image_proj.proj.bias"] = zeros(4 * C)
        t["image_proj.norm.weight"] = ones(C)
        t["image_proj.norm.bias"] = zeros(C)
    elif variant in ("plus-face", "instantid"):
        # The Resampler's head width is fixed at 64, so heads = D // 64 and the inner width is D.
        n_in = ARCFACE_DIM if variant == "instantid" else img_hidden
        resampler("image_proj.", plus_dim, n_in, C, plus_dim, plus_tokens)
    elif variant == "faceid":
        faceid_proj(faceid_mult)
    elif variant == "faceid-plusv2":
        faceid_proj()
        # FacePerceiverResampler: width C, heads C // 64 of 64, over the CLIP hidden states (img_hidden).
        resampler("image_proj.perceiver_resampler.", C, img_hidden, C, 64 * max(1, C // 64), None)
    else:
        raise ValueError(f"unknown adapter variant {variant!r}")
    key_id = 1
    for idx, name, hidden in _cross_attn_hidden_sizes(unet):
        cross = not name.endswith("attn1.processor")
        if cross:
            # Large enough that identity strength visibly changes the tiny model's output.
            t[f"ip_adapter.{key_id}.to_k_ip.weight"] = rnd(hidden, C, std=0.3)
            t[f"ip_adapter.{key_id}.to_v_ip.weight"] = rnd(hidden, C, std=0.3)
            key_id += 2
        if variant in ("faceid", "faceid-plusv2"):
            # FaceID ships a LoRA on every attention processor; diffusers turns it into a peft adapter.
            kin = C if cross else hidden
            r = 4
            t[f"ip_adapter.{idx}.to_q_lora.down.weight"] = rnd(r, hidden)
            t[f"ip_adapter.{idx}.to_q_lora.up.weight"] = rnd(hidden, r)
            t[f"ip_adapter.{idx}.to_k_lora.down.weight"] = rnd(r, kin)
            t[f"ip_adapter.{idx}.to_k_lora.up.weight"] = rnd(hidden, r)
            t[f"ip_adapter.{idx}.to_v_lora.down.weight"] = rnd(r, kin)
            t[f"ip_adapter.{idx}.to_v_lora.up.weight"] = rnd(hidden, r)
            t[f"ip_adapter.{idx}.to_out_lora.down.weight"] = rnd(r, hidden)
            t[f"ip_adapter.{idx}.to_out_lora.up.weight"] = rnd(hidden, r)
    return t if meta else {k: v.contiguous() for k, v in t.items()}


def save_nested_bin(tensors: dict[str, Any], path: Path) -> None:
    """The original repos' .bin layout: ``{"image_proj": {...}, "ip_adapter": {...}}`` (torch.save)."""
    import torch
    nested: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in tensors.items():
        head, rest = k.split(".", 1)
        nested[head][rest] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(nested, str(path))


def tiny_identitynet(unet, gen):
    """A ControlNet shaped like the tiny UNet (as InstantID's IdentityNet is shaped like SDXL's UNet). Its
    zero-initialised output convolutions get small random weights, so pose and identity tokens visibly
    steer the tiny model (a real trained IdentityNet is not zero there either)."""
    import torch
    from diffusers import ControlNetModel
    cn = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return cn


def make_tiny(root: Path | str) -> Path:
    """Write the deterministic tiny model folder (same layout as the real repos).

    Built in a temporary sibling folder and renamed into place, so a second process starting at the same
    moment never loads a half-written model.
    """
    import os
    import shutil
    root = Path(root)
    if tiny_is_current(root):
        return root
    if (root / "tiny_model.json").is_file():
        # An older tiny folder (written before the current file set): move it aside and build anew.
        shutil.rmtree(root.parent / f".{root.name}.old-{os.getpid()}", ignore_errors=True)
        with contextlib.suppress(OSError):
            os.replace(root, root.parent / f".{root.name}.old-{os.getpid()}")
        shutil.rmtree(root.parent / f".{root.name}.old-{os.getpid()}", ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with quiet_libraries():
        _write_tiny(tmp)
    try:
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        os.replace(tmp, root)
    except OSError:
        if not tiny_is_current(root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep its copy
    return root


def tiny_is_current(root: Path) -> bool:
    try:
        return json.loads((Path(root) / "tiny_model.json").read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


def _write_tiny(root: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    torch.manual_seed(TINY_SEED)
    unet = _tiny_unet()
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=8, sample_size=TINY_RESOLUTION,
                        scaling_factor=0.13025)
    tok, vocab_size = _tiny_tokenizer()
    tok2, _ = _tiny_tokenizer(pad_token="!")
    te_common = dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab_size,
                     max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                     pad_token_id=vocab_size - 1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=TINY_TE1, projection_dim=TINY_PROJ, **te_common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=TINY_TE2, projection_dim=TINY_PROJ, **te_common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(root / BASE_DIR), safe_serialization=True)
    write_classic_tokenizers(root / BASE_DIR)

    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TINY_IMG_HIDDEN, projection_dim=TINY_IMG_PROJ, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, image_size=TINY_IMG_SIZE, patch_size=8))
    enc.save_pretrained(str(root / IPA_DIR / "models" / "image_encoder"), safe_serialization=True)

    gen = torch.Generator().manual_seed(TINY_SEED + 1)
    for variant in ("plus-face", "plain", "faceid", "faceid-plusv2", "instantid"):
        repo, sub, weight, _ = ADAPTER_FILES[variant]
        if variant == "faceid":
            weight = TINY_FACEID_WEIGHT
        out = root / repo / sub / weight
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = _tiny_adapter_tensors(unet, variant, gen)
        if weight.endswith(".bin"):
            save_nested_bin(tensors, out)  # the real file names and the real nested layout
        else:
            save_file(tensors, str(out))
    tiny_identitynet(unet, gen).save_pretrained(str(root / INSTANTID_DIR / CONTROLNET_SUB), safe_serialization=True)
    from utils.faces.standins import build_antelopev2_pack
    build_antelopev2_pack(root / ANTELOPE_DIR)

    _tiny_lora_file(root / LORA_DIR / "tiny_style.safetensors", TINY_SEED + 2, 0.5)
    _write_tiny_checkpoint(root, TINY_SEED + 4)
    _tiny_lora_file(root / LIGHTNING_DIR / LIGHTNING_WEIGHT_TINY, TINY_SEED + 3, 0.3)
    from utils.faces.restore import write_standins   # restoration stand-ins: the exports' names and shapes
    write_standins(root / RESTORE_DIR)
    (root / "tiny_model.json").write_text(json.dumps({
        "profile": "tiny", "version": TINY_VERSION, "seed": TINY_SEED, "native_resolution": TINY_RESOLUTION,
        "note": "randomly initialised demo model; outputs are not portraits"}, indent=1))


# ---------------------------------------------------------------------------------------------------
# Single-file checkpoints (the layout of RealVisXL / Juggernaut XL `.safetensors` files)
# ---------------------------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoints"
TINY_ALT_CHECKPOINT = "tiny-alt.safetensors"


def _ldm_unet_names(unet) -> dict[str, str]:
    """diffusers UNet key -> original (LDM) key, from the UNet's own geometry.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint`` for any block layout (the tiny UNet has two
    levels, SDXL three), so the tiny checkpoint has the real key layout and ``from_single_file`` converts it
    with the same code path as a downloaded fine-tune."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
    cfg = unet.config
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    prefixes: list[tuple[str, str, bool]] = []     # (diffusers prefix, ldm prefix, is a resnet)
    lpb = cfg.layers_per_block
    k = 1
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(lpb):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", True))
            if "CrossAttn" in kind:
                prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", False))
            k += 1
        if i < len(cfg.down_block_types) - 1:
            prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", False))
            k += 1
    prefixes += [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
                 ("mid_block.resnets.1.", "middle_block.2.", True)]
    k = 0
    for i, kind in enumerate(cfg.up_block_types):
        attn = "CrossAttn" in kind
        for j in range(lpb + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", True))
            if attn:
                prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", False))
            if j == lpb and i < len(cfg.up_block_types) - 1:
                prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{k}.{2 if attn else 1}.", False))
            k += 1
    names = {}
    for key in unet.state_dict():
        if key in fixed:
            names[key] = fixed[key]
            continue
        for hf, ldm, is_res in prefixes:
            if key.startswith(hf):
                rest = key[len(hf):]
                if is_res:
                    for a, b in resnet:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                names[key] = ldm + rest
                break
        else:
            raise ValueError(f"no original-layout name for UNet key {key}")
    return names


def _ldm_vae_names(vae) -> dict[str, str]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(vae.config.up_block_types)
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    names = {}
    for key in vae.state_dict():
        if key in fixed:
            names[key] = fixed[key]
            continue
        side, rest = key.split(".", 1)
        parts = rest.split(".")
        if parts[0] == "down_blocks":
            i, sub = parts[1], parts[2]
            tail = ".".join(parts[4:]) if sub == "resnets" else ".".join(parts[4:])
            new = f"down.{i}.block.{parts[3]}.{tail}" if sub == "resnets" else f"down.{i}.downsample.{tail}"
        elif parts[0] == "up_blocks":
            i, sub = 3 if False else n_up - 1 - int(parts[1]), parts[2]
            tail = ".".join(parts[4:])
            new = f"up.{i}.block.{parts[3]}.{tail}" if sub == "resnets" else f"up.{i}.upsample.{tail}"
        elif parts[0] == "mid_block" and parts[1] == "resnets":
            new = f"mid.block_{int(parts[2]) + 1}." + ".".join(parts[3:])
        elif parts[0] == "mid_block" and parts[1] == "attentions":
            tail = ".".join(parts[3:]) + ""
            for a, b in attn.items():
                if tail.startswith(a):
                    tail = b + tail[len(a):]
                    break
            new = "mid.attn_1." + tail
        else:
            raise ValueError(f"no original-layout name for VAE key {key}")
        names[key] = f"{side}." + new.replace("conv_shortcut", "nin_shortcut")
    return names


def to_single_file(pipe) -> dict[str, Any]:
    """An SDXL pipeline's weights as one state dict in the original (LDM / SGM) single-file layout."""
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
    out: dict[str, Any] = {}
    sd = pipe.unet.state_dict()
    for k, v in _ldm_unet_names(pipe.unet).items():
        out["model.diffusion_model." + v] = sd[k]
    sd = pipe.vae.state_dict()
    for k, v in _ldm_vae_names(pipe.vae).items():
        # The original VAE attention projections are 1x1 convolutions.
        out["first_stage_model." + v] = sd[k][..., None, None] if ".attn_1." in v and sd[k].ndim == 2 else sd[k]
    for k, v in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the original files keep the prefix.
        out["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    # The second encoder is OpenCLIP's layout: fused q/k/v in_proj, transposed text projection.
    oc = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    pre = "conditioner.embedders.1.model."
    sd = pipe.text_encoder_2.state_dict()
    qkv: dict[str, dict[str, Any]] = {}
    for k, v in sd.items():
        if k in oc["layers"]:
            out[pre + oc["layers"][k]] = v.T.contiguous() if k == "text_projection.weight" else v
            continue
        if k.endswith("position_ids"):
            continue
        if not k.startswith("text_model.encoder.layers."):
            raise ValueError(f"no original-layout name for text encoder 2 key {k}")
        name = k
        for new, old in oc["transformer"].items():
            name = name.replace(new, old)
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".{proj}." in name:
                base, kind = name.split(f".{proj}.")
                qkv.setdefault(f"{base}.in_proj_{kind}", {})[proj] = v
                break
        else:
            out[pre + "transformer." + name] = v
    for name, parts in qkv.items():
        out[pre + "transformer." + name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {k: v.contiguous() for k, v in out.items()}


def _write_tiny_checkpoint(root: Path, seed: int) -> None:
    """A second tiny SDXL as ONE single-file checkpoint: the tiny base's shapes, different random weights."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file
    pipe = StableDiffusionXLPipeline.from_pretrained(str(root / BASE_DIR), local_files_only=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            for _, p in module.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
    out = root / CHECKPOINT_DIR / TINY_ALT_CHECKPOINT
    out.parent.mkdir(parents=True, exist_ok=True)
    # fp16, as the fine-tunes are published (and half the size: the tiny folder stays small); from_single_file
    # casts it to the pipeline's dtype.
    save_file({k: v.half() for k, v in to_single_file(pipe).items()}, str(out))


def tiny_adapter_weight(variant: str) -> str:
    return TINY_FACEID_WEIGHT if variant == "faceid" else ADAPTER_FILES[variant][2]


# ---------------------------------------------------------------------------------------------------
# Preflight: open every weight file the configured variant needs (headers only) and compare it with
# what the code will build.
# ---------------------------------------------------------------------------------------------------
@dataclass
class FileCheck:
    path: str                 # relative to the folder it was looked for in (or absolute for the face pack)
    status: str               # ok | absent | missing | wrong_shape | missing_key | unexpected_key | wrong_dtype | corrupt
    detail: str = ""
    # False for files the service does not load at start-up (single-file checkpoints: only POST /models/load
    # reads one, and a failed load there keeps the old model serving): a problem is printed as a warning but
    # does not fail the preflight, so one odd checkpoint in the folder never keeps the service down.
    blocking: bool = True

    @property
    def ok(self) -> bool:
        # "absent": an optional file (Lightning, style LoRAs, checkpoints, restoration models) that is not
        # there. Said, but not a failure: the product runs without it; a present but broken one is a failure.
        return self.status in ("ok", "absent")

    def line(self) -> str:
        note = "" if self.ok or self.blocking else " (warning only: loaded by POST /models/load, not at start-up)"
        return f"{self.status.upper():<15} {self.path}" + (f": {self.detail}" if self.detail else "") + note


def _corrupt(rel: str, e: BaseException) -> FileCheck:
    """A file whose header (or graph) did not parse: truncated, or not the format its name says."""
    return FileCheck(rel, "corrupt", f"{type(e).__name__}: {str(e)[:160]}")


_FLOATS = ("F16", "BF16", "F32", "torch.float16", "torch.bfloat16", "torch.float32")


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
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


def _compare(rel: str, path: Path, expected: dict[str, tuple], wildcard: set[tuple[str, int]] = frozenset()) -> FileCheck:
    """expected: {key: shape}; wildcard: (key, dim) pairs whose size is free (LoRA rank)."""
    if not path.is_file():
        return FileCheck(rel, "missing")
    try:
        got = _read_header(path)
    except Exception as e:  # truncated / not a weight file: every loader error means "corrupt"
        return _corrupt(rel, e)
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
    return _dtype_check(rel, got)


def _dtype_check(rel: str, tensors: dict[str, tuple[tuple[int, ...], str]], note: str = "") -> FileCheck:
    """The last check of a weight file whose keys and shapes passed: every tensor a float type; the OK
    line says how many tensors and which dtypes."""
    bad = sorted(k for k, (_, dt) in tensors.items() if dt not in _FLOATS)
    if bad:
        return FileCheck(rel, "wrong_dtype", f"key {bad[0]!r} has dtype {tensors[bad[0]][1]}, expected a float type")
    names = {"torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32"}
    dtypes = sorted({names.get(dt, dt) for _, dt in tensors.values()})
    return FileCheck(rel, "ok", f"{len(tensors)} tensors, {'/'.join(dtypes)}{note}")


def _meta_state(build) -> dict[str, tuple]:
    import torch
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_model(build):
    import torch
    with torch.device("meta"):
        return build()


def _weight_file(folder: Path, stem: str, fp16: bool) -> Path:
    for name in ([f"{stem}.fp16.safetensors"] if fp16 else []) + [f"{stem}.safetensors"]:
        if (folder / name).is_file():
            return folder / name
    return folder / (f"{stem}.fp16.safetensors" if fp16 else f"{stem}.safetensors")


def verify(settings: Settings) -> list[FileCheck]:
    """One FileCheck per weight file the configured profile and variant load."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)
    variant = settings.ip_adapter_variant
    profile = choose_profile(settings)
    checks: list[FileCheck] = []
    if profile == "tiny":
        root = settings.resolved_tiny_model_dir
        if not tiny_is_current(root):
            make_tiny(root)   # what the first start would do; then its files are checked like any others
        base, adapter_repo, encoder_repo = root / BASE_DIR, root / ADAPTER_FILES[variant][0], root / IPA_DIR
        fp16, tiny = False, True
    else:
        model_dir = Path(settings.model_dir)
        base, adapter_repo, encoder_repo = (model_dir / BASE_DIR, model_dir / ADAPTER_FILES[variant][0],
                                            model_dir / IPA_DIR)
        with contextlib.suppress(ModelWeightsMissing):
            w = resolve_sdxl(settings)
            base, adapter_repo = w.base, w.adapter_repo or adapter_repo
            encoder_repo = w.encoder_repo or encoder_repo
        fp16, tiny = True, False

    def rel(p: Path, top: Path) -> str:
        try:
            return f"{top.name}/{p.relative_to(top).as_posix()}"
        except ValueError:
            return str(p)

    # SDXL components: built from their config.json on the meta device, compared key by key.
    unet_cfg = None
    components = [("unet", "diffusion_pytorch_model", lambda c: UNet2DConditionModel.from_config(c), UNet2DConditionModel),
                  ("vae", "diffusion_pytorch_model", lambda c: AutoencoderKL.from_config(c), AutoencoderKL),
                  ("text_encoder", "model", lambda c: CLIPTextModel(c), CLIPTextConfig),
                  ("text_encoder_2", "model", lambda c: CLIPTextModelWithProjection(c), CLIPTextConfig)]
    meta: dict[str, Any] = {}      # component -> the model built on the meta device from its config.json
    with quiet_libraries():
        for sub, stem, build, cfg_cls in components:
            folder = base / sub
            path = _weight_file(folder, stem, fp16)
            if not (folder / "config.json").is_file():
                checks.append(FileCheck(rel(folder / "config.json", base), "missing"))
                continue
            cfg = cfg_cls.load_config(str(folder)) if cfg_cls in (UNet2DConditionModel, AutoencoderKL) \
                else cfg_cls.from_pretrained(str(folder))
            if sub == "unet":
                unet_cfg = cfg
            meta[sub] = _meta_model(lambda: build(cfg))
            checks.append(_compare(rel(path, base), path, {k: tuple(v.shape) for k, v in meta[sub].state_dict().items()}))
        # The tokenizers: loadable, and exactly as many tokens as their text encoder has embedding rows.
        for sub, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            checks.append(verify_tokenizer(base / sub, rel(base / sub, base), meta.get(encoder)))
        if unet_cfg is None:
            return checks
        unet = meta["unet"]

        # The ViT-H image encoder (plus-face, plain, faceid-plusv2).
        img_hidden, img_proj = (TINY_IMG_HIDDEN, TINY_IMG_PROJ) if tiny else (VIT_H_HIDDEN, VIT_H_PROJ)
        if variant in ("plus-face", "plain", "faceid-plusv2"):
            enc = Path(encoder_repo) / ENCODER_SUB
            if not (enc / "config.json").is_file():
                checks.append(FileCheck(rel(enc / "config.json", Path(encoder_repo)), "missing"))
            else:
                vcfg = CLIPVisionConfig.from_pretrained(str(enc))
                img_hidden, img_proj = vcfg.hidden_size, vcfg.projection_dim
                path = enc / "model.safetensors"
                checks.append(_compare(rel(path, Path(encoder_repo)), path,
                                       _meta_state(lambda: CLIPVisionModelWithProjection(vcfg))))

        # The adapter file: the names and shapes adapter_tensors() writes for this UNet and encoder.
        _, sub, weight, _ = ADAPTER_FILES[variant]
        if tiny:
            weight = tiny_adapter_weight(variant)
        expected = adapter_tensors(unet, variant, None, img_hidden=img_hidden, img_proj=img_proj,
                                   plus_tokens=TINY_PLUS_TOKENS if tiny else (INSTANTID_TOKENS if variant == "instantid" else 16),
                                   plus_dim=TINY_PLUS_DIM if tiny else (INSTANTID_DIM if variant == "instantid" else 1280),
                                   meta=True, faceid_mult=1 if tiny else 2)
        # LoRA rank is the file's choice (FaceID: 128); everything else is fixed by the UNet.
        wild = {(k, 0 if ".down." in k else 1) for k in expected if "_lora." in k}
        path = Path(adapter_repo) / sub / weight
        checks.append(_compare(rel(path, Path(adapter_repo)), path, {k: tuple(v.shape) for k, v in expected.items()}, wild))

        # InstantID's IdentityNet: a ControlNet built from its config; it must fit this UNet.
        if variant == "instantid":
            folder = Path(adapter_repo) / CONTROLNET_SUB
            if not (folder / "config.json").is_file():
                checks.append(FileCheck(rel(folder / "config.json", Path(adapter_repo)), "missing"))
            else:
                ccfg = ControlNetModel.load_config(str(folder))
                path = _weight_file(folder, "diffusion_pytorch_model", False)
                if ccfg.get("cross_attention_dim") != unet.config.cross_attention_dim:
                    checks.append(FileCheck(rel(folder / "config.json", Path(adapter_repo)), "wrong_shape",
                                            f"cross_attention_dim {ccfg.get('cross_attention_dim')}, the UNet's is "
                                            f"{unet.config.cross_attention_dim}"))
                else:
                    checks.append(_compare(rel(path, Path(adapter_repo)), path,
                                           _meta_state(lambda: ControlNetModel.from_config(ccfg))))

        # The few-step Lightning LoRA (quality_mode fast) and the style LoRAs: optional, loaded by
        # load_lora_weights, so checked with the same key conversion against the modules they target.
        if tiny:
            lightning = settings.resolved_tiny_model_dir / LIGHTNING_DIR / LIGHTNING_WEIGHT_TINY
            lora_dir = settings.resolved_tiny_model_dir / LORA_DIR
        else:
            spec = next(s for s in repo_specs(settings) if s.local_name == LIGHTNING_DIR)
            found, _ = _find_repo(spec, settings)
            lightning = (found or Path(settings.model_dir) / LIGHTNING_DIR) / settings.lightning_weight
            lora_dir = settings.resolved_lora_dir
        if lightning.is_file():
            checks.append(verify_lora(lightning, rel(lightning, lightning.parent), meta))
        else:
            checks.append(FileCheck(rel(lightning, lightning.parent), "absent", "optional: quality_mode fast falls back to "
                                    "full steps (python model_loader.py download fetches it)"))
        loras = sorted(lora_dir.glob("*.safetensors")) if lora_dir.is_dir() else []
        checks += [verify_lora(f, rel(f, lora_dir), meta) for f in loras]
        if not loras:
            checks.append(FileCheck(str(lora_dir), "absent", "optional: no style LoRAs (<name>.safetensors; "
                                                             "TWIN_LORA_DIR)"))

        # Single-file checkpoints (base-model switch): their keys in the original layout, for these configs.
        folder = checkpoint_dir(settings)
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if files and all(c in meta for c in ("unet", "vae", "text_encoder", "text_encoder_2")):
            expected = single_file_shapes(meta)
            checks += [dataclasses.replace(verify_checkpoint(f, rel(f, folder), expected), blocking=False)
                       for f in files]
        elif not files:
            checks.append(FileCheck(str(folder), "absent", "optional: no single-file checkpoints"))
    checks += verify_restore_models(_restore_dir(settings, profile))
    if variant in ARCFACE_VARIANTS:
        pack = settings.insightface_model_dir
        if pack is None:
            default = settings.resolved_insightface_dir
            pack = default if profile != "tiny" or any(default.glob("*.onnx")) or (default / default.name).is_dir() \
                else settings.resolved_tiny_model_dir / ANTELOPE_DIR
        checks += verify_face_pack(Path(pack))
    return checks


def verify_face_pack(folder: Path) -> list[FileCheck]:
    """The InsightFace pack: a detector (SCRFD: >= 5 outputs) and a 512-d ArcFace recogniser (112x112 in),
    found by the same input/output routing insightface uses. Graph headers only (no session)."""
    from utils.faces.backends import resolve_pack_dir
    inner = resolve_pack_dir(folder)
    note = f" (nested {folder.name}/{folder.name}/ accepted; to flatten: mv {inner}/*.onnx {folder}/)" if inner != folder else ""
    files = sorted(inner.glob("*.onnx")) if inner.is_dir() else []
    if not files:
        return [FileCheck(str(folder), "missing", "no .onnx files (put the antelopev2 pack here, or set "
                                                  "TWIN_INSIGHTFACE_MODEL_DIR)")]
    import onnx
    found: dict[str, Path] = {}
    out: list[FileCheck] = []
    for f in files:
        try:
            m = onnx.load(str(f), load_external_data=False)
        except Exception as e:
            out.append(FileCheck(str(f), "corrupt", f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        ins = [[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
        outs = [[d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in m.graph.output]
        if len(outs) >= 5:
            found.setdefault("detection", f)
        elif ins and ins[0][2:4] == [112, 112]:
            if outs and outs[0][-1] != 512:
                out.append(FileCheck(str(f), "wrong_shape", f"recognition output {outs[0]}, expected [1, 512]"))
                continue
            found.setdefault("recognition", f)
    for task in ("detection", "recognition"):
        if task in found:
            out.append(FileCheck(str(found[task]), "ok", task + note))
        elif not any(c.status == "corrupt" or c.status == "wrong_shape" for c in out):
            out.append(FileCheck(str(inner), "missing", f"no {task} model among {[f.name for f in files]}"))
    return out


def verify_tokenizer(folder: Path, rel: str, encoder) -> FileCheck:
    """A tokenizer folder: vocab.json + merges.txt (what the real repo ships) or tokenizer.json, loadable by
    CLIPTokenizer, with as many tokens as the text encoder has embedding rows (a larger vocabulary gives ids
    the embedding cannot look up; a smaller one is another model's tokenizer)."""
    classic = all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))
    if not classic and not (folder / "tokenizer.json").is_file():
        return FileCheck(rel, "missing", "neither vocab.json + merges.txt nor tokenizer.json")
    from transformers import CLIPTokenizer
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        size = len(tok)
    except Exception as e:  # unreadable JSON, broken merges: the pipeline's from_pretrained fails the same way
        return _corrupt(rel, e)
    if encoder is None:
        return FileCheck(rel, "ok", f"{size} tokens (text encoder not checked)")
    rows = encoder.get_input_embeddings().weight.shape[0]
    if size != rows:
        return FileCheck(rel, "wrong_shape", f"vocab size {size}, the text encoder's embedding has {rows} rows")
    return FileCheck(rel, "ok", f"{size} tokens = embedding rows")


def _header_with_alphas(path: Path) -> dict[str, Any]:
    """A LoRA file as {key: tensor}: meta tensors of the header's shapes and dtypes, except the scalar
    `.alpha` entries (kohya format), read for real because the key conversion reads their values."""
    import torch
    from safetensors import safe_open
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            shape = tuple(sl.get_shape())
            if k.endswith(".alpha") and len(shape) <= 1:
                out[k] = f.get_tensor(k)
            else:
                out[k] = torch.empty(shape, dtype=dtypes.get(sl.get_dtype(), torch.float32), device="meta")
    return out


def _lora_problem(key: str, module, a, b) -> str | None:
    """Why peft's LoRA layer for ``module`` cannot take lora_A ``a`` / lora_B ``b`` (shapes), or None."""
    import torch
    w = getattr(module, "weight", None)
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or w is None:
        return f"{key!r} targets {type(module).__name__}, which LoRA cannot adapt"
    out_f, in_f = w.shape[0], w.shape[1]
    if a is None or b is None:
        return None
    if a.shape[0] != b.shape[1]:
        return f"{key!r}: lora_A rank {a.shape[0]} but lora_B rank {b.shape[1]}"
    if a.ndim != w.ndim or b.ndim != w.ndim:
        return f"{key!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the layer's weight {list(w.shape)}"
    if a.shape[1] != in_f or b.shape[0] != out_f or (w.ndim == 4 and tuple(b.shape[2:]) != (1, 1)):
        return (f"{key!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the layer's weight "
                f"{list(w.shape)} ({in_f} in, {out_f} out)")
    return None


def verify_lora(path: Path, rel: str, meta: dict[str, Any]) -> FileCheck:
    """A LoRA file as ``pipe.load_lora_weights`` reads it: diffusers' own key conversion (kohya, old
    diffusers and peft layouts; SGM block names remapped with the UNet's config) on a header-only state
    dict, then every lora_A / lora_B pair must name a Linear / Conv2d of the meta UNet or text encoder and fit
    its shape. Keys the loader would drop without a word (no known prefix, no such module) are errors:
    such a LoRA loads and silently changes nothing."""
    import re
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    if not path.is_file():
        return FileCheck(rel, "missing")
    try:
        raw = _header_with_alphas(path)
    except Exception as e:  # truncated / not a safetensors file
        return _corrupt(rel, e)
    bad = sorted(k for k, v in raw.items() if not v.is_floating_point())
    if bad:
        return FileCheck(rel, "wrong_dtype", f"key {bad[0]!r} has dtype {raw[bad[0]].dtype}, expected a float type")
    try:
        sd, _ = StableDiffusionXLPipeline.lora_state_dict(dict(raw), unet_config=meta["unet"].config)
    except Exception as e:  # diffusers cannot place the keys at all: load_lora_weights raises the same
        return FileCheck(rel, "unexpected_key", f"diffusers cannot convert the keys: {type(e).__name__}: {str(e)[:160]}")
    if not sd:
        return FileCheck(rel, "unexpected_key", "no LoRA weights in the file")
    stray = sorted(k for k in sd if k.split(".", 1)[0] not in ("unet", "text_encoder", "text_encoder_2"))
    if stray:
        return FileCheck(rel, "unexpected_key", f"key {stray[0]!r} is for no part of the SDXL pipeline "
                                                f"({len(stray)} such keys; the loader ignores them)")
    pat = re.compile(r"^(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.(weight|bias)$")
    counts: dict[str, int] = {}
    ranks: set[int] = set()
    for part in ("unet", "text_encoder", "text_encoder_2"):
        sub = {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
        if not sub:
            continue
        model = meta.get(part)
        if model is None:
            return FileCheck(rel, "unexpected_key", f"weights for {part}, which was not built (see its line)")
        # The same conversions the loader applies (lora_base / peft.load_lora_adapter) before peft injects layers.
        try:
            if part == "unet":
                if not any("lora_A" in k for k in sub):
                    sub = convert_unet_state_dict_to_peft(sub)
            else:
                sub = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
                if not hasattr(model, "text_model"):
                    sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
        except Exception as e:  # load_lora_weights raises the same error on this file
            return FileCheck(rel, "unexpected_key", f"diffusers cannot convert the {part} keys: {type(e).__name__}: "
                                                    f"{str(e)[:160]}")
        modules = dict(model.named_modules())
        pairs: dict[str, dict[str, Any]] = {}
        for k, v in sub.items():
            m = pat.match(k)
            if m is None:
                if k.endswith(".lora_magnitude_vector.weight") or k.endswith(".lora_magnitude_vector"):
                    continue   # DoRA magnitudes ride along with their lora_A / lora_B pair
                return FileCheck(rel, "unexpected_key", f"key {part}.{k!r} is not a LoRA weight")
            if m.group(3) == "weight":
                pairs.setdefault(m.group(1), {})[m.group(2)] = v
            else:
                pairs.setdefault(m.group(1), {})
        for name in sorted(pairs):
            if name not in modules:
                return FileCheck(rel, "unexpected_key", f"{part}.{name} is not a module of the {part} "
                                                        f"({sum(n not in modules for n in pairs)} of {len(pairs)} "
                                                        f"targets missing): the LoRA would not apply there")
            a, b = pairs[name].get("lora_A"), pairs[name].get("lora_B")
            if a is None or b is None:
                return FileCheck(rel, "missing_key", f"{part}.{name} has no {'lora_A' if a is None else 'lora_B'} weight")
            why = _lora_problem(f"{part}.{name}", modules[name], a, b)
            if why:
                return FileCheck(rel, "wrong_shape", why)
            ranks.add(a.shape[0])
        counts[part] = len(pairs)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in raw.values() if v.device.type == "meta"})
    return FileCheck(rel, "ok", ", ".join(f"{n} {p} modules" for p, n in counts.items())
                     + f", rank {'/'.join(map(str, sorted(ranks)))}, {'/'.join(dtypes)}")


# Keys a published single-file SDXL carries that diffusers' conversion does not read (buffers of the
# original code): present or not, they are fine.
_SINGLE_FILE_IGNORED = ("position_ids", "logit_scale")
_SINGLE_FILE_PARTS = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.",
                      "conditioner.embedders.1.")


def single_file_shapes(meta: dict[str, Any]) -> dict[str, tuple]:
    """{original key: shape} of a single-file SDXL for these component configs: ``to_single_file`` (the
    inverse of diffusers' single-file conversion, checked by loading the tiny checkpoint with
    from_single_file) run on the meta-device models."""
    from types import SimpleNamespace
    sd = to_single_file(SimpleNamespace(**{k: meta[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2")}))
    return {k: tuple(v.shape) for k, v in sd.items()}


def verify_checkpoint(path: Path, rel: str, expected: dict[str, tuple]) -> FileCheck:
    """A single-file checkpoint (checkpoints/*.safetensors) against the base folder's configs, header only.
    Keys outside the four components (EMA copies, sampler buffers) are not read by diffusers and are only
    counted; inside them every key must be one the conversion maps, with the shape the config builds. The
    VAE's attention projections may be 1x1 convolutions or matrices (both are published; diffusers
    converts either)."""
    if not path.is_file():
        return FileCheck(rel, "missing")
    try:
        got = _read_header(path)
    except Exception as e:  # truncated / not a safetensors file
        return _corrupt(rel, e)
    ours = {k: v for k, v in got.items() if k.startswith(_SINGLE_FILE_PARTS) and not k.endswith(_SINGLE_FILE_IGNORED)}
    ignored = len(got) - len(ours)
    for key in sorted(expected):
        if key not in ours:
            return FileCheck(rel, "missing_key", f"key {key!r} not in file (not an SDXL base checkpoint of "
                                                 f"this layout, or a component left out)")
        shape, want = ours[key][0], expected[key]
        if ".attn_1." in key and key.startswith("first_stage_model."):
            shape, want = tuple(d for d in shape if d != 1), tuple(d for d in want if d != 1)
        if tuple(shape) != tuple(want):
            return FileCheck(rel, "wrong_shape", f"key {key!r} has shape {list(ours[key][0])}, expected {list(expected[key])}")
    extra = sorted(set(ours) - set(expected))
    if extra:
        return FileCheck(rel, "unexpected_key", f"key {extra[0]!r} is not in an SDXL of this layout ({len(extra)} such keys)")
    return _dtype_check(rel, ours, f" ({ignored} keys diffusers does not read)" if ignored else "")


def _restore_dir(settings: Settings, profile: str) -> Path:
    """Where the service looks for restoration models (services.build_restorer's rule)."""
    if settings.restore_model_dir is not None:
        return Path(settings.restore_model_dir)
    if profile == "tiny":
        return settings.resolved_tiny_model_dir / RESTORE_DIR
    return settings.resolved_restore_dir


def verify_restore_models(folder: Path) -> list[FileCheck]:
    """The face restoration ONNX models that are present (each is optional: restore_faces asks for one by
    name): graph inputs/outputs as OnnxRestoreModel needs them (one 4-D 3-channel image input, a second
    input exactly when the model takes a fidelity weight, an output). ONNX has no header: the protobuf is
    parsed, the weights are not run."""
    from utils.faces.restore import RESTORE_MODELS, download_command
    out = []
    for name, spec in RESTORE_MODELS.items():
        f = folder / spec.filename
        rel = f"{folder.name}/{spec.filename}"
        if not f.is_file():
            out.append(FileCheck(rel, "absent", f"optional: restore_model={name} unavailable ({download_command(name)})"))
            continue
        import onnx
        try:
            m = onnx.load(str(f), load_external_data=False)
        except Exception as e:
            out.append(FileCheck(rel, "corrupt", f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        init = {i.name for i in m.graph.initializer}
        ins = [(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim])
               for i in m.graph.input if i.name not in init]
        images = [(n, d) for n, d in ins if len(d) == 4]
        if len(images) != 1 or not m.graph.output:
            out.append(FileCheck(rel, "wrong_shape", f"expected one 4-D image input and an output, found inputs {ins}"))
            continue
        dims = images[0][1]
        if dims[1] != 3 or any(isinstance(d, int) and d and d != spec.size for d in dims[2:]):
            out.append(FileCheck(rel, "wrong_shape", f"image input {images[0][0]!r} is {dims}, expected [1, 3, "
                                                     f"{spec.size}, {spec.size}]"))
            continue
        if (len(ins) > 1) != spec.has_fidelity:
            out.append(FileCheck(rel, "wrong_shape", f"{name} {'takes' if spec.has_fidelity else 'takes no'} a "
                                                     f"fidelity input; the file's inputs are {[n for n, _ in ins]}"))
            continue
        out.append(FileCheck(rel, "ok", f"{name}, input {images[0][0]} {dims}" + (", fidelity input" if len(ins) > 1 else "")))
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch the sdxl profile's weights (needs network)")
    d.add_argument("--dir", type=Path, default=None, help="target folder (default TWIN_MODEL_DIR)")
    d.add_argument("--faceid", action="store_true", help="also fetch IP-Adapter FaceID SDXL (non-commercial)")
    d.add_argument("--no-lightning", action="store_true", help="skip the SDXL-Lightning few-step LoRA")
    d.add_argument("--restore", action="append", choices=("gfpgan", "codeformer", "gpen"),
                   help="fetch only this face restoration ONNX model (repeatable) into TWIN_RESTORE_MODEL_DIR")
    d.add_argument("--instantid", action="store_true",
                   help="only InstantID's files (IdentityNet + ip-adapter.bin; weights research-only) + the base model")
    d.add_argument("--faceid-plusv2", action="store_true",
                   help="only FaceID Plus v2 SDXL (non-commercial) + the ViT-H encoder + the base model")
    t = sub.add_parser("make-tiny", help="write the tiny offline model folder")
    t.add_argument("dir", type=Path)
    sub.add_parser("check", help="say which profile would load and why")
    sub.add_parser("verify", help="open every weight file the configured variant needs (headers only), compare "
                                  "names / shapes / dtypes with what the code builds; exit 1 on any problem")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    if args.cmd == "download":
        if args.dir:
            settings = settings.replace(model_dir=args.dir)
        if args.restore:
            for p in download_restore(settings, args.restore):
                print(p)
            return 0
        for p in download(settings, faceid=args.faceid, lightning=not args.no_lightning, instantid=args.instantid,
                          faceid_plusv2=args.faceid_plusv2):
            print(p)
        if args.instantid or settings.ip_adapter_variant in ("instantid", "faceid-plusv2") or args.faceid_plusv2:
            print(f"InsightFace antelopev2 pack (non-commercial) is not on the hub: unzip antelopev2.zip from "
                  f"https://github.com/deepinsight/insightface/releases into {Path(settings.model_dir) / ANTELOPE_DIR}")
    elif args.cmd == "verify":
        checks = verify(settings)
        for c in checks:
            print(c.line())
        bad = [c for c in checks if not c.ok and c.blocking]
        warned = [c for c in checks if not c.ok and not c.blocking]
        absent = sum(c.status == "absent" for c in checks)
        print(f"verify: {len(checks) - len(bad) - len(warned) - absent} ok, {absent} optional absent, "
              f"{len(warned)} warning(s), {len(bad)} problem(s) "
              f"(profile {choose_profile(settings)}, variant {settings.ip_adapter_variant})")
        return 1 if bad else 0
    elif args.cmd == "make-tiny":
        import time
        t0 = time.perf_counter()
        root = make_tiny(args.dir)
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(f"tiny model written to {root} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.2f} s)")
    else:
        try:
            resolve_sdxl(settings)
            print("sdxl weights present")
        except ModelWeightsMissing as e:
            print(e.message)
            print(f"profile {settings.model_profile!r} would load: {choose_profile(settings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
