"""Per-person LoRA training ("twin studio"): the training request (spec.py), the training pictures
(data.py), the trainer for SDXL (sdxl.py), what a run writes (files.py) and the small LRU of trained LoRAs a
generation activates (loras.py)."""
from utils.engine.training.spec import (TRAIN_FIELDS, TrainRequest, TrainSpec, caption, default_steps,
                                        session_token)

__all__ = ["TRAIN_FIELDS", "TrainRequest", "TrainSpec", "caption", "default_steps", "session_token"]
