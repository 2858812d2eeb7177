"""InstantID's part that diffusers core lacks.

diffusers core loads InstantID's ``ip-adapter.bin`` (``load_ip_adapter``: a Resampler image projection with
16 tokens over the 512-d ArcFace vector) and runs SDXL with a ControlNet
(``StableDiffusionXLControlNetPipeline``). What it does not do: InstantID's ControlNet, the IdentityNet, was
trained to read the 16 identity tokens as its cross-attention input, not the text. ``IdentityNet`` is that
ControlNet: the generator hands it the tokens for one call (``identity_tokens``); it uses them in place of
the ``encoder_hidden_states`` the pipeline passes (the pooled text and time ids still go in unchanged).
The class itself lives with the loader that builds it (``utils.models.identitynet``); its image input is
the pose keypoint image (``utils.engine.identity.pose``).
"""
from __future__ import annotations


def identity_tokens(unet, embeds, num_images: int, do_cfg: bool):
    """The 16 identity tokens per image for the IdentityNet, computed by the loaded adapter's own image
    projection (``unet.encoder_hid_proj.image_projection_layers[0]``) from the identity embeds
    ``[2, 1, 1, 512]`` (zeros; ArcFace), laid out as the pipeline's batch: [neg x n; pos x n] under CFG."""
    import torch
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    e = embeds.reshape(embeds.shape[0], -1, embeds.shape[-1])        # [2, K, 512]
    with torch.inference_mode():
        tokens = proj(e.to(device=unet.device, dtype=unet.dtype))    # [2, T, C]
    neg, pos = tokens[:1], tokens[1:2]
    pos = pos.repeat(num_images, 1, 1)
    return torch.cat([neg.repeat(num_images, 1, 1), pos]) if do_cfg else pos
