"""Live previews: a small JPEG of the forming image every few denoising steps, from the latents through a
linear latent -> RGB fit (a few multiply-adds per latent pixel instead of a VAE decode)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LatentRgb:
    """A family's linear fit of its VAE decode: RGB = latents . factors + bias (per latent channel)."""
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]


# SDXL's 4 latent channels (the factors ComfyUI and A1111 use for their cheap previews).
SDXL_LATENT_RGB = LatentRgb(factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                                     (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
                            bias=(0.1084, -0.0175, -0.0011))
# FLUX.1's 16 latent channels, in the space the denoiser works in ((z - 0.1159) * 0.3611, the latents the step
# callback sees once unpacked): ComfyUI's published least-squares fit of the FLUX.1 VAE decode
# (comfy/latent_formats.py, class Flux, latent_rgb_factors / latent_rgb_factors_bias), same [-1, 1] output
# convention as the SDXL factors above. A fit of the real VAE: on the tiny FLUX (random VAE) it gives a
# picture of the latents, not of the decode.
FLUX_LATENT_RGB = LatentRgb(factors=(
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778)),
    bias=(-0.0329, -0.0718, -0.0851))
PREVIEWS_PER_JOB = 8  # previews are sent on about this many evenly spaced steps (and the last one)


def latent_preview_jpeg(latents, side: int = 128, fit: LatentRgb = SDXL_LATENT_RGB) -> bytes:
    """A small JPEG of the first image's latents ([B, channels, h, w]; FLUX's unpacked first) through ``fit``."""
    import io

    import numpy as np
    from PIL import Image
    lat = latents[0].detach().float().cpu().numpy()[:len(fit.factors)]
    rgb = np.einsum("chw,cr->hwr", lat, np.asarray(fit.factors, dtype=np.float32)) + np.asarray(fit.bias)
    img = Image.fromarray(np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8))
    if max(img.size) < side:  # latents are 1/8 of the image: show them at a viewable size
        f = side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def preview_steps(total: int) -> set[int]:
    """1-based steps that send a preview: evenly spaced, always the last."""
    every = max(1, math.ceil(total / PREVIEWS_PER_JOB))
    return {s for s in range(1, total + 1) if s % every == 0} | {total}
