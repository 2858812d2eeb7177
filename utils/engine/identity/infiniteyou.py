"""InfiniteYou, the FLUX family's identity method (``FluxIdentityMethod``; files: utils/models/infiniteyou.py).

Identity: each accepted selfie's 112 px ArcFace chip is aligned from its stored crop with its 5 key points
(crop pixels) and embedded by IR-SE50 (unit vectors, the space the projection was trained on); the vectors
are combined as ``identity_combine`` says (average: the mean of the unit vectors, made unit again so the
input stays on the sphere the projection saw; stack: the K vectors side by side, the Resampler's queries
attend over all of them). Saved as ``[2, K, 512]`` (zeros; vectors) like the SDXL identities.

Per call: the projection turns the vectors into 8 tokens of T5's width; InfuseNet reads them as its text
stream (FLUX itself reads the prompt unchanged) and its residuals are added to the transformer's blocks,
scaled by ``identity_strength`` (the ControlNet conditioning scale). Its image input is the 5-keypoint
drawing at the output size times ``pose_strength`` when the request gives ``pose``, else all black (the
reference's "no pose", a defined input). ``identity_strength`` 0 adds nothing, so the call runs without
InfuseNet: the same image as no identity, for less work.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from utils.engine.identity.pose import keypoint_extras, pose_image
from utils.engine.identity.session import SessionIdentity
from utils.errors import Conflict, InvalidRequest

VARIANT = "infiniteyou"


class InfiniteYou:
    """Loaded InfuseNet + projection + IR-SE50 for one FLUX base model's pipeline."""

    variant = VARIANT
    fields = frozenset({"identity_strength", "pose", "pose_strength"})

    def __init__(self, models, infusenet, projection, arcface, stage: str) -> None:
        self.models, self.infusenet, self.projection, self.arcface, self.stage = (models, infusenet, projection,
                                                                                  arcface, stage)
        self._pipes: dict[str, Any] = {}

    @classmethod
    def load(cls, settings, models) -> "InfiniteYou":
        from utils.models.infiniteyou import infiniteyou_files
        from utils.models.infiniteyou_load import load_infiniteyou
        files = getattr(models.layout, "infiniteyou", None) or infiniteyou_files(
            settings, settings.resolved_tiny_model_dir if models.profile == "tiny" else None)
        net, proj, arc = load_infiniteyou(files, dict(models.pipe.transformer.config), models.device, models.dtype)
        return cls(models, net, proj, arc, files.stage)

    def info(self) -> dict[str, Any]:
        return {"identity_method": VARIANT, "infiniteyou_stage": self.stage, "identity_embedding": "ir-se50-arcface"}

    # --- identity ------------------------------------------------------------------------------------
    def build_identity(self, crops, face_embeddings, *, face_model: str | None = None, combine: str = "average",
                       crop_keypoints=None, keypoints=None, keypoint_index=None, **_: Any) -> SessionIdentity:
        import torch

        from utils.engine.identity.session import combine_embeds
        from utils.faces.irse50 import chip, embed
        if not crops:
            raise InvalidRequest("no face crops were given to build an identity from")
        kps = list(crop_keypoints) if crop_keypoints is not None else [None] * len(crops)
        if len(kps) != len(crops) or any(k is None for k in kps):
            raise InvalidRequest("the infiniteyou identity method needs each selfie's 5 face key points (the "
                                 "InsightFace backend gives them); upload the selfies again with it",
                                 code="embedding_mismatch")
        chips = [chip(np.asarray(c.convert("RGB")), k) for c, k in zip(crops, kps)]
        vecs = torch.from_numpy(embed(self.arcface, chips))[None]          # [1, N, 512] unit
        per_image = torch.cat([torch.zeros_like(vecs), vecs])
        embeds = combine_embeds(per_image, combine)
        if combine == "average":
            embeds[1:] = embeds[1:] / embeds[1:].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return SessionIdentity(embeds=embeds.contiguous(), variant=VARIANT,
                               model_name=self.models.identity_model or self.models.model_name, combine=combine,
                               num_selfies=len(crops), face_model=face_model,
                               extras=keypoint_extras(keypoints, keypoint_index))

    def check_identity(self, identity: SessionIdentity) -> None:
        if identity.variant != VARIANT:
            raise Conflict(f"this session's identity was built for {identity.variant!r}, but the FLUX model's "
                           f"identity method is {VARIANT!r}; upload the selfies again", code="identity_mismatch")
        family = self.models.identity_model or self.models.model_name
        if identity.model_name != family:
            raise Conflict(f"this session's identity was built for model {identity.model_name!r}, not "
                           f"{family!r}; upload the selfies again", code="identity_mismatch")
        if identity.embeds.ndim != 3 or identity.embeds.shape[0] != 2 or identity.embeds.shape[-1] != 512:
            raise Conflict(f"identity tensor has shape {list(identity.embeds.shape)}; expected [2, K, 512]",
                           code="identity_mismatch")

    # --- one call ------------------------------------------------------------------------------------
    def tokens(self, identity: SessionIdentity, num_images: int):
        """[num_images, 8, 4096] identity tokens from the saved vectors (the positive half)."""
        import torch
        p = next(self.projection.parameters())
        with torch.inference_mode():
            t = self.projection(identity.embeds[1:2].to(device=p.device, dtype=p.dtype))
        return t.repeat(num_images, 1, 1)

    def control_image(self, req, plan: dict[str, Any]):
        """The keypoint drawing x pose_strength when the request gives a pose, else all black."""
        from PIL import Image
        w, h = plan["width"], plan["height"]
        if "pose" not in req.given or req.pose_strength <= 0:
            return Image.new("RGB", (w, h))
        ex = req.identity.extras if req.identity is not None else {}
        kps, idx = ex.get("keypoints"), ex.get("keypoint_index")
        img = pose_image(req.pose, w, h, None if kps is None else kps.numpy(), None if idx is None else idx.tolist())
        share = np.clip(np.asarray(img, dtype=np.float32) * min(req.pose_strength, 1.0), 0, 255)
        return Image.fromarray(share.astype(np.uint8))

    def call_metadata(self, req) -> dict[str, Any]:
        """What a result's metadata says of this call: the stage, the pose and which control image went in."""
        ran = req.identity_strength > 0          # at 0 InfuseNet does not run at all (see prepare)
        posed = "pose" in req.given and ran
        return {"infiniteyou_stage": self.stage, "pose": req.pose if posed else None,
                "pose_strength": req.pose_strength if posed else None,
                "control_image": None if not ran else "keypoints" if posed and req.pose_strength > 0 else "black"}

    def prepare(self, pipe, req, plan: dict[str, Any], kwargs: dict[str, Any]):
        """The ControlNet pipeline over ``pipe``'s modules with InfuseNet, its inputs added to ``kwargs``."""
        if req.identity_strength <= 0:
            return pipe
        self.infusenet.identity_tokens = self.tokens(req.identity, req.num_images)
        kwargs.update(control_image=self.control_image(req, plan),
                      controlnet_conditioning_scale=float(req.identity_strength),
                      control_guidance_start=0.0, control_guidance_end=1.0)
        return self._pipe("img2img" if "image" in kwargs else "txt2img", pipe)

    def finish(self, pipe) -> None:
        self.infusenet.identity_tokens = None

    def _pipe(self, kind: str, pipe):
        if kind not in self._pipes:
            from diffusers import FluxControlNetImg2ImgPipeline, FluxControlNetPipeline
            cls = FluxControlNetImg2ImgPipeline if kind == "img2img" else FluxControlNetPipeline
            parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
            built = cls(**parts, controlnet=self.infusenet)
            built.set_progress_bar_config(disable=True)
            self._pipes[kind] = built
        return self._pipes[kind]

