"""LoRA training on a loaded SDXL model (diffusers' DreamBooth-LoRA recipe, DESIGN.md §8), in place on the
modules the worker already holds: no second copy of the base model. A peft adapter is added to the UNet's
attention projections (and optionally both text encoders), trained on latents and text embeddings that are
computed once, then taken off again: the serving pipeline carries no trace of it afterwards (no adapter,
no gradient checkpointing, the same ``requires_grad`` and dtypes as before).

fp32 on CPU; on a GPU bf16 autocast with fp32 LoRA weights, gradient checkpointing and 8-bit AdamW when
bitsandbytes imports. A checkpoint every ``spec.checkpoint_every`` steps lets a retry of a killed run resume
at that step (``files.load_checkpoint``)."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import time
from pathlib import Path
from typing import Any, Callable

from utils.engine.training import files
from utils.engine.training.data import training_images
from utils.errors import Conflict, InvalidRequest, JobCanceled

ADAPTER = "twin_training"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@contextlib.contextmanager
def one_writer(work_dir: Path):
    """An exclusive lock on the run's folder: two processes never train into the same files."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / files.LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict("another process is training this session's twin now",
                           code="training_running") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def train(model, spec, on_progress: Callable | None = None, should_cancel: Callable[[], bool] | None = None) -> dict:
    """Train ``spec`` on ``model`` (an SdxlModel) under its call lock; returns the training record (also
    written as record.json beside twin_lora.safetensors in ``spec.work_dir``)."""
    work_dir = Path(spec.work_dir)
    resolution = spec.resolution or model.models.native_resolution
    spec = dataclasses.replace(spec, resolution=resolution,
                               images=list(spec.images) + training_images(spec.faces, resolution))
    if not spec.images:
        raise InvalidRequest("no training pictures: the session has no accepted selfie", code="no_selfies")
    with one_writer(work_dir), model.lock:
        t0 = time.perf_counter()
        pipe = model.models.pipe
        batch = _cache(model, spec)
        cache_s = time.perf_counter() - t0
        modules = _modules(pipe, spec.request.train_text_encoder)
        saved = _attach(modules, spec.request.rank, model.models.device, spec.request.seed)
        try:
            losses, resumed, opt_name = _loop(model, spec, modules, batch, on_progress, should_cancel)
            layers = _lora_layers(modules)
        finally:
            _detach(modules, saved)
        sizes = files.save_lora(work_dir, layers.get("unet"), layers.get("text_encoder"), layers.get("text_encoder_2"))
        record = _record(model, spec, losses, resumed, opt_name, cache_s, time.perf_counter() - t0, sizes,
                         sum(int(t.numel()) for d in layers.values() for t in d.values()))
        files.write_record(work_dir, record)
        files.remove_run_files(work_dir, keep_result=True)
        return record


# --- the batch, computed once ------------------------------------------------------------------------

def _pixels(images, device, dtype):
    import numpy as np
    import torch
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device=device, dtype=dtype)


def _cache(model, spec) -> dict[str, Any]:
    """Latents of every training picture (VAE in fp32: SDXL's overflows in fp16), the caption's embeddings
    (unless the text encoders train), the SDXL size conditioning and the identity adapter's null input."""
    import torch
    m = model.models
    pipe, vae = m.pipe, m.pipe.vae
    vae_dtype = vae.dtype
    if vae_dtype != torch.float32:
        vae.to(torch.float32)
    try:
        with torch.no_grad():
            chunks = [vae.encode(_pixels(spec.images[i:i + 4], m.device, torch.float32)).latent_dist.mean
                      for i in range(0, len(spec.images), 4)]
    finally:
        if vae_dtype != torch.float32:
            vae.to(vae_dtype)
    latents = torch.cat(chunks) * vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents - vae.config.shift_factor * vae.config.scaling_factor
    out: dict[str, Any] = {"latents": latents.float()}
    if not spec.request.train_text_encoder:
        with torch.no_grad():
            out["text"] = _encode_text(pipe, spec.caption, m.device)
    r = spec.resolution
    proj = int(pipe.text_encoder_2.config.projection_dim)
    out["time_ids"] = pipe._get_add_time_ids((r, r), (0, 0), (r, r), dtype=torch.float32,
                                             text_encoder_projection_dim=proj).to(m.device)
    out["image_embeds"] = _null_image_embeds(model)
    return out


