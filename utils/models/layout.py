"""Which folder holds what: the folder and file names, the hub repos of the sdxl and flux profiles, the one
function that resolves the configured profile to its folders (``model_layout``), and the base models found
locally across both families (``list_base_models``: the catalogue GET /models shows).

Folder names inside ``settings.model_dir`` and inside the tiny folder are the same: they mirror the hub repos'
names, so ``download`` writes exactly what ``model_layout`` looks for, and the tiny profile is read by the same
code as the real one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

from utils.config import Settings
from utils.choices import DEFAULT_IDENTITY_VARIANT, FAMILY_VARIANTS
from utils.errors import ConfigError, ModelWeightsMissing
from utils.models.infiniteyou import InfiniteYouFiles, infiniteyou_files
from utils.models.kinds import checkpoint_family, flux_is_guidance_distilled
from utils.models.vae_fix import VAE_FIX_DIR, VAE_FIX_FILES

log = logging.getLogger("twin.models")

BASE_DIR = "stable-diffusion-xl-base-1.0"
IPA_DIR = "IP-Adapter"
FACEID_DIR = "IP-Adapter-FaceID"
LIGHTNING_DIR = "SDXL-Lightning"
LORA_DIR = "loras"
INSTANTID_DIR = "InstantID"
CONTROLNET_SUB = "ControlNetModel"          # InstantID's IdentityNet, a ControlNet, inside INSTANTID_DIR
ENCODER_SUB = "models/image_encoder"        # the ViT-H image encoder inside IPA_DIR
ANTELOPE_DIR = "insightface/antelopev2"     # InsightFace pack InstantID was trained with (inside model_dir)
CHECKPOINT_DIR = "checkpoints"              # single-file base checkpoints (RealVisXL, Juggernaut XL .safetensors)
RESTORE_DIR = "face_restore"   # settings.resolved_restore_dir; the tiny folder holds stand-ins under the same name

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
# Variants whose adapter reads CLIP ViT-H features of the face crops (the image encoder in IPA_DIR).
ENCODER_VARIANTS = ("plus-face", "plain", "faceid-plusv2")
INSTANTID_FILES = [f"{CONTROLNET_SUB}/config.json", f"{CONTROLNET_SUB}/diffusion_pytorch_model.safetensors",
                   ADAPTER_FILES["instantid"][2]]

# The tiny folder's own names and size (what tiny.make_tiny writes, what the readers look for).
TINY_MODEL_NAME = "tiny-sdxl"
TINY_RESOLUTION = 128      # native side in pixels; latents are 16x16
TINY_FACEID_WEIGHT = "ip-adapter-faceid_sdxl.safetensors"  # the tiny one is safetensors (same loader branch)
LIGHTNING_WEIGHT_TINY = "tiny_lightning_4step_lora.safetensors"
SDXL_RESOLUTION = 1024

# FLUX.1 (black-forest-labs/FLUX.1-dev and FLUX.1-schnell): the diffusers layout of both hub repos. Only these
# folders are fetched, never the repos' root single files (flux1-dev.safetensors, ae.safetensors: the same
# weights again, 24 GB). The transformer and T5 are sharded (an index JSON + its shards).
FLUX_DEV_DIR = "FLUX.1-dev"
FLUX_SCHNELL_DIR = "FLUX.1-schnell"
FLUX_FAST_DIR = "Hyper-SD"                  # the 8-step LoRA for FLUX.1-dev (quality_mode fast)
FLUX_RESOLUTION = 1024
FLUX_PATTERNS = ["model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                 "tokenizer_2/*", "transformer/*", "vae/*"]
FLUX_REQUIRED = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "text_encoder_2/config.json",
                 "text_encoder_2/model.safetensors.index.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "tokenizer_2/tokenizer_config.json", "transformer/config.json",
                 "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors"]
TINY_FLUX_MODEL_NAME = "tiny-flux"
TINY_FLUX_FAST_WEIGHT = "tiny_hyper_flux_8steps_lora.safetensors"

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
               instantid: bool = False, faceid_plusv2: bool = False, vae_fix: bool | None = None) -> list[RepoSpec]:
    """Everything the sdxl profile may use. ``faceid`` defaults to whether that variant is selected,
    ``vae_fix`` to TWIN_VAE_FP16_FIX (required when that is on)."""
    variants = wanted_variants(settings, faceid=faceid, instantid=instantid, faceid_plusv2=faceid_plusv2)
    base_required = [p for p in BASE_FILES_FP16 if "*" not in p] + ["tokenizer/vocab.json", "tokenizer_2/vocab.json"]
    specs = [RepoSpec(settings.sdxl_model_id, BASE_DIR, list(BASE_FILES_FP16), base_required,
                      purpose="SDXL base 1.0 (fp16 variant)")]
    specs += _adapter_specs(settings, variants)
    if lightning:
        specs.append(RepoSpec(settings.lightning_repo, LIGHTNING_DIR, [settings.lightning_weight],
                              [settings.lightning_weight], optional=True, purpose="SDXL-Lightning few-step LoRA"))
    if settings.vae_fp16_fix if vae_fix is None else vae_fix:
        specs.append(RepoSpec(settings.vae_fp16_fix_repo, VAE_FIX_DIR, list(VAE_FIX_FILES), list(VAE_FIX_FILES),
                              purpose="fp16-fix SDXL VAE (TWIN_VAE_FP16_FIX)"))
    return specs


def _adapter_specs(settings: Settings, variants: set[str]) -> list[RepoSpec]:
    """The adapter repos for ``variants``; files of the selected variant are required, the others optional."""
    selected = settings.ip_adapter_variant
    enc = [f"{ENCODER_SUB}/config.json", f"{ENCODER_SUB}/model.safetensors"]
    specs = []
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
    return specs


def download_flag(variant: str) -> str:
    return {"faceid": " --faceid", "faceid-plusv2": " --faceid-plusv2", "instantid": " --instantid"}.get(variant, "")


def tiny_adapter_weight(variant: str) -> str:
    return TINY_FACEID_WEIGHT if variant == "faceid" else ADAPTER_FILES[variant][2]


@dataclass(frozen=True)
class ModelLayout:
    """Which folder holds what for the profile in use, resolved once from the settings (``model_layout``) and
    read by the loader, the preflight and the base-model registry.

    Every folder is a path even when nothing is there: where it was found, else where it belongs
    (``missing`` / ``missing_optional`` say which repos were not found, ``require`` turns the first into the
    error that names them)."""
    family: ClassVar[str] = "sdxl"
    profile: str                    # "sdxl" | "tiny": where the weights come from (the family is ``family``)
    variant: str                    # the IP-Adapter variant whose files are looked for
    model_dir: Path                 # settings.model_dir: where `download` writes
    model_name: str                 # the base model family (what a session identity is bound to)
    native_resolution: int
    base: Path                      # the diffusers SDXL base folder (configs, tokenizers, weights)
    fp16: bool                      # the base folder holds the *.fp16.safetensors variant of each weight file
    adapter_repo: Path              # the repo folder of ADAPTER_FILES[variant]
    adapter_weight: str             # the adapter file's name inside adapter_repo/<subfolder>
    encoder_repo: Path              # IPA_DIR: the ViT-H image encoder's repo
    lightning: Path                 # the few-step LoRA's folder
    lightning_weight: str
    lora_dir: Path                  # style LoRAs (<name>.safetensors)
    checkpoints: Path               # single-file base checkpoints
    restore_dir: Path               # face restoration ONNX models
    face_pack: Path                 # the InsightFace pack the preflight checks (ArcFace variants)
    missing: tuple[str, ...] = ()            # required repos not found: what, and where they were looked for
    missing_optional: tuple[str, ...] = ()   # optional repos not found (hub ids)
    vae_fix: Path | None = None              # the fp16-fix VAE's folder when TWIN_VAE_FP16_FIX is on

    @property
    def weights_variant(self) -> str | None:
        """``from_pretrained``'s ``variant`` for the base folder."""
        return "fp16" if self.fp16 else None

    @property
    def adapter_file(self) -> Path:
        return self.adapter_repo / ADAPTER_FILES[self.variant][1] / self.adapter_weight

    @property
    def lightning_file(self) -> Path:
        return self.lightning / self.lightning_weight

    def require(self) -> ModelLayout:
        """This layout, or ModelWeightsMissing naming what is missing, where it was looked for, and the command."""
        if not self.missing:
            return self
        raise ModelWeightsMissing(
            "real model weights are missing: " + " | ".join(self.missing)
            + f". Download them on a connected machine with: python model_loader.py download --dir {self.model_dir}"
            + download_flag(self.variant) + " (or set TWIN_MODEL_PROFILE=tiny for the offline demo model)",
            details={"missing": [m.split(" ")[0] for m in self.missing]})


