"""All settings of the service, in one place.

Every setting is read from an environment variable ``TWIN_<NAME>`` (upper case), has a documented
default, and is validated when the settings object is built, so a bad value stops start-up with a
message that names the variable and the value. Tests build settings directly:
``Settings(data_dir=tmp_path, model_profile="tiny")`` or ``settings.replace(...)``.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from utils.errors import ConfigError
from utils.choices import IDENTITY_COMBINES, IDENTITY_VARIANTS, INFINITEYOU_STAGES, RESTORE_MODEL_NAMES, face_pack

ENV_PREFIX = "TWIN_"
TEST_PREFIX = "TWIN_TEST_"


def _setting(default: Any, doc: str, choices: tuple | None = None, lo: float | None = None,
             hi: float | None = None) -> Any:
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class _Derived:
    """Values computed from the declared settings, and the ways settings are built and listed: kept apart
    from the declarations in Settings so the list of settings reads as one table."""

    @property
    def resolved_tiny_model_dir(self) -> Path:
        return self.tiny_model_dir or self.data_dir / "tiny-model"

    @property
    def resolved_restore_dir(self) -> Path:
        return self.restore_model_dir or self.model_dir / "face_restore"

    @property
    def resolved_lora_dir(self) -> Path:
        return self.lora_dir or self.model_dir / "loras"

    @property
    def resolved_styles_file(self) -> Path:
        return self.styles_file or Path(__file__).resolve().parent.parent / "styles" / "styles.json"

    @property
    def resolved_safety_model_dir(self) -> Path:
        return self.safety_model_dir or self.model_dir / "nsfw_image_detection"

    @property
    def resolved_safety_terms_file(self) -> Path:
        return self.safety_terms_file or Path(__file__).resolve().parent.parent / "safety" / "terms.json"

    @property
    def c2pa_dev_dir(self) -> Path:
        """Where the development CA and signer are made when no certificate is configured."""
        return self.data_dir / "c2pa"

    @property
    def resolved_insightface_dir(self) -> Path:
        return self.insightface_model_dir or self.model_dir / "insightface" / face_pack(self.ip_adapter_variant)

    @property
    def cluster(self) -> bool:
        """Cluster mode: jobs on RQ in the Redis at TWIN_QUEUE_URL (else local mode)."""
        return bool(self.queue_url)

    @property
    def retry_backoff_list(self) -> list[int]:
        try:
            out = [int(x) for x in self.retry_backoff.split(",") if x.strip()]
        except ValueError:
            out = [-1]
        if not out or min(out) < 0:
            raise ConfigError(f"TWIN_RETRY_BACKOFF={self.retry_backoff!r} is not a comma-separated list of "
                              "non-negative whole seconds")
        return out

    @property
    def resolved_compile_cache_dir(self) -> Path:
        return self.compile_cache_dir or self.data_dir / "compile-cache"

    @property
    def compile_mode(self) -> str:
        """TWIN_COMPILE, or "full" from the deprecated TWIN_TORCH_COMPILE=1 while TWIN_COMPILE is off."""
        return "full" if self.compile == "off" and self.torch_compile else self.compile

    @property
    def compile_warmup_shapes(self) -> list[tuple[int, int, int]]:
        """TWIN_COMPILE_WARMUP as (width, height, batch) triples; [] = the native square, batch 1."""
        out = []
        for part in (p.strip() for p in self.compile_warmup.split(",")):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", part)
            if not m or int(m[1]) % 8 or int(m[2]) % 8 or not 1 <= int(m[3]) <= 4:
                raise ConfigError(f"TWIN_COMPILE_WARMUP: {part!r} is not WIDTHxHEIGHTxBATCH (sides multiples of "
                                  "8, batch 1-4), e.g. 1024x1024x1")
            out.append((int(m[1]), int(m[2]), int(m[3])))
        return out

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def admin_key_list(self) -> list[str]:
        return [k.strip() for k in self.admin_keys.split(",") if k.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def is_loopback_bind(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from ``TWIN_*`` variables; unknown ``TWIN_*`` names are an error (typos).
        ``TWIN_TEST_*`` variables belong to the test suite (e.g. TWIN_TEST_S3_URL), not to the service."""
        environ = os.environ if environ is None else environ
        known = {env_name(f.name): f for f in fields(cls)}
        unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known
                         and not k.startswith(TEST_PREFIX))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; known: see README 'Settings'")
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name in environ:
                values[f.name] = _parse(name, environ[name], f)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def documented(cls) -> list[tuple[str, Any, str]]:
        """(variable, default, doc) rows, for the README table and `python -m utils.config`."""
        rows = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((env_name(f.name), default, f.metadata["doc"]))
        return rows


