"""The training request, declared once like the generation request: ``TRAIN_FIELDS`` is what
``TrainRequest.from_dict`` validates (400 naming field and value), what /openapi.json and the
/system-status options render. ``TrainSpec`` is what the trainer gets: the request plus what the service
resolved (the images, the token, the working folder). Importing this module loads no model."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from utils.errors import InvalidRequest
from utils.request_fields import Field, validate_payload

# Steps per accepted selfie, clipped: Astria's 27-100 per image with a floor of 300 (DESIGN.md §8).
STEPS_PER_SELFIE = 100
STEPS_RANGE = (300, 1500)
MAX_STEPS = 5000
RANK_RANGE = (4, 64)
# The tiny profile trains in seconds: a handful of steps shows the whole path.
TINY_STEPS = 20
# The rare token's letters: no English word, so the text encoders bind it to the person only.
_TOKEN_LETTERS = "bcdfghjklmnpqrstvwxz"


def _check_resolution(value: Any, settings: Any) -> int:
    if value % 64 or not 64 <= value <= 2048:
        raise InvalidRequest(f"resolution={value!r} must be a multiple of 64 between 64 and 2048")
    return value


TRAIN_FIELDS: tuple[Field, ...] = (
    Field("steps", "integer", "Optimiser steps (default: 100 per accepted selfie clipped to 300-1500; the tiny "
          f"profile {TINY_STEPS}).", minimum=1, maximum=MAX_STEPS),
    Field("rank", "integer", "LoRA rank (alpha = rank).", default=16, minimum=RANK_RANGE[0], maximum=RANK_RANGE[1],
          message="{name}={value!r} is not between {minimum} and {maximum}"),
    Field("learning_rate", "number", "AdamW learning rate.", default=1e-4, minimum=1e-7, maximum=1e-2),
    Field("resolution", "integer", "Training side in pixels (default: the base model's native size).",
          check=_check_resolution),
    Field("train_text_encoder", "boolean", "Also train a LoRA on both text encoders.", default=False),
    Field("seed", "integer", "Seed of the crops' order, the noise and the timesteps.", default=0, minimum=0,
          maximum=2**31 - 1),
    Field("min_snr_gamma", "number", "Min-SNR loss weighting gamma (0: off).", default=5.0, minimum=0.0,
          maximum=20.0),
)
TRAIN_FIELD_NAMES = tuple(f.name for f in TRAIN_FIELDS)


@dataclass(frozen=True)
class TrainRequest:
    """A validated POST /sessions/<id>/train body (webhook fields are the service's)."""
    steps: int | None = None
    rank: int = 16
    learning_rate: float = 1e-4
    resolution: int | None = None
    train_text_encoder: bool = False
    seed: int = 0
    min_snr_gamma: float = 5.0

    @classmethod
    def from_dict(cls, payload: Any, settings: Any) -> "TrainRequest":
        return cls(**validate_payload(TRAIN_FIELDS, payload, settings))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TRAIN_FIELD_NAMES}


def default_steps(accepted: int, profile: str) -> int:
    if profile in ("tiny", "tiny-flux"):
        return TINY_STEPS
    return max(STEPS_RANGE[0], min(STEPS_RANGE[1], STEPS_PER_SELFIE * accepted))


def session_token(session_id: str) -> str:
    """The session's rare token: six consonants from a hash of its id (stable, so a retrained LoRA and a
    prompt written earlier agree)."""
    digest = hashlib.sha256(session_id.encode()).digest()
    return "".join(_TOKEN_LETTERS[b % len(_TOKEN_LETTERS)] for b in digest[:6])


def caption(token: str) -> str:
    return f"photo of {token} person"


@dataclass
class TrainSpec:
    """One training run as the trainer sees it. ``faces``: (upright selfie, face box) pairs the trainer crops
    at ``resolution`` (None: the model's native size) into ``images``; ``work_dir``: a local folder for
    checkpoints and the result; ``run_id``: the job, so a checkpoint of another run is never resumed."""
    request: TrainRequest
    token: str
    work_dir: Any
    run_id: str
    steps: int
    resolution: int | None = None
    faces: list = field(default_factory=list)
    images: list = field(default_factory=list)     # PIL RGB training pictures (crops + flips)
    checkpoint_every: int = 50
    fixed_batch: bool = False                      # tests: one sample, one noise, one timestep every step
    extra: dict = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return caption(self.token)