@dataclass(frozen=True)
class FluxLayout:
    """The folders of one FLUX.1 base model (the flux profile, or the tiny folder's tiny-flux), read by the FLUX
    loader, the preflight and the registry; the same field names as ``ModelLayout`` where they mean the same.

    ``flux_variant``: dev (guidance-distilled: the guidance scale is an input embedding; 28-50 steps) or
    schnell (timestep-distilled: 1-4 steps, no guidance). ``variant`` is the identity method ("" = none yet)."""
    family: ClassVar[str] = "flux"
    profile: str                    # "flux" | "tiny"
    flux_variant: str               # "dev" | "schnell"
    model_dir: Path
    model_name: str                 # the hub id, or tiny-flux
    native_resolution: int
    base: Path                      # the diffusers FLUX folder (model_index.json, transformer/, text_encoder_2/ ...)
    fast_lora: Path                 # the 8-step LoRA's folder (FLUX.1-dev only)
    fast_lora_weight: str
    lora_dir: Path
    checkpoints: Path
    restore_dir: Path
    missing: tuple[str, ...] = ()
    missing_optional: tuple[str, ...] = ()
    variant: str = ""               # the identity method: "" (none) or infiniteyou
    # What a session identity would be bound to (the family: InfiniteYou identities are IR-SE50 vectors, the
    # same for every FLUX base model and stage; the projection runs per call).
    identity_model: str = "flux"
    infiniteyou: InfiniteYouFiles | None = None
    face_pack: Path | None = None

    @property
    def fast_lora_file(self) -> Path:
        return self.fast_lora / self.fast_lora_weight

    def require(self) -> "FluxLayout":
        if not self.missing:
            return self
        flag = "--flux-dev" if self.flux_variant == "dev" else "--flux-schnell"
        raise ModelWeightsMissing(
            "FLUX.1 weights are missing: " + " | ".join(self.missing)
            + f". Download them on a connected machine with: python model_loader.py download {flag} --dir "
            + f"{self.model_dir} (or set TWIN_MODEL_PROFILE=tiny-flux for the offline demo model)",
            details={"missing": [m.split(" ")[0] for m in self.missing]})


