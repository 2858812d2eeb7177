"""The configured models, ready: resolve the profile's layout, build the tiny folder first when the profile is
the generated tiny one (what the first start does), then load it (``load_models``) or check it (``verify``).

``load`` and ``verify`` read a layout and ``tiny`` writes one; this module, above all three, is the one place
that puts the writer before the readers, so neither reader depends on the builder."""
from __future__ import annotations

import logging
from pathlib import Path

from utils.config import Settings
from utils.models.filecheck import FileCheck
from utils.models.layout import ModelLayout, model_layout
from utils.models.load import LoadedModels, load_pipeline
from utils.models.tiny import make_tiny, tiny_is_current
from utils.models.verify import verify_layout

log = logging.getLogger("twin.models")


def ready_layout(settings: Settings) -> ModelLayout:
    """The profile's layout, with the tiny folder built (or rebuilt when stale) when the profile is tiny."""
    layout = model_layout(settings)
    if layout.profile == "tiny":
        root = settings.resolved_tiny_model_dir
        if not tiny_is_current(root):
            log.warning("building the tiny demo model in %s (outputs are NOT portraits)", root)
            make_tiny(root)
    return layout


def load_models(settings: Settings, checkpoint: Path | None = None) -> LoadedModels:
    """Load the pipeline for the chosen profile, with its LoRAs and scheduler (the IP-Adapter variant is loaded
    by ipadapter_manager). ``checkpoint``: a single-file SDXL ``.safetensors`` (see ``list_checkpoints``) in
    place of the diffusers base folder's weights; the folder still gives the configs and tokenizers."""
    return load_pipeline(ready_layout(settings), settings, checkpoint)


def verify(settings: Settings) -> list[FileCheck]:
    """One FileCheck per weight file the configured profile and variant load."""
    return verify_layout(ready_layout(settings))
