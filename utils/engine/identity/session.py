"""The per-session identity: what an identity method built from a session's selfies, saved beside the
session and handed to the pipeline at generation time (layout per variant: see adapters.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.choices import IDENTITY_COMBINES, IDENTITY_VARIANTS
from utils.errors import InvalidRequest

FORMAT = "twin-identity-1"


@dataclass
class SessionIdentity:
    embeds: Any                 # torch.Tensor [2, K, ...] float32 on CPU (negative; positive)
    variant: str
    model_name: str
    combine: str
    num_selfies: int
    face_model: str | None = None
    created: float = field(default_factory=time.time)
    extras: dict[str, Any] = field(default_factory=dict)   # clip_embeds, keypoints, keypoint_index (CPU tensors)

    @property
    def cache_key(self) -> str:
        """What tells two identities of one session apart: the method and the model they were built for."""
        return f"{self.variant}|{self.model_name}|{self.combine}"

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
        tensors = {"ip_adapter_image_embeds": self.embeds.detach().float().cpu().contiguous()}
        for k, v in self.extras.items():
            tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
        save_file(tensors, str(tmp), metadata=self.metadata())
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
                extras = {k[len("extra."):]: f.get_tensor(k) for k in f.keys() if k.startswith("extra.")}
        except Exception as e:
            raise InvalidRequest(f"identity file {path.name!r} is unreadable ({type(e).__name__})",
                                 code="identity_invalid") from None
        if meta.get("format") != FORMAT or meta.get("variant") not in IDENTITY_VARIANTS:
            raise InvalidRequest(f"identity file {path.name!r} has format {meta.get('format')!r}, "
                                 f"variant {meta.get('variant')!r}; expected {FORMAT}", code="identity_invalid")
        return cls(embeds=embeds, variant=meta["variant"], model_name=meta.get("model_name", ""),
                   combine=meta.get("combine", "average"), num_selfies=int(meta.get("num_selfies", "0")),
                   face_model=meta.get("face_model") or None, created=float(meta.get("created", "0")),
                   extras=extras)


def combine_embeds(per_image, combine: str):
    """[2, N, ...] per-selfie embeddings -> identity tensor. average: [2, 1, ...]; stack: [2, N, ...]."""
    if combine not in IDENTITY_COMBINES:
        raise InvalidRequest(f"identity_combine={combine!r} is not one of {', '.join(IDENTITY_COMBINES)}")
    if combine == "average":
        return per_image.mean(dim=1, keepdim=True)
    return per_image
