"""IP-Adapter variants and the per-session identity.

An identity is computed once, when selfies are uploaded, and saved next to the session; generation only
hands the saved tensor to the pipeline as ``ip_adapter_image_embeds``.

Identity tensor layout (what diffusers' ``prepare_ip_adapter_image_embeds`` produces for one adapter):
``[2, K, ...]`` with index 0 = negative (unconditional) half and index 1 = positive half, K = 1 for
``average`` or K = number of selfies for ``stack`` (their tokens are concatenated in attention).

* plus-face / plain: per-selfie CLIP ViT-H output of the face crop. Plus uses the penultimate hidden
  states ``[K, 257, 1280]`` (tiny: ``[K, 17, 32]``); plain the projected embedding ``[K, 1024]`` (tiny
  ``[K, 32]``). The negative half is the encoder's output for a black image (diffusers computes it).
* faceid: L2-normalised 512-d ArcFace vectors ``[K, 512]``; the negative half is zeros.
* faceid-plusv2: L2-normalised ArcFace ``[K, 1, 512]`` (zeros negative) plus, in ``extras["clip_embeds"]``,
  the CLIP ViT-H penultimate hidden states of the face crops ``[2, K, 257, 1280]``; both go to the adapter's
  ``IPAdapterFaceIDPlusImageProjection`` (``clip_embeds``, ``shortcut``, ``shortcut_scale``) per call.
* instantid: the average of the selfies' raw (not normalised) ArcFace vectors ``[1, 1, 512]`` (zeros
  negative), as InstantID's maintainers do for several photos; always averaged.

``extras["keypoints"]`` ``[K, 5, 2]`` / ``extras["keypoint_index"]`` ``[K]``: each accepted selfie's 5 face
points (normalised layout, see instantid.py) and its upload index, for ``pose="selfie:N"``. Geometry, not
an embedding; never logged.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from utils.choices import ARCFACE_VARIANTS, IDENTITY_VARIANTS
from utils.engine.identity.session import SessionIdentity, combine_embeds
from utils.errors import Conflict, InvalidRequest, ModelWeightsMissing

if TYPE_CHECKING:
    from utils.models.load import LoadedModels

# FaceID Plus v2: weight of the CLIP-structure branch added to the ArcFace tokens (the model card's s_scale).
FACEID_PLUSV2_SHORTCUT_SCALE = 1.0
FACEID_DIM = 512


class AdapterManager:
    """Loads one adapter variant into a pipeline and turns faces into identities for it."""

    def __init__(self, models: LoadedModels) -> None:
        self.models = models
        self.variant: str | None = None
        # Embedding runs in request threads while the worker generates; the image encoder is not used
        # by generation (it gets precomputed embeds), so only embedding calls need to be serialised.
        self._embed_lock = threading.Lock()
        self.faceid_adapters: list[str] = []

    def load(self, variant: str) -> None:
        if variant not in IDENTITY_VARIANTS:
            raise InvalidRequest(f"ip_adapter_variant={variant!r} is not one of {', '.join(IDENTITY_VARIANTS)}")
        pipe = self.models.pipe
        if self.variant is not None:
            pipe.unload_ip_adapter()
        from utils.models.layout import ADAPTER_FILES, ENCODER_SUB, download_flag, tiny_adapter_weight
        from utils.models.load import quiet_libraries
        repo, sub, weight, encoder = ADAPTER_FILES[variant]
        if self.models.profile == "tiny":
            weight = tiny_adapter_weight(variant)
        root = self.models.adapter_repo
        if root is None or not (Path(root) / sub / weight).is_file():
            raise ModelWeightsMissing(f"IP-Adapter weight {weight!r} for variant {variant!r} not found in {root}; "
                                      f"run: python model_loader.py download" + download_flag(variant))
        if variant == "faceid-plusv2":
            # Its ViT-H encoder lives in the other repo (h94/IP-Adapter): registered first, so that
            # load_ip_adapter keeps it (it only loads an encoder when the pipeline has none).
            enc_dir = Path(self.models.encoder_repo or "") / ENCODER_SUB
            if not (enc_dir / "config.json").is_file():
                raise ModelWeightsMissing(f"ViT-H image encoder for faceid-plusv2 not found in {enc_dir}; run: "
                                          "python model_loader.py download --faceid-plusv2")
            from transformers import CLIPVisionModelWithProjection
            with quiet_libraries():
                enc = CLIPVisionModelWithProjection.from_pretrained(str(enc_dir), dtype=self.models.dtype,
                                                                    local_files_only=True)
            pipe.register_modules(image_encoder=enc.to(self.models.device))
        before = set(getattr(pipe.unet, "peft_config", {}) or {})
        with quiet_libraries():
            pipe.load_ip_adapter(str(root), subfolder=sub, weight_name=weight, image_encoder_folder=encoder,
                                 local_files_only=True)
        after = set(getattr(pipe.unet, "peft_config", {}) or {})
        self.faceid_adapters = sorted(n for n in after - before if n.startswith("faceid_"))
        self.variant = variant
        self.models.adapter_variant = variant

    # --- identity ---------------------------------------------------------------------------------
    def _arcface(self, face_embeddings, face_model, norms=None) -> np.ndarray:
        """[N, 512] unit ArcFace vectors, or raw ones (unit x the detector's norm) when ``norms`` are given."""
        if face_embeddings is None or len(face_embeddings) == 0:
            raise InvalidRequest(f"the {self.variant} adapter needs face embeddings; none were given")
        vecs = []
        for i, e in enumerate(face_embeddings):
            a = np.asarray(e, dtype=np.float32).reshape(-1)
            if a.shape[0] != FACEID_DIM:
                raise InvalidRequest(
                    f"the {self.variant} adapter needs {FACEID_DIM}-d ArcFace embeddings; selfie {i} has a "
                    f"{a.shape[0]}-d embedding from face model {face_model!r}. Use the insightface face backend "
                    f"or a variant without ArcFace (plus-face, plain)", code="embedding_mismatch")
            if not np.all(np.isfinite(a)) or not np.linalg.norm(a) > 0:
                raise InvalidRequest(f"face embedding of selfie {i} is not a finite non-zero vector")
            a = a / np.linalg.norm(a)
            if norms is not None:
                n = norms[i]
                if n is None or not np.isfinite(n) or n <= 0:
                    raise InvalidRequest(f"selfie {i} has no raw ArcFace length; upload the selfies again with "
                                         "the insightface face backend", code="embedding_mismatch")
                a = a * np.float32(n)
            vecs.append(a)
        return np.stack(vecs)

    def per_image_embeds(self, crops: Sequence[Any] | None, face_embeddings: Sequence[Any] | None,
                         face_model: str | None, embedding_norms: Sequence[Any] | None = None):
        """[2, N, ...] float32 CPU tensor: negative and positive half per selfie."""
        import torch
        if self.variant in ARCFACE_VARIANTS:
            raw = self.variant == "instantid"   # InstantID was trained on the raw vectors, FaceID on unit ones
            if raw and embedding_norms is None:
                raise InvalidRequest("the instantid adapter needs raw ArcFace embeddings (embedding_norms); none "
                                     "were given", code="embedding_mismatch")
            pos = torch.from_numpy(self._arcface(face_embeddings, face_model, embedding_norms if raw else None))[None]
            if self.variant != "faceid":
                pos = pos[:, :, None, :]      # [1, N, 1, 512]: the Resampler projections take a token axis
            return torch.cat([torch.zeros_like(pos), pos], dim=0)
        return self.clip_embeds(crops)

    def clip_embeds(self, crops):
        """[2, N, ...] CLIP image embeds of the face crops (negative: the encoder's own unconditional)."""
        import torch
        if not crops:
            raise InvalidRequest("no face crops were given to build an identity from")
        from PIL import Image
        imgs = []
        for i, c in enumerate(crops):
            if not isinstance(c, Image.Image):
                raise InvalidRequest(f"face crop {i} is a {type(c).__name__}, not a PIL image")
            imgs.append(c.convert("RGB"))
        pipe = self.models.pipe
        with self._embed_lock, torch.inference_mode():
            out = pipe.prepare_ip_adapter_image_embeds([imgs], None, self.models.device, 1, True)
        return out[0].float().cpu()

    def build_identity(self, crops, face_embeddings, *, face_model: str | None, combine: str,
                       embedding_norms=None, keypoints=None, keypoint_index=None,
                       crop_keypoints=None) -> SessionIdentity:
        import torch
        per_image = self.per_image_embeds(crops, face_embeddings, face_model, embedding_norms)
        n = per_image.shape[1]
        if self.variant == "instantid":
            combine = "average"   # one identity vector: the IdentityNet reads one set of 16 tokens
        extras: dict[str, Any] = {}
        if self.variant == "faceid-plusv2":
            extras["clip_embeds"] = combine_embeds(self.clip_embeds(_tight_crops(crops)), combine).contiguous()
        from utils.engine.identity.pose import keypoint_extras
        extras.update(keypoint_extras(keypoints, keypoint_index))
        return SessionIdentity(embeds=combine_embeds(per_image, combine).contiguous(), variant=self.variant or "",
                               model_name=self.models.identity_model or self.models.model_name,
                               combine=combine, num_selfies=int(n),
                               face_model=face_model, extras=extras)

    def check_identity(self, identity: SessionIdentity) -> None:
        if identity.variant != self.variant:
            raise Conflict(f"this session's identity was built for adapter variant {identity.variant!r}, but the "
                           f"loaded adapter is {self.variant!r}; upload the selfies again", code="identity_mismatch")
        family = self.models.identity_model or self.models.model_name
        if identity.model_name != family:
            raise Conflict(f"this session's identity was built for model {identity.model_name!r}, but the loaded "
                           f"model is {family!r}; upload the selfies again", code="identity_mismatch")
        if identity.embeds.ndim not in (3, 4) or identity.embeds.shape[0] != 2:
            raise Conflict(f"identity tensor has shape {list(identity.embeds.shape)}; expected [2, K, ...]",
                           code="identity_mismatch")

    def pipeline_embeds(self, identity: SessionIdentity, do_cfg: bool) -> list:
        """``ip_adapter_image_embeds`` for one call: [neg; pos] with CFG, else only pos. The pipeline
        repeats it for num_images itself."""
        e = identity.embeds.to(device=self.models.device, dtype=self.models.dtype)
        return [e if do_cfg else e[1:]]

    def null_identity(self) -> SessionIdentity:
        """Zero embeddings of the right shape, used with scale 0 when a request has no identity: the
        UNet with an adapter loaded needs image embeds, and scale 0 makes their contribution exactly 0."""
        import torch
        shape = self._probe_shape()
        extras = {}
        if self.variant == "faceid-plusv2":
            from PIL import Image
            extras["clip_embeds"] = torch.zeros_like(self.clip_embeds([Image.new("RGB", (8, 8))]))
        return SessionIdentity(embeds=torch.zeros(shape), variant=self.variant or "",
                               model_name=self.models.identity_model or self.models.model_name,
                               combine="average", num_selfies=0, extras=extras)

    def prepare_call(self, identity: SessionIdentity, num_images: int, do_cfg: bool) -> None:
        """Per-call state the pipeline arguments cannot carry: FaceID Plus v2's CLIP branch on its projection
        layer. Called under the generator's lock, right before the pipeline call."""
        if self.variant != "faceid-plusv2":
            return
        import torch
        proj = self.models.pipe.unet.encoder_hid_proj.image_projection_layers[0]
        clip = identity.extras["clip_embeds"].to(device=self.models.device, dtype=self.models.dtype)
        neg, pos = clip[:1].repeat(num_images, 1, 1, 1), clip[1:2].repeat(num_images, 1, 1, 1)
        # Same batch layout as the pipeline gives the id embeds: [neg x n; pos x n] under CFG.
        proj.clip_embeds = torch.cat([neg, pos]) if do_cfg else pos
        proj.shortcut = True
        proj.shortcut_scale = FACEID_PLUSV2_SHORTCUT_SCALE


    def _probe_shape(self) -> tuple[int, ...]:
        if self.variant == "faceid":
            return (2, 1, FACEID_DIM)
        if self.variant in ("faceid-plusv2", "instantid"):
            return (2, 1, 1, FACEID_DIM)
        from PIL import Image
        e = self.per_image_embeds([Image.new("RGB", (8, 8))], None, None)
        return (2, 1) + tuple(e.shape[2:])


def _tight_crops(crops):
    """FaceID Plus v2 saw InsightFace's tight 224 px face crops (norm_crop); the service's crops carry
    context around the face box (TWIN_FACE_CROP_SCALE, 1.8 by default): keep the middle 70 %."""
    out = []
    for c in crops or []:
        w, h = c.size
        dx, dy = round(w * 0.15), round(h * 0.15)
        out.append(c.crop((dx, dy, w - dx, h - dy)))
    return out