Layout = Union[ModelLayout, FluxLayout]


@dataclass(frozen=True)
class BaseModel:
    """One entry of the base-model catalogue: a diffusers folder (``file`` None) or a single-file checkpoint
    loaded against ``layout``'s folder (its configs and tokenizers; offline)."""
    name: str
    family: str
    layout: Layout
    file: Path | None = None

    @property
    def kind(self) -> str:
        return "diffusers-folder" if self.file is None else "single-file"


def flux_specs(settings: Settings, *, dev: bool = True, schnell: bool = True, fast_lora: bool = True) -> list[RepoSpec]:
    """The FLUX.1 repos (only the diffusers folders) and the optional 8-step LoRA for FLUX.1-dev."""
    specs = []
    if dev:
        specs.append(RepoSpec(settings.flux_dev_id, FLUX_DEV_DIR, list(FLUX_PATTERNS), list(FLUX_REQUIRED),
                              purpose="FLUX.1-dev (diffusers folders; FLUX.1 [dev] Non-Commercial License)"))
    if schnell:
        specs.append(RepoSpec(settings.flux_schnell_id, FLUX_SCHNELL_DIR, list(FLUX_PATTERNS), list(FLUX_REQUIRED),
                              purpose="FLUX.1-schnell (diffusers folders; Apache-2.0)"))
    if dev and fast_lora:
        specs.append(RepoSpec(settings.flux_fast_lora_repo, FLUX_FAST_DIR, [settings.flux_fast_lora_weight],
                              [settings.flux_fast_lora_weight], optional=True,
                              purpose="Hyper-FLUX.1-dev 8-step LoRA (quality_mode fast)"))
    return specs