def _encode_text(pipe, caption: str, device):
    embeds, _, pooled, _ = pipe.encode_prompt(caption, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


def _null_image_embeds(model):
    """A UNet with an IP-Adapter loaded needs image embeds: the adapter's zero identity at scale 0, as a
    generation without identity runs (the LoRA learns the person from the pictures, not from the adapter)."""
    pipe = model.models.pipe
    if getattr(pipe.unet, "encoder_hid_proj", None) is None or model.adapter is None:
        return None
    null = model.null_identity
    pipe.set_ip_adapter_scale(0.0)
    model.adapter.prepare_call(null, 1, False)
    return pipe.prepare_ip_adapter_image_embeds(None, model.adapter.pipeline_embeds(null, False),
                                                model.models.device, 1, False)


# --- the adapter on and off ----------------------------------------------------------------------------

def _modules(pipe, text_encoder: bool) -> dict[str, Any]:
    mods = {"unet": pipe.unet}
    if text_encoder:
        mods.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    return mods


def _attach(modules: dict[str, Any], rank: int, device: str, seed: int) -> dict[str, Any]:
    """Add the training adapter; only its weights train (fp32). Returns what _detach restores."""
    import torch
    from peft import LoraConfig
    saved = {"grad": [p for mod in modules.values() for p in mod.parameters() if p.requires_grad],
             "checkpointing": device.startswith("cuda")}
    for name, mod in modules.items():
        mod.requires_grad_(False)
        targets = UNET_TARGETS if name == "unet" else TEXT_TARGETS
        # The initial weights from the request's seed, without touching the process's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mod.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=targets), adapter_name=ADAPTER)
        # A generation without LoRA leaves the layers disabled (pipe.disable_lora); each call sets them again.
        mod.enable_adapters()
        for pname, p in mod.named_parameters():
            if f".{ADAPTER}." in pname:
                p.data = p.data.to(torch.float32)
                p.requires_grad_(True)
        if saved["checkpointing"]:
            (mod.enable_gradient_checkpointing if name == "unet" else mod.gradient_checkpointing_enable)()
    return saved


def _trainable(modules: dict[str, Any]) -> dict[str, Any]:
    return {f"{name}.{pname}": p for name, mod in modules.items() for pname, p in mod.named_parameters()
            if f".{ADAPTER}." in pname}


def _lora_layers(modules: dict[str, Any]) -> dict[str, dict]:
    from peft.utils import get_peft_model_state_dict
    return {name: {k: v.detach().to("cpu", copy=True).contiguous()
                   for k, v in get_peft_model_state_dict(mod, adapter_name=ADAPTER).items()}
            for name, mod in modules.items()}


def _detach(modules: dict[str, Any], saved: dict[str, Any]) -> None:
    from diffusers.utils.peft_utils import delete_adapter_layers
    for name, mod in modules.items():
        if name == "unet":
            mod.delete_adapters(ADAPTER)
            if saved["checkpointing"]:
                mod.disable_gradient_checkpointing()
        else:
            delete_adapter_layers(mod, ADAPTER)
            if saved["checkpointing"]:
                mod.gradient_checkpointing_disable()
        mod.requires_grad_(False)
    for p in saved["grad"]:
        p.requires_grad_(True)


# --- the loop ------------------------------------------------------------------------------------------

def _optimizer(params: list, lr: float, device: str):
    """8-bit AdamW on a GPU when bitsandbytes imports (a quarter of AdamW's state memory), else AdamW."""
    import torch
    if device.startswith("cuda"):
        try:
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=1e-4), "adamw8bit"
        except Exception:  # noqa: BLE001 - not installed, or no CUDA build of it
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4), "adamw"


