"""Fetching weights on a connected machine: the sdxl profile's hub repos (exactly the files ``layout.repo_specs``
names, fp16 weight files only), FLUX.1-dev / -schnell (only the diffusers folders, ``layout.flux_specs``), and
the face restoration ONNX exports."""
from __future__ import annotations

import logging
from pathlib import Path

from utils.config import Settings
from utils.models.layout import flux_specs, repo_specs

log = logging.getLogger("twin.models")


def download(settings: Settings, *, faceid: bool = False, lightning: bool = True, instantid: bool = False,
             faceid_plusv2: bool = False, vae_fix: bool | None = None, snapshot_download=None) -> list[Path]:
    """Fetch exactly what the sdxl profile needs into ``settings.model_dir`` (fp16 weight files only);
    ``vae_fix``: the fp16-fix VAE too (default: when TWIN_VAE_FP16_FIX is on)."""
    return _fetch(repo_specs(settings, faceid=faceid, lightning=lightning, instantid=instantid,
                             faceid_plusv2=faceid_plusv2, vae_fix=vae_fix), settings, snapshot_download)


def download_flux(settings: Settings, *, dev: bool = False, schnell: bool = False, fast_lora: bool = True,
                  snapshot_download=None) -> list[Path]:
    """FLUX.1-dev and/or -schnell: only model_index.json and the component folders (not the repos' root
    single files: the same weights again), and for dev the 8-step LoRA (``fast_lora``). FLUX.1-dev is gated:
    accept its licence on the hub and log in (``hf auth login`` or HF_TOKEN) first."""
    return _fetch(flux_specs(settings, dev=dev, schnell=schnell, fast_lora=fast_lora), settings, snapshot_download)


def _fetch(specs, settings: Settings, snapshot_download=None) -> list[Path]:
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    out = []
    for spec in specs:
        target = Path(settings.model_dir) / spec.local_name
        log.info("downloading %s (%s) -> %s", spec.repo_id, spec.purpose, target)
        snapshot_download(repo_id=spec.repo_id, allow_patterns=spec.allow_patterns, local_dir=str(target))
        out.append(target)
    return out


def download_classifier(settings: Settings, snapshot_download=None) -> Path:
    """The NSFW image classifier of the output safety check (utils/safety/classifier.py: Falconsai's ViT,
    Apache-2.0, 343 MB) into TWIN_SAFETY_MODEL_DIR (default <model_dir>/nsfw_image_detection)."""
    from utils.safety.classifier import DOWNLOAD, FILES
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    target = settings.resolved_safety_model_dir
    log.info("downloading %s (%s, licence %s) -> %s", settings.safety_model_repo, DOWNLOAD.purpose, DOWNLOAD.licence,
             target)
    snapshot_download(repo_id=settings.safety_model_repo, allow_patterns=list(FILES), local_dir=str(target))
    return target


def download_infiniteyou(settings: Settings, stage: str | None = None, snapshot_download=None,
                          urlretrieve=None) -> list[Path]:
    """InfiniteYou for FLUX (``ByteDance/InfiniteYou``, weights CC BY-NC 4.0): one stage's InfuseNet folder and
    image_proj_model.bin, and the antelopev2 pack the repo carries (``supports/insightface/models/antelopev2``,
    non-commercial), copied to where the face service looks (<model_dir>/insightface/antelopev2); plus
    facexlib's IR-SE50 ArcFace weights from its GitHub release (not on the hub)."""
    import shutil
    from utils.models.infiniteyou import ARCFACE_URL, INFU_DIR, INFU_VERSION_DIR, infiniteyou_files
    if snapshot_download is None:
        from huggingface_hub import snapshot_download
    if urlretrieve is None:
        from urllib.request import urlretrieve
    stage = stage or settings.infiniteyou_model
    files = infiniteyou_files(settings.replace(infiniteyou_model=stage))
    pack_src = "supports/insightface/models/antelopev2"
    target = Path(settings.model_dir) / INFU_DIR
    log.info("downloading %s (%s, CC BY-NC 4.0) -> %s", settings.infiniteyou_repo, stage, target)
    snapshot_download(repo_id=settings.infiniteyou_repo, local_dir=str(target),
                      allow_patterns=[f"{INFU_VERSION_DIR}/{stage}/*", f"{INFU_VERSION_DIR}/{stage}/**",
                                      f"{pack_src}/*"])
    out = [files.stage_dir]
    pack = Path(settings.model_dir) / "insightface" / "antelopev2"
    if (target / pack_src).is_dir():
        pack.mkdir(parents=True, exist_ok=True)
        for f in (target / pack_src).glob("*.onnx"):
            shutil.copy2(f, pack / f.name)
        out.append(pack)
    if not files.arcface.is_file():
        files.arcface.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading IR-SE50 ArcFace %s -> %s", ARCFACE_URL, files.arcface)
        tmp = files.arcface.with_suffix(".part")
        urlretrieve(ARCFACE_URL, str(tmp))
        tmp.replace(files.arcface)
    out.append(files.arcface)
    return out


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