def flux_layout(settings: Settings, which: str | None = None) -> FluxLayout:
    """FLUX.1-dev or -schnell (``which``, default TWIN_FLUX_MODEL) in ``model_dir`` or the Hugging Face cache."""
    which = which or settings.flux_model
    model_dir = Path(settings.model_dir)
    specs = flux_specs(settings, dev=which == "dev", schnell=which == "schnell")
    base_spec = specs[0]
    base, looked = _find_repo(base_spec, settings)
    missing = () if base is not None else (
        f"{base_spec.repo_id} [{base_spec.purpose}: {', '.join(base_spec.required)}] looked in: {'; '.join(looked)}",)
    fast = _find_repo(specs[1], settings)[0] if len(specs) > 1 else None
    optional = tuple(s.repo_id for s in specs[1:] if fast is None)
    return FluxLayout(profile="flux", flux_variant=which, model_dir=model_dir, model_name=base_spec.repo_id,
                      native_resolution=FLUX_RESOLUTION, base=base or model_dir / base_spec.local_name,
                      fast_lora=fast or model_dir / FLUX_FAST_DIR, fast_lora_weight=settings.flux_fast_lora_weight,
                      lora_dir=settings.resolved_lora_dir, checkpoints=model_dir / CHECKPOINT_DIR,
                      restore_dir=settings.resolved_restore_dir, missing=missing, missing_optional=optional,
                      **_flux_identity(settings, None))


def _flux_identity(settings: Settings, tiny_root: Path | None) -> dict:
    """A FLUX layout's identity-method fields: InfiniteYou's files and the face pack when it is configured."""
    if settings.ip_adapter_variant not in FAMILY_VARIANTS["flux"]:
        return {}
    return {"variant": settings.ip_adapter_variant, "infiniteyou": infiniteyou_files(settings, tiny_root),
            "face_pack": _face_pack(settings, tiny_root)}


def tiny_flux_layout(settings: Settings) -> FluxLayout:
    """The tiny folder's FLUX (tiny-flux): a FLUX.1-dev-shaped miniature in the real folder layout."""
    root = settings.resolved_tiny_model_dir
    return FluxLayout(profile="tiny", flux_variant="dev", model_dir=Path(settings.model_dir),
                      model_name=TINY_FLUX_MODEL_NAME, native_resolution=TINY_RESOLUTION, base=root / FLUX_DEV_DIR,
                      fast_lora=root / FLUX_FAST_DIR, fast_lora_weight=TINY_FLUX_FAST_WEIGHT,
                      lora_dir=root / LORA_DIR, checkpoints=root / CHECKPOINT_DIR,
                      restore_dir=Path(settings.restore_model_dir) if settings.restore_model_dir is not None
                      else root / RESTORE_DIR, **_flux_identity(settings, root))


def model_layout(settings: Settings) -> "Layout":
    """The folders of the configured profile: tiny / tiny-flux (the generated tiny folder), sdxl, flux. ``auto``
    is sdxl when its weights are found, else flux when its weights are found, else tiny (said loudly). The
    tiny folder may not be built yet: ``startup.ready_layout`` builds it before anything reads it."""
    family = {"tiny": "sdxl", "sdxl": "sdxl", "tiny-flux": "flux", "flux": "flux"}.get(settings.model_profile)
    if family is not None:
        check_variant_family(settings, family)
    layout = _profile_layout(settings)
    check_variant_family(settings, layout.family)
    return layout


def check_variant_family(settings: Settings, family: str) -> None:
    """ConfigError at start-up when TWIN_IP_ADAPTER_VARIANT is another family's identity method."""
    v = settings.ip_adapter_variant
    if v in FAMILY_VARIANTS[family] or (family == "flux" and v == DEFAULT_IDENTITY_VARIANT):
        return
    other = "flux" if family == "sdxl" else "sdxl"
    profiles = "flux or tiny-flux" if other == "flux" else "sdxl or tiny"
    raise ConfigError(f"TWIN_IP_ADAPTER_VARIANT={v} is an identity method of the {other} family, but the base model "
                      f"(TWIN_MODEL_PROFILE={settings.model_profile}) is {family}: set TWIN_IP_ADAPTER_VARIANT to "
                      f"{' or '.join(FAMILY_VARIANTS[family])}, or TWIN_MODEL_PROFILE to {profiles}")


