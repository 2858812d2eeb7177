"""Model families: one module per family, each a ``FamilyModel`` (utils/contracts.py) that loads a base
model with its identity method and knows how to plan and run one generation call. ``load_family_model``
is the one place that picks the family for a base model."""
from __future__ import annotations

from utils.config import Settings

FAMILIES = ("sdxl", "flux")


def load_family_model(settings: Settings, entry=None):
    """A base model of the catalogue (``entry``: utils.models.layout.BaseModel; None: the configured one),
    loaded with its family's identity method, as that family's FamilyModel."""
    if entry is None:
        from utils.models.layout import model_layout
        family = model_layout(settings).family
    else:
        family = entry.family
    if family == "flux":
        from utils.engine.families.flux import FluxModel
        return FluxModel.load(settings, entry)
    from utils.engine.families.sdxl import SdxlModel
    return SdxlModel.load(settings, entry)
