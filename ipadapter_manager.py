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
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from model_loader import ADAPTER_FILES, LoadedModels, tiny_adapter_weight
from utils.errors import Conflict, InvalidRequest

FORMAT = "twin-identity-1"
VARIANTS = ("plus-face", "plain", "faceid")
COMBINES = ("average", "stack")
FACEID_DIM = 512


@dataclass
class SessionIdentity:
    embeds: Any                 # torch.Tensor [2, K, ...] float32 on CPU (negative; positive)
    variant: str
    model_name: str
    combine: str
    num_selfies: int
    face_model: str | None = None
    created: float = field(default_factory=time.time)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.embeds.shape)

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "variant": self.variant, "model_name": self.model_name, "combine": self.combine,
                "num_selfies": str(self.num_selfies), "face_model": self.face_model or "",
                "created": f"{self.created:.3f}", "shape": "x".join(map(str, self.shape))}

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file({"ip_adapter_image_embeds": self.embeds.detach().float().cpu().contiguous()}, str(tmp),
                  metadata=self.metadata())
        tmp.replace(path)  # atomic: a job never reads a half-written identity
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SessionIdentity":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise InvalidRequest(f"identity file {path.name!r} does not exist", code="identity_missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                embeds = f.get_tensor("ip_adapter_image_embeds")
        except Exception as e:
            raise InvalidRequest(f"identity file {path.name!r} is unreadable ({type(e).__name__})",
                                 code="identity_invalid") from None
        if meta.get("format") != FORMAT or meta.get("variant") not in VARIANTS:
            raise InvalidRequest(f"identity file {path.name!r} has format {meta.get('format')!r}, "
                                 f"variant {meta.get('variant')!r}; expected {FORMAT}", code="identity_invalid")
        return cls(embeds=embeds, variant=meta["variant"], model_name=meta.get("model_name", ""),
                   combine=meta.get("combine", "average"), num_selfies=int(meta.get("num_selfies", "0")),
                   face_model=meta.get("face_model") or None, created=float(meta.get("created", "0")))


def combine_embeds(per_image, combine: str):
    """[2, N, ...] per-selfie embeddings -> identity tensor. average: [2, 1, ...]; stack: [2, N, ...]."""
    if combine not in COMBINES:
        raise InvalidRequest(f"identity_combine={combine!r} is not one of {', '.join(COMBINES)}")
    if combine == "average":
        return per_image.mean(dim=1, keepdim=True)
    return per_image


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
        if variant not in VARIANTS:
            raise InvalidRequest(f"ip_adapter_variant={variant!r} is not one of {', '.join(VARIANTS)}")
        pipe = self.models.pipe
        if self.variant is not None:
            pipe.unload_ip_adapter()
        repo, sub, weight, encoder = ADAPTER_FILES[variant]
        if self.models.profile == "tiny":
            weight = tiny_adapter_weight(variant)
        root = self.models.adapter_repo
        if root is None or not (Path(root) / sub / weight).is_file():
            from utils.errors import ModelWeightsMissing
            raise ModelWeightsMissing(f"IP-Adapter weight {weight!r} for variant {variant!r} not found in {root}; "
                                      f"run: python model_loader.py download" + (" --faceid" if variant == "faceid" else ""))
        before = set(getattr(pipe.unet, "peft_config", {}) or {})
        from model_loader import quiet_libraries
        with quiet_libraries():
            pipe.load_ip_adapter(str(root), subfolder=sub, weight_name=weight, image_encoder_folder=encoder,
                                 local_files_only=True)
        after = set(getattr(pipe.unet, "peft_config", {}) or {})
        self.faceid_adapters = sorted(n for n in after - before if n.startswith("faceid_"))
        self.variant = variant
        self.models.adapter_variant = variant

    # --- identity ---------------------------------------------------------------------------------
    def per_image_embeds(self, crops: Sequence[Any] | None, face_embeddings: Sequence[Any] | None,
                         face_model: str | None):
        """[2, N, ...] float32 CPU tensor: negative and positive half per selfie."""
        import torch
        if self.variant == "faceid":
            if face_embeddings is None or len(face_embeddings) == 0:
                raise InvalidRequest("the faceid adapter needs face embeddings; none were given")
            vecs = []
            for i, e in enumerate(face_embeddings):
                a = np.asarray(e, dtype=np.float32).reshape(-1)
                if a.shape[0] != FACEID_DIM:
                    raise InvalidRequest(
                        f"the faceid adapter needs {FACEID_DIM}-d ArcFace embeddings; selfie {i} has a "
                        f"{a.shape[0]}-d embedding from face model {face_model!r}. Use the insightface face backend "
                        f"or a non-faceid adapter variant", code="embedding_mismatch")
                if not np.all(np.isfinite(a)) or not np.linalg.norm(a) > 0:
                    raise InvalidRequest(f"face embedding of selfie {i} is not a finite non-zero vector")
                vecs.append(a / np.linalg.norm(a))
            pos = torch.from_numpy(np.stack(vecs))[None]          # [1, N, 512]
            return torch.cat([torch.zeros_like(pos), pos], dim=0)
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

    def build_identity(self, crops, face_embeddings, *, face_model: str | None, combine: str) -> SessionIdentity:
        per_image = self.per_image_embeds(crops, face_embeddings, face_model)
        n = per_image.shape[1]
        return SessionIdentity(embeds=combine_embeds(per_image, combine).contiguous(), variant=self.variant or "",
                               model_name=self.models.model_name, combine=combine, num_selfies=int(n),
                               face_model=face_model)

    def check_identity(self, identity: SessionIdentity) -> None:
        if identity.variant != self.variant:
            raise Conflict(f"this session's identity was built for adapter variant {identity.variant!r}, but the "
                           f"loaded adapter is {self.variant!r}; upload the selfies again", code="identity_mismatch")
        if identity.model_name != self.models.model_name:
            raise Conflict(f"this session's identity was built for model {identity.model_name!r}, but the loaded "
                           f"model is {self.models.model_name!r}; upload the selfies again", code="identity_mismatch")
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
        return SessionIdentity(embeds=torch.zeros(shape), variant=self.variant or "", model_name=self.models.model_name,
                               combine="average", num_selfies=0)

    def _probe_shape(self) -> tuple[int, ...]:
        if self.variant == "faceid":
            return (2, 1, FACEID_DIM)
        from PIL import Image
        e = self.per_image_embeds([Image.new("RGB", (8, 8))], None, None)
        return (2, 1) + tuple(e.shape[2:])