def _profile_layout(settings: Settings) -> "Layout":
    profile = settings.model_profile
    if profile == "tiny":
        return tiny_layout(settings)
    if profile == "tiny-flux":
        return tiny_flux_layout(settings)
    if profile == "flux":
        return flux_layout(settings)
    sdxl = sdxl_layout(settings)
    if profile == "auto" and sdxl.missing:
        flux = flux_layout(settings)
        if not flux.missing:
            return flux
        log.warning("=" * 70 + "\nNO REAL MODEL WEIGHTS FOUND in %s or the Hugging Face cache: using the TINY DEMO "
                    "model. Its outputs are NOT portraits. Run `python model_loader.py download` for real weights.\n"
                    + "=" * 70, settings.model_dir)
        return tiny_layout(settings)
    return sdxl


def _sdxl_variant(settings: Settings) -> str:
    """The configured variant for an SDXL layout; a FLUX-only one (refused by ``check_variant_family`` when
    SDXL is the model to start) reads as the default so the catalogue can still describe SDXL folders."""
    v = settings.ip_adapter_variant
    return v if v in FAMILY_VARIANTS["sdxl"] else DEFAULT_IDENTITY_VARIANT


def tiny_layout(settings: Settings) -> ModelLayout:
    root = settings.resolved_tiny_model_dir
    variant = _sdxl_variant(settings)
    return ModelLayout(
        profile="tiny", variant=variant, model_dir=Path(settings.model_dir), model_name=TINY_MODEL_NAME,
        native_resolution=TINY_RESOLUTION, base=root / BASE_DIR, fp16=False,
        adapter_repo=root / ADAPTER_FILES[variant][0], adapter_weight=tiny_adapter_weight(variant),
        encoder_repo=root / IPA_DIR, lightning=root / LIGHTNING_DIR, lightning_weight=LIGHTNING_WEIGHT_TINY,
        lora_dir=root / LORA_DIR, checkpoints=root / CHECKPOINT_DIR,
        restore_dir=Path(settings.restore_model_dir) if settings.restore_model_dir is not None else root / RESTORE_DIR,
        face_pack=_face_pack(settings, tiny_root=root), vae_fix=root / VAE_FIX_DIR if settings.vae_fp16_fix else None)


def sdxl_layout(settings: Settings) -> ModelLayout:
    """The sdxl profile's folders: each repo in ``model_dir`` or the Hugging Face cache (never fetched here)."""
    model_dir = Path(settings.model_dir)
    found: dict[str, Path] = {}
    missing, optional_missing = [], []
    for spec in repo_specs(settings):
        path, looked = _find_repo(spec, settings)
        found[spec.local_name] = path or model_dir / spec.local_name
        if path is None and spec.optional:
            optional_missing.append(spec.repo_id)
        elif path is None:
            missing.append(f"{spec.repo_id} [{spec.purpose}: {', '.join(spec.required)}] looked in: {'; '.join(looked)}")
    variant = _sdxl_variant(settings)
    repo = ADAPTER_FILES[variant][0]
    return ModelLayout(
        profile="sdxl", variant=variant, model_dir=model_dir, model_name=settings.sdxl_model_id,
        native_resolution=SDXL_RESOLUTION, base=found[BASE_DIR], fp16=True,
        adapter_repo=found.get(repo, model_dir / repo), adapter_weight=ADAPTER_FILES[variant][2],
        encoder_repo=found.get(IPA_DIR, model_dir / IPA_DIR), lightning=found[LIGHTNING_DIR],
        lightning_weight=settings.lightning_weight, lora_dir=settings.resolved_lora_dir,
        checkpoints=model_dir / CHECKPOINT_DIR, restore_dir=settings.resolved_restore_dir,
        face_pack=_face_pack(settings, tiny_root=None), missing=tuple(missing),
        missing_optional=tuple(optional_missing), vae_fix=found.get(VAE_FIX_DIR))


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