def _loop(model, spec, modules, batch, on_progress, should_cancel) -> tuple[list[float], int, str]:
    import torch
    from diffusers import DDPMScheduler
    m, req = model.models, spec.request
    params = _trainable(modules)
    opt, opt_name = _optimizer(list(params.values()), req.learning_rate, m.device)
    sched = DDPMScheduler.from_config(m.base_scheduler_config)
    gen = torch.Generator("cpu").manual_seed(req.seed)
    losses: list[float] = []
    start = 0
    ck = files.load_checkpoint(Path(spec.work_dir), spec.run_id)
    if ck is not None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ck["params"][name].to(p.device, p.dtype))
        opt.load_state_dict(ck["optim"])
        gen.set_state(ck["rng"])
        start, losses = int(ck["step"]), list(ck["losses"])
    n = batch["latents"].shape[0]
    fixed = _draw(batch, sched, gen, n) if spec.fixed_batch else None
    for step in range(start, spec.steps):
        if should_cancel is not None and should_cancel():
            raise JobCanceled(f"canceled at step {step} of {spec.steps}")
        idx, noise, t = fixed or _draw(batch, sched, gen, n)
        loss = _step(model, spec, modules, batch, sched, idx, noise, t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_progress is not None:
            on_progress(step + 1, spec.steps, None, {"loss": round(losses[-1], 6)})
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
            files.save_checkpoint(Path(spec.work_dir), {
                "run_id": spec.run_id, "step": step + 1, "losses": losses, "rng": gen.get_state(),
                "params": {k: v.detach().cpu() for k, v in params.items()}, "optim": opt.state_dict()})
    return losses, start, opt_name


def _draw(batch, sched, gen, n: int):
    import torch
    idx = int(torch.randint(n, (1,), generator=gen))
    noise = torch.randn(batch["latents"][idx:idx + 1].shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=gen)
    return idx, noise, t


def _step(model, spec, modules, batch, sched, idx: int, noise, t):
    """One training loss: noise a cached latent at timestep ``t``, predict, MSE (min-SNR weighted)."""
    import torch
    m = model.models
    device, cuda = m.device, m.device.startswith("cuda")
    x0 = batch["latents"][idx:idx + 1]
    noise, t = noise.to(device), t.to(device)
    noisy = sched.add_noise(x0, noise, t)
    v_pred = sched.config.prediction_type == "v_prediction"
    target = sched.get_velocity(x0, noise, t) if v_pred else noise
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with autocast:
        embeds, pooled = batch["text"] if "text" in batch else _encode_text(m.pipe, spec.caption, device)
        cond = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
        if batch["image_embeds"] is not None:
            cond["image_embeds"] = batch["image_embeds"]
        unet = modules["unet"]
        pred = unet(noisy.to(unet.dtype), t, embeds.to(unet.dtype), added_cond_kwargs=cond).sample
    err = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    gamma = spec.request.min_snr_gamma
    if gamma > 0:
        ac = sched.alphas_cumprod.to(device)[t]
        snr = ac / (1 - ac)
        weight = torch.clamp(snr, max=gamma) / (snr + 1 if v_pred else snr)
        err = err * weight
    return err.mean()


def _record(model, spec, losses, resumed, opt_name, cache_s, total_s, sizes, n_params) -> dict[str, Any]:
    m, req = model.models, spec.request
    ran = max(1, len(losses) - resumed)
    return {"token": spec.token, "caption": spec.caption, "steps": spec.steps, "rank": req.rank,
            "learning_rate": req.learning_rate, "resolution": spec.resolution, "seed": req.seed,
            "train_text_encoder": req.train_text_encoder, "min_snr_gamma": req.min_snr_gamma,
            "images": len(spec.images), "resumed_from_step": resumed, "loss_final": losses[-1] if losses else None,
            "loss_curve": [round(x, 6) for x in losses], "seconds": round(total_s, 3),
            "cache_seconds": round(cache_s, 3), "seconds_per_step": round((total_s - cache_s) / ran, 4),
            "base_model": m.model_name, "family": model.family, "identity_model": m.identity_model or m.model_name,
            "profile": m.profile, "device": m.device, "dtype": str(m.dtype).replace("torch.", ""),
            "optimizer": opt_name, "gradient_checkpointing": m.device.startswith("cuda"),
            "trained_parameters": n_params, "trained_at": time.time(), **sizes}
