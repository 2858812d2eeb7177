"""Model families: one module per family, each a ``FamilyModel`` (utils/contracts.py) that loads a base
model with its identity method and knows how to plan and run one generation call. ``load_family_model``
is the one place that picks the family for a base model."""
from __future__ import annotations

from utils.config import Settings

FAMILIES = ("sdxl",)


def load_family_model(settings: Settings, checkpoint=None):
    """The configured base model (or the single-file ``checkpoint``), loaded with the configured identity
    method, as its family's FamilyModel."""
    from utils.engine.families.sdxl import SdxlModel
    return SdxlModel.load(settings, checkpoint=checkpoint)