def _face_pack(settings: Settings, tiny_root: Path | None) -> Path:
    """TWIN_INSIGHTFACE_MODEL_DIR, else the default pack folder; on the tiny profile, when that holds no pack,
    the tiny folder's stand-in pack."""
    if settings.insightface_model_dir is not None:
        return Path(settings.insightface_model_dir)
    default = settings.resolved_insightface_dir
    if tiny_root is None or any(default.glob("*.onnx")) or (default / default.name).is_dir():
        return default
    return tiny_root / ANTELOPE_DIR


def resolve_sdxl(settings: Settings) -> ModelLayout:
    """The sdxl profile's layout, or ModelWeightsMissing naming what, where, and the command."""
    return sdxl_layout(settings).require()


def sdxl_weights_present(settings: Settings) -> bool:
    return not sdxl_layout(settings).missing


def choose_profile(settings: Settings) -> str:
    """Where the configured model's weights come from: sdxl | flux | tiny (tiny-flux is the tiny folder too)."""
    return model_layout(settings).profile


def native_resolution(settings: Settings) -> int:
    """The native side of the configured profile's base model (known without loading it)."""
    return model_layout(settings).native_resolution


def checkpoint_dir(settings: Settings) -> Path:
    """Where single-file base checkpoints live: <tiny>/checkpoints on the tiny profile, else <model_dir>/checkpoints."""
    return model_layout(settings).checkpoints


def base_model_name(settings: Settings) -> str:
    return model_layout(settings).model_name


def list_base_models(settings: Settings) -> dict[str, BaseModel]:
    """Every base model available locally, of either family: the configured one first, then the other
    diffusers folders found (the tiny folder holds tiny-sdxl and tiny-flux; real profiles: the sdxl base and
    FLUX.1-dev / -schnell when downloaded), then the single-file checkpoints, each with the family its keys
    name (one whose keys name neither, or cannot be read, is taken for the configured family: its load then
    fails naming the file, and ``verify`` names the problem)."""
    layout = model_layout(settings)
    # A FLUX-only identity method: the SDXL folders are not offered (they cannot load with it).
    sdxl_ok = settings.ip_adapter_variant not in FAMILY_VARIANTS["flux"]
    if layout.profile == "tiny":
        tiny = ([tiny_layout(settings)] if sdxl_ok else []) + [tiny_flux_layout(settings)]
        folders: list[Layout] = [layout] + [x for x in tiny if x.model_name != layout.model_name]
    else:
        others = ([sdxl_layout(settings)] if sdxl_ok else []) + [flux_layout(settings, "dev"),
                                                                 flux_layout(settings, "schnell")]
        folders = [layout] + [x for x in others if not x.missing and x.model_name != layout.model_name]
    out = {x.model_name: BaseModel(x.model_name, x.family, x) for x in folders}
    if layout.checkpoints.is_dir():
        for f in sorted(layout.checkpoints.glob("*.safetensors")):
            family = checkpoint_family(f) or layout.family
            if f.stem not in out:
                out[f.stem] = BaseModel(f.stem, family, _checkpoint_layout(family, f, folders, settings), f)
    return out


def _checkpoint_layout(family: str, f: Path, folders: list[Layout], settings: Settings) -> Layout:
    """The folder whose configs a single-file checkpoint loads against: its family's; for FLUX the dev folder
    for a guidance-distilled transformer, else schnell's (their transformer configs differ in guidance_embeds)."""
    if family == "sdxl":
        return next((x for x in folders if x.family == "sdxl"), None) or sdxl_layout(settings)
    want = "dev" if flux_is_guidance_distilled(f) else "schnell"
    found = [x for x in folders if isinstance(x, FluxLayout)]
    return next((x for x in found if x.flux_variant == want), None) or \
        (found[0] if found and found[0].profile == "tiny" else flux_layout(settings, want))


def list_checkpoints(settings: Settings) -> dict[str, Path | None]:
    """Base models available locally: name -> single-file path (None: a diffusers folder)."""
    return {name: m.file for name, m in list_base_models(settings).items()}