@dataclass(frozen=True)
class Settings(_Derived):
    # --- where things live -------------------------------------------------------------------
    data_dir: Path = _setting(Path("twin_data"), "Runtime data: sessions, outputs, jobs.db (with TWIN_STORAGE_URL: jobs.db and the bucket's local cache only).")
    model_dir: Path = _setting(Path("models"), "Local folder holding real weights (see `python model_loader.py download`).")
    tiny_model_dir: Path | None = _setting(None, "Folder of the tiny offline model; default <data_dir>/tiny-model, built on first start.")

    # --- storage: sessions, identities, outputs (docs/ARCHITECTURE.md "Storage") --------------------
    storage_url: str = _setting("", "Where sessions, selfies, identities and outputs are kept: empty = the data folder (TWIN_DATA_DIR); s3://BUCKET/PREFIX = an S3-compatible bucket that every API node and GPU worker shares (no shared volume needed). Credentials and region come from boto3's own chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, the instance role; AWS_REGION). The job database of local mode (jobs.db) stays in TWIN_DATA_DIR either way.")
    s3_endpoint_url: str = _setting("", "S3 endpoint of a non-AWS bucket (MinIO http://HOST:9000, Cloudflare R2, Backblaze B2 ...); empty = AWS.")
    s3_addressing_style: str = _setting("auto", "Bucket addressing: auto, path (HOST/BUCKET/KEY: MinIO and most self-hosted servers) or virtual (BUCKET.HOST/KEY).",
                                        choices=("auto", "path", "virtual"))
    s3_sse: str = _setting("", "Server-side encryption of every object written: empty = the bucket's default; AES256 (SSE-S3); aws:kms (SSE-KMS with the account's key); else a KMS key id or ARN (SSE-KMS with that key).")
    s3_max_attempts: int = _setting(3, "Attempts of one bucket request (botocore's standard retry mode: 503 SlowDown, 5xx and connection errors are retried with backoff); after the last: 503 storage_unavailable with Retry-After at upload and submit, a running job fails with that code.", lo=1, hi=20)
    download_redirect: bool = _setting(False, "With an S3 bucket: GET /download answers 302 to a presigned URL of the object (owner checked first; Content-Disposition kept) instead of streaming it through the API.")
    presign_seconds: int = _setting(300, "How long a presigned download URL stays valid, seconds (TWIN_DOWNLOAD_REDIRECT=1).", lo=1, hi=604800)
    storage_cache_mb: float = _setting(512.0, "With an S3 bucket: size of this machine's cache of what a process reads from the bucket (face features, crops, identities, start pictures) in <data_dir>/storage-cache; least recently used copies go first; shared safely by the processes of one machine.", lo=1.0)

    # --- web server --------------------------------------------------------------------------
    host: str = _setting("127.0.0.1", "Address gunicorn binds to.")
    port: int = _setting(5000, "Port gunicorn binds to.", lo=1, hi=65535)
    cors_origins: str = _setting("", "Comma-separated origins allowed by CORS; empty disables CORS.")
    log_level: str = _setting("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    api_keys: str = _setting("", "Comma-separated API keys for `Authorization: Bearer`. Required unless bound to loopback.")
    admin_keys: str = _setting("", "Comma-separated admin keys (`Authorization: Bearer`) allowed to switch the base model (POST /models/load); empty: switching is off (403).")
    allow_anonymous: bool = _setting(False, "Serve without API keys on a non-loopback bind (per-client tokens only). Off: refuse to start.")
    rate_limit_upload: str = _setting("30/minute", "Upload rate limit per API key, or per client address without keys (flask-limiter syntax, e.g. '30/minute;300/hour'); over it: 429 with Retry-After.")
    rate_limit_generate: str = _setting("60/minute", "Generate rate limit per API key, or per client address without keys (flask-limiter syntax); over it: 429 with Retry-After.")

    # --- models ------------------------------------------------------------------------------
    model_profile: str = _setting("auto", "Which base model the service starts on: sdxl or flux (real weights, see `python model_loader.py download`, with --flux-dev or --flux-schnell for FLUX); tiny or tiny-flux (the tiny offline SDXL / FLUX, built on first start); auto: sdxl when its weights are present, else flux when its weights are present, else tiny. POST /models/load switches between every base model found (GET /models), of either family.",
                                  choices=("auto", "sdxl", "flux", "tiny", "tiny-flux"))
    ip_adapter_variant: str = _setting("plus-face", "Identity adapter: plus-face (CLIP features of the face crops), plain, faceid (ArcFace), faceid-plusv2 (ArcFace + CLIP, non-commercial), instantid (ArcFace + IdentityNet ControlNet with pose control; weights research-only) for SDXL; infiniteyou (IR-SE50 ArcFace + InfuseNet ControlNet with pose control; weights CC BY-NC 4.0) for FLUX. faceid, faceid-plusv2, instantid and infiniteyou need the InsightFace face backend.",
                                       choices=IDENTITY_VARIANTS)
    identity_combine: str = _setting("average", "How per-selfie embeddings become one identity.", choices=IDENTITY_COMBINES)
    device: str = _setting("auto", "auto | cuda | cpu | cuda:N.")
    dtype: str = _setting("auto", "auto (on CUDA fp16 for SDXL and bf16 for FLUX; fp32 on CPU) | float16 | bfloat16 | float32.",
                          choices=("auto", "float16", "bfloat16", "float32"))
    default_identity_strength: float = _setting(0.7, "IP-Adapter scale when a request names none.", lo=0.0, hi=2.0)
    max_image_side: int = _setting(1536, "Largest width/height a request may ask for (multiple of 8).", lo=64, hi=4096)
    min_image_side: int = _setting(64, "Smallest width/height a request may ask for.", lo=8, hi=4096)

    # --- generation ----------------------------------------------------------------------------
    sdxl_model_id: str = _setting("stabilityai/stable-diffusion-xl-base-1.0", "Hub id of the SDXL base model (fp16 variant is used).")
    ip_adapter_repo: str = _setting("h94/IP-Adapter", "Hub id holding the Plus-Face / plain SDXL adapters and the ViT-H image encoder.")
    faceid_repo: str = _setting("h94/IP-Adapter-FaceID", "Hub id of the FaceID / FaceID Plus v2 SDXL adapters (non-commercial licence).")
    instantid_repo: str = _setting("InstantX/InstantID", "Hub id of InstantID (IdentityNet ControlNet + ip-adapter.bin; weights marked research-only).")
    infiniteyou_repo: str = _setting("ByteDance/InfiniteYou", "Hub id of InfiniteYou for FLUX (InfuseNet + image_proj_model.bin per stage; weights CC BY-NC 4.0).")
    infiniteyou_model: str = _setting("aes_stage2", "InfiniteYou weight set: sim_stage1 (higher face similarity) or aes_stage2 (better aesthetics and text alignment; the reference default).", choices=INFINITEYOU_STAGES)
    arcface_file: Path | None = _setting(None, "IR-SE50 ArcFace weights (facexlib's recognition_arcface_ir_se50.pth) for infiniteyou; default <model_dir>/facexlib/recognition_arcface_ir_se50.pth.")
    lightning_repo: str = _setting("ByteDance/SDXL-Lightning", "Hub id of the few-step LoRA used by quality_mode=fast.")
    lightning_weight: str = _setting("sdxl_lightning_4step_lora.safetensors", "File name of the few-step LoRA in lightning_repo.")
    lora_dir: Path | None = _setting(None, "Folder of style LoRAs (<name>.safetensors) of either family, each told apart by its keys (GET /loras shows the family); default <model_dir>/loras.")
    train_checkpoint_every: int = _setting(50, "Twin LoRA training (POST /sessions/<id>/train): a checkpoint every this many optimiser steps, so a retry after a killed worker resumes there.", lo=1)
    twin_lora_cache: int = _setting(4, "Trained twin LoRAs held loaded per base model (least recently used ones are unloaded); each generation activates only its own session's.", lo=1)
    flux_model: str = _setting("dev", "Which FLUX.1 the flux profile starts on: dev (FLUX.1-dev, guidance-distilled, non-commercial licence) or schnell (FLUX.1-schnell, 4 steps, Apache-2.0). Both, when downloaded, are in GET /models.",
                               choices=("dev", "schnell"))
    flux_dev_id: str = _setting("black-forest-labs/FLUX.1-dev", "Hub id of FLUX.1-dev (gated: accept its licence on the hub, then download with a token).")
    flux_schnell_id: str = _setting("black-forest-labs/FLUX.1-schnell", "Hub id of FLUX.1-schnell.")
    flux_fast_lora_repo: str = _setting("ByteDance/Hyper-SD", "Hub id of the 8-step LoRA for FLUX.1-dev that quality_mode=fast uses (Hyper-FLUX).")
    flux_fast_lora_weight: str = _setting("Hyper-FLUX.1-dev-8steps-lora.safetensors", "File name of that LoRA in flux_fast_lora_repo.")
    flux_memory: str = _setting("auto", "How FLUX is held on the GPU: full (bf16, ~34 GB at 1024² on an H100), quantized (weight-only int8/fp8 through torchao, else nf4 through bitsandbytes: transformer and T5), offload (diffusers' model CPU offload: each component on the GPU only while it runs), auto (full when the GPU has room, else quantized when a backend is installed, else offload). /system-status says which was chosen and why. The CPU always runs full.",
                                choices=("auto", "full", "quantized", "offload"))
    styles_file: Path | None = _setting(None, "Style presets (JSON, see styles/styles.json); default styles/styles.json beside the code. Read at start-up: a broken file stops it.")
    channels_last: bool = _setting(False, "CUDA: put UNet and VAE in channels_last memory format.")
    fuse_qkv: bool = _setting(False, "CUDA: fuse attention QKV projections.")
    torch_compile: bool = _setting(False, "Deprecated alias of TWIN_COMPILE=full (used only while TWIN_COMPILE is off).")
    vae_tiling: bool = _setting(False, "Decode latents in tiles (lower peak memory at large sizes, a little slower).")
    max_steps: int = _setting(0, "Cap on denoising steps per request (0 = quality table as is); for demos on a CPU.", lo=0, hi=200)

    # --- speed (docs/ARCHITECTURE.md "Speed plan"; /system-status optimizations) ---------------------
    compile: str = _setting("off", "torch.compile of the SDXL UNet: off; regional (each repeated transformer block, diffusers' compile_repeated_blocks: warms up in seconds, most of the gain); full (the whole UNet and the VAE decoder, max-autotune with CUDA graphs on a GPU: slowest warm-up, fastest steps). Warm-up runs in set-up (/health says warming) for TWIN_COMPILE_WARMUP.",
                            choices=("off", "regional", "full"))
    compile_cache_dir: Path | None = _setting(None, "Compiled kernels kept across restarts (one sub-folder per torch version and device; another torch's or GPU's is ignored); default <data_dir>/compile-cache.")
    compile_max_recompiles: int = _setting(8, "Recompiles a compiled block may make for new sizes/batches at run time; past it that shape runs eager.", lo=0, hi=64)
    compile_warmup: str = _setting("", "Shapes compiled in set-up, comma-separated WIDTHxHEIGHTxBATCH (e.g. 1024x1024x1,1024x1024x4), each with and without CFG; empty: the native square, batch 1.")
    quantize: str = _setting("none", "Dynamic quantization of the SDXL UNet's linear layers through torchao (requirements-gpu.txt): none; int8 (int8 weights and activations: Ampere and the CPU); fp8 (row-wise fp8: GPUs with fp8 units, compute capability 8.9+: Ada, Hopper; refused elsewhere); auto (fp8 on 8.9+, int8 on 8.0+, else none). Identity adapter and LoRA layers stay unquantized.",
                             choices=("none", "auto", "fp8", "int8"))
    vae_fp16_fix: bool = _setting(False, "Use the fp16-fix SDXL VAE (madebyollin/sdxl-vae-fp16-fix, `python model_loader.py download --vae-fp16-fix`) so the VAE decodes in fp16 without the fp32 upcast (and without black images).")
    vae_fp16_fix_repo: str = _setting("madebyollin/sdxl-vae-fp16-fix", "Hub id of the fp16-fix SDXL VAE (TWIN_VAE_FP16_FIX).")
    vae_slicing: bool = _setting(False, "Decode a batch one image at a time (lower peak memory at batch 4).")
    step_cache: int = _setting(0, "DeepCache-style step caching: with k >= 2 the UNet's deep blocks run every k-th step and the other steps reuse their features (only the outer blocks run); 0 or 1: off. Faster, slightly different images (bench/bench_speed.py prints the difference).", lo=0, hi=10)

    # --- faces -------------------------------------------------------------------------------
    face_backend: str = _setting("auto", "auto | dlib | insightface (auto: insightface when its pack is present).",
                                 choices=("auto", "dlib", "insightface"))
    insightface_model_dir: Path | None = _setting(None, "Folder of the InsightFace model pack; default <model_dir>/insightface/antelopev2 for instantid / faceid-plusv2 (the nested antelopev2/antelopev2/*.onnx unzip is accepted), else <model_dir>/insightface/buffalo_l. Tiny profile without a pack: the tiny stand-in pack.")
    min_face_px: int = _setting(80, "Smallest face box side in pixels of the uploaded photo (large photos are checked on a reduced copy; the side is scaled back to the photo's pixels).", lo=1)
    min_face_fraction: float = _setting(0.02, "Smallest face box area as a share of the image.", lo=0.0, hi=1.0)
    min_sharpness: float = _setting(40.0, "Smallest variance of the Laplacian on the face box resized to 128 px (measured: sharp photos 110-220, Gaussian blur radius 1 gives ~20, radius 2 ~5).", lo=0.0)
    min_brightness: float = _setting(40.0, "Darkest mean face luminance (0-255).", lo=0.0, hi=255.0)
    max_brightness: float = _setting(220.0, "Brightest mean face luminance (0-255).", lo=0.0, hi=255.0)
    max_yaw_degrees: float = _setting(35.0, "Largest estimated head yaw.", lo=0.0, hi=90.0)
    duplicate_threshold: float = _setting(0.995, "Correlation of 32x32 grey thumbnails above which two selfies are near-duplicates (re-encoded/resized copies score >0.9999, distinct crops/flips of one photo <0.97).", lo=0.0, hi=1.0)
    outlier_distance_dlib: float = _setting(0.4, "dlib distance (unit-length descriptors) from the set's median above which a selfie is another person; dlib's usual 0.6 on raw descriptors (norm ~1.45) is ~0.41 here.", lo=0.0)
    outlier_distance_arcface: float = _setting(1.0, "ArcFace (normalised) distance from the median above which a selfie is another person.", lo=0.0)
    recommended_selfies: int = _setting(10, "Below this many accepted selfies, warn that likeness improves with more.", lo=1)
    face_detect_side: int = _setting(640, "Face detection runs on a copy whose longest side is this (dlib HOG; InsightFace det_size).", lo=160, hi=4096)
    face_crop_size: int = _setting(512, "Side of the aligned face crop given to the IP-Adapter image encoder, px.", lo=64, hi=2048)
    face_crop_scale: float = _setting(1.8, "Face crop side as a multiple of the detected face box side (context around the face).", lo=1.0, hi=4.0)
    dlib_min_detect_score: float = _setting(0.5, "Lowest dlib HOG detection score counted as a face (measured: real faces 0.85-1.7, spurious boxes on clothing up to 0.3).", lo=-1.0, hi=5.0)
    face_descriptor: str = _setting("torch", "Engine of the dlib backend's 128-d descriptor net: torch (same weights, output equal to dlib's to ~1e-7; measured 8 vs 75 ms per face: the dlib-bin wheel has no BLAS) or dlib.",
                                    choices=("torch", "dlib"))
    face_threads: int = _setting(2, "Threads decoding and checking the selfies of one upload in parallel (HOG and the torch descriptor release the GIL).", lo=1, hi=32)

    # --- uploads and limits ------------------------------------------------------------------
    max_selfies: int = _setting(50, "Most files in one upload.", lo=1, hi=1000)
    max_file_mb: float = _setting(20.0, "Largest single uploaded file, MB.", lo=0.01)
    max_upload_mb: float = _setting(200.0, "Largest whole upload request, MB.", lo=0.01)
    max_pixels: int = _setting(40_000_000, "Largest decoded image, pixels (decompression-bomb guard).", lo=1)
    max_concurrent_uploads: int = _setting(2, "Uploads whose photos are decoded and checked at once, server-wide (photos are decoded only as large as the checks need, ~5 MB each for a 12 MP JPEG, face_threads at a time; each upload keeps its crops). A further upload waits up to upload_wait_seconds, then gets 503 busy with Retry-After.", lo=1, hi=64)
    upload_wait_seconds: float = _setting(30.0, "How long an upload waits for one of max_concurrent_uploads before 503 busy (a waiting upload holds a gunicorn thread and its request body; 50 phone photos take ~3-10 s to check on 2 cores).", lo=0.0, hi=110.0)
    max_prompt_chars: int = _setting(2000, "Longest prompt accepted.", lo=1)

    # --- jobs --------------------------------------------------------------------------------
    queue_max: int = _setting(32, "Most queued jobs; beyond it /generate answers 429.", lo=1)
    workers: int = _setting(0, "Job threads (one engine each) in local mode; 0 = one per GPU, one on CPU.", lo=0, hi=16)
    requeue_interrupted: bool = _setting(False, "Re-queue (once) jobs that were running when the server stopped, instead of failing them.")
    retention_hours: float = _setting(72.0, "Sessions older than this are deleted by the retention sweep; 0 disables it.", lo=0.0)
    retention_sweep_minutes: float = _setting(30.0, "How often the retention sweep runs.", lo=0.01)
    warmup: bool = _setting(True, "Run one throw-away generation in setup() so the first request is fast.")

    # --- security (access control, input limits) ------------------------------------------------
    max_json_kb: float = _setting(256.0, "Largest JSON request body (/generate), kB; a larger one is 413 before it is parsed.", lo=1.0)
    trusted_proxies: int = _setting(0, "Reverse proxies in front of the server (RunPod's proxy: 1) whose X-Forwarded-For is trusted to name the client; the rate limit keys anonymous callers by that address.", lo=0, hi=5)
    # --- faults and shutdown (reliability) -------------------------------------------------------
    min_free_mb: float = _setting(64.0, "Free space the data volume must keep: an upload or job that would leave less is refused with 507 insufficient_storage (the job database needs headroom to record outcomes). 0 = only a real ENOSPC/EDQUOT stops a write.", lo=0.0)
    drain_seconds: float = _setting(25.0, "On SIGTERM: how long a running job may keep going to finish; after that it is stopped at its next step and re-queued (it runs again after the restart). gunicorn's graceful_timeout is this + 10 s.", lo=0.0, hi=3600.0)

    # --- cluster mode (Redis + RQ; docs/ARCHITECTURE.md "Cluster mode") ---------------------------
    queue_url: str = _setting("", "Cluster mode: redis://HOST:PORT/DB of the Redis shared by every API node (./start_app.sh) and GPU worker (./start_worker.sh): job queue (RQ), job records, progress, rate limits. Empty: local mode (SQLite + job threads in the web process).")
    job_attempts: int = _setting(3, "Cluster: runs of a job whose worker died (SIGKILL, crash, lost machine) before it ends failed/worker_lost; a job that fails or is canceled is never re-run.", lo=1, hi=10)
    retry_backoff: str = _setting("5,20", "Cluster: seconds to wait before attempt 2, 3, ... of a job whose worker died (comma-separated; the last value repeats).")
    worker_heartbeat_seconds: float = _setting(2.0, "Cluster: how often a GPU worker renews its job's heartbeat; a job without one for 4x this is re-run elsewhere (RQ's own default is minutes).", lo=0.5, hi=60.0)
    model_load_wait_seconds: float = _setting(300.0, "Cluster: how long POST /models/load waits for the GPU workers to load the model and switch (a real SDXL checkpoint loads in about a minute); a worker still loading then is listed as pending (202) and switches when done.", lo=1.0, hi=3600.0)
    model_strand_seconds: float = _setting(10.0, "Cluster: a queued job that names a model no live GPU worker holds or is loading (its workers switched away or died) fails with model_not_loaded after this grace.", lo=0.5, hi=3600.0)

    # --- service -----------------------------------------------------------------------------
    score_outputs: bool = _setting(False, "Score each generated image's likeness to the session's faces (identity_similarity in outputs); costs one face detection + embedding per image (~40 ms on a 2-core CPU with the dlib backend, torch descriptor).")
    # --- likeness: face restoration, best-of-N -------------------------------------------------
    restore_default: bool = _setting(False, "Restore faces (GFPGAN / CodeFormer / GPEN through onnxruntime) when a request does not say restore_faces; the unrestored original is kept beside it as avatar_NNN_raw.png.")
    restore_model: str = _setting("gfpgan", "Face restoration model when a request names none: gfpgan (GFPGAN 1.4, Apache-2.0), codeformer (non-commercial licence, has restore_fidelity), gpen (GPEN-BFR-512, non-commercial).",
                                  choices=RESTORE_MODEL_NAMES)
    restore_model_dir: Path | None = _setting(None, "Folder of the restoration ONNX files (gfpgan_1.4.onnx, codeformer.onnx, gpen_bfr_512.onnx; `python model_loader.py download --restore NAME`); default <model_dir>/face_restore, with the tiny profile <tiny_model_dir>/face_restore (stand-ins).")
    switch_interval_ms: float = _setting(1.0, "Python GIL switch interval in the server process: lower keeps /status fast while a CPU-bound generation runs.", lo=0.1, hi=100.0)

    # --- live progress and integrations ----------------------------------------------------------
    max_event_streams: int = _setting(50, "Most open GET /events streams at once (each holds one gunicorn thread: keep GUNICORN_THREADS above it); beyond it 429 with Retry-After.", lo=1, hi=1000)
    event_heartbeat_seconds: float = _setting(15.0, "Seconds between comment heartbeats on an idle event stream (keeps proxies from closing it, and finds closed clients).", lo=0.05, hi=300.0)
    webhook_secret: str = _setting("", "Standard Webhooks signing secret (whsec_<base64>); empty turns webhooks off (a request naming one is a 400).")
    webhook_allow_private: bool = _setting(False, "Allow webhook targets on private, loopback or link-local addresses, and plain http (local receivers while developing). Off: SSRF guard.")
    webhook_max_attempts: int = _setting(5, "Delivery attempts per webhook message (5xx, 408, 429 and network errors are retried; 4xx never).", lo=1, hi=20)
    webhook_retry_base_seconds: float = _setting(2.0, "First retry delay; doubles with each attempt (2, 4, 8, 16 s).", lo=0.0, hi=600.0)
    webhook_timeout_seconds: float = _setting(10.0, "Timeout of one webhook delivery attempt.", lo=0.1, hi=120.0)
    idempotency_hours: float = _setting(24.0, "How long an Idempotency-Key on POST /generate or /upload replays the first answer to the same caller.", lo=0.01)
    idempotency_in_flight_seconds: float = _setting(180.0, "How long an Idempotency-Key stays 'in flight' (409) without an answer; after it a retry runs again (an API node that died mid-request cannot block its key forever). Keep above gunicorn's 120 s request timeout.", lo=0.05, hi=3600.0)

    thumbnail_side: int = _setting(256, "Longest side of the JPEG thumbnail written beside each portrait (thumbnail_url in the job JSON).", lo=32, hi=1024)

    # --- safety and provenance (docs/SAFETY.md) --------------------------------------------------
    safety_mode: str = _setting("block", "Output safety check by the NSFW image classifier: block (an image scoring at or above safety_threshold is never written or served; it counts as a rejected candidate), flag (served, marked \"flagged\" in the job JSON), off (not checked; a session held by the apparent-age gate is checked in block mode all the same).",
                                choices=("block", "flag", "off"))
    safety_threshold: float = _setting(0.5, "Classifier probability of explicit content at or above which an image is blocked (block) or flagged (flag); 0.5 is the classifier's own decision (argmax of its two labels).", lo=0.0, hi=1.0)
    safety_model_repo: str = _setting("Falconsai/nsfw_image_detection", "Hub id of the NSFW image classifier (a transformers ViT image classifier, Apache-2.0; labels normal / nsfw).")
    safety_model_dir: Path | None = _setting(None, "Folder of the NSFW image classifier (config.json, model.safetensors, preprocessor_config.json); default <model_dir>/nsfw_image_detection (else the Hugging Face cache of safety_model_repo), with the tiny profile <tiny_model_dir>/nsfw_image_detection (stand-in).")
    safety_terms_file: Path | None = _setting(None, "Explicit-term list that refuses prompts, persona traits and styles when a face identity is used (JSON, see safety/terms.json); default safety/terms.json beside the code. Read at start-up: a broken file stops it, naming the line.")
    min_apparent_age: int = _setting(21, "Apparent-age gate (InsightFace backend with the pack's genderage model): a session whose accepted selfies' median apparent age is below this is held to safety_mode=block whatever the setting (21 leaves a margin over 18 for the estimator's error; it cannot be set below 18).", lo=18, hi=100)
    c2pa_cert: Path | None = _setting(None, "PEM certificate chain (signing certificate first) for the C2PA Content Credentials on every image; ES256 (EC P-256 key) or PS256 (RSA key). Unset (with c2pa_key): a local development CA and signer are made once under <data_dir>/c2pa, and outputs read as 'untrusted'.")
    c2pa_key: Path | None = _setting(None, "PEM private key (unencrypted PKCS#8 or traditional) matching c2pa_cert's signing certificate; set both or neither.")

    # --- generator process -------------------------------------------------------------------
    generator_process: bool = _setting(True, "Run generation in a child process so the web process never waits on the GIL of the generation loop (a crashed child fails its job with worker_crashed and is restarted). Off: in-process thread, for debugging.")
    generator_nice: int = _setting(0, "Niceness added to the generator process (0-19): on a CPU-saturated box a higher value lets the web process win the CPU so /status stays fast, at the cost of generation speed; keep 0 on a GPU box.", lo=0, hi=19)

    def __post_init__(self) -> None:
        _check(self)


def _check(settings: "Settings") -> None:
    """Stops start-up on a bad value, naming the variable and the value."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        meta = f.metadata
        if f.type in ("Path", "Path | None") and value is not None and not isinstance(value, Path):
            object.__setattr__(settings, f.name, Path(value))
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{env_name(f.name)}={value!r} is not one of {', '.join(meta['choices'])}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{env_name(f.name)}={value!r} is not a finite number")
        if meta.get("lo") is not None and value < meta["lo"]:
            raise ConfigError(f"{env_name(f.name)}={value!r} is below the minimum {meta['lo']}")
        if meta.get("hi") is not None and value > meta["hi"]:
            raise ConfigError(f"{env_name(f.name)}={value!r} is above the maximum {meta['hi']}")
    if settings.min_brightness >= settings.max_brightness:
        raise ConfigError(f"TWIN_MIN_BRIGHTNESS={settings.min_brightness} must be below TWIN_MAX_BRIGHTNESS={settings.max_brightness}")
    if settings.max_image_side % 8:
        raise ConfigError(f"TWIN_MAX_IMAGE_SIDE={settings.max_image_side} must be a multiple of 8")
    if settings.storage_url and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", settings.storage_url):
        raise ConfigError(f"TWIN_STORAGE_URL={settings.storage_url!r} is not s3://BUCKET or s3://BUCKET/PREFIX "
                          "(empty: the data folder)")
    if settings.download_redirect and not settings.storage_url:
        raise ConfigError("TWIN_DOWNLOAD_REDIRECT=1 needs an S3 bucket (TWIN_STORAGE_URL=s3://...): the data "
                          "folder has no URL to redirect to")
    if settings.queue_url and not settings.queue_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"TWIN_QUEUE_URL={settings.queue_url!r} is not a redis://HOST:PORT/DB URL")
    settings.retry_backoff_list  # validates TWIN_RETRY_BACKOFF
    settings.compile_warmup_shapes  # validates TWIN_COMPILE_WARMUP
    if settings.compile == "full" and settings.step_cache > 1:
        raise ConfigError(f"TWIN_STEP_CACHE={settings.step_cache} does not work with TWIN_COMPILE=full (the cache "
                          "swaps UNet blocks between steps, which a whole-UNet graph cannot): use TWIN_COMPILE=regional")
    if (settings.c2pa_cert is None) != (settings.c2pa_key is None):
        given, other = ("TWIN_C2PA_CERT", "TWIN_C2PA_KEY") if settings.c2pa_cert is not None else ("TWIN_C2PA_KEY", "TWIN_C2PA_CERT")
        raise ConfigError(f"{given} is set but {other} is not: set both (the signing certificate chain and its key) or neither")
    if settings.device not in ("auto", "cpu", "cuda") and not (settings.device.startswith("cuda:") and settings.device[5:].isdigit()):
        raise ConfigError(f"TWIN_DEVICE={settings.device!r} is not auto, cpu, cuda or cuda:N")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse(name: str, raw: str, f: dataclasses.Field) -> Any:
    kind = f.type
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind in ("Path", "Path | None"):
            return Path(raw) if raw else None
        return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from None


if __name__ == "__main__":  # prints the settings table
    for var, default, doc in Settings.documented():
        print(f"| `{var}` | `{default}` | {doc} |")
