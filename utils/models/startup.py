"""The configured models, ready: resolve the profile's layout, build the tiny folder first when the profile is
the generated tiny one (what the first start does), then load it (``load_models`` / ``load_base_model``) or
check it (``verify``).

``load``, ``flux_load`` and ``verify`` read a layout and ``tiny`` writes one; this module, above them, is the
one place that puts the writer before the readers, so no reader depends on the builder."""
from __future__ import annotations

import logging
from pathlib import Path

from utils.config import Settings
from utils.models.filecheck import FileCheck
from utils.models.flux_load import load_flux
from utils.models.flux_verify import verify_flux_layout
from utils.models.layout import BaseModel, FluxLayout, list_base_models, model_layout
from utils.models.load import LoadedModels, load_pipeline
from utils.models.tiny import make_tiny, tiny_is_current
from utils.models.verify import verify_layout

log = logging.getLogger("twin.models")


def ready_layout(settings: Settings):
    """The profile's layout, with the tiny folder built (or rebuilt when stale) when the profile is tiny."""
    layout = model_layout(settings)
    if layout.profile == "tiny":
        _ready_tiny(settings)
    return layout


def _ready_tiny(settings: Settings) -> None:
    root = settings.resolved_tiny_model_dir
    if not tiny_is_current(root):
        log.warning("building the tiny demo model in %s (outputs are NOT portraits)", root)
        make_tiny(root)


def base_models(settings: Settings) -> dict[str, BaseModel]:
    """The base-model catalogue (``layout.list_base_models``) with the tiny folder built first."""
    ready_layout(settings)
    return list_base_models(settings)


def load_base_model(settings: Settings, entry: BaseModel | None = None) -> LoadedModels:
    """A base model of either family: ``entry`` from ``base_models`` (None: the configured one)."""
    layout = ready_layout(settings) if entry is None else entry.layout
    if layout.profile == "tiny":
        _ready_tiny(settings)
    file = None if entry is None else entry.file
    if isinstance(layout, FluxLayout):
        return load_flux(layout, settings, file)
    return load_pipeline(layout, settings, file)


def load_models(settings: Settings, checkpoint: Path | None = None) -> LoadedModels:
    """Load the pipeline for the chosen profile, with its LoRAs and scheduler (the IP-Adapter variant is loaded
    by ipadapter_manager). ``checkpoint``: a single-file ``.safetensors`` (see ``list_checkpoints``) in place of
    the diffusers base folder's weights; the folder still gives the configs and tokenizers."""
    layout = ready_layout(settings)
    if isinstance(layout, FluxLayout):
        return load_flux(layout, settings, checkpoint)
    return load_pipeline(layout, settings, checkpoint)


def verify(settings: Settings) -> list[FileCheck]:
    """One FileCheck per weight file the configured profile and variant load."""
    return verify_any(ready_layout(settings))


def verify_any(layout) -> list[FileCheck]:
    """The preflight of a layout of either family (FLUX: with its identity method's files and face pack)."""
    if not isinstance(layout, FluxLayout):
        return verify_layout(layout)
    meta: dict = {}
    checks = verify_flux_layout(layout, meta)
    if layout.infiniteyou is not None:
        from utils.models.infiniteyou_load import check_files
        from utils.models.load import quiet_libraries
        from utils.models.onnx_check import verify_face_pack
        with quiet_libraries():
            checks += check_files(layout.infiniteyou, dict(meta["transformer"].config) if "transformer" in meta
                                  else None)
        checks += verify_face_pack(layout.face_pack)
    return checks
