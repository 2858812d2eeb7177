"""The closed sets of names that settings, requests, the engine and the model files agree on.

Each set is defined here once; the settings' ``choices``, the request fields' enums, the download / verify
tables and the engine's checks all read it from here.
"""
from __future__ import annotations

# Identity methods (TWIN_IP_ADAPTER_VARIANT). plus-face / plain: CLIP image features of the face crops;
# faceid / faceid-plusv2 / instantid: 512-d ArcFace embeddings from the InsightFace backend.
IDENTITY_VARIANTS = ("plus-face", "plain", "faceid", "faceid-plusv2", "instantid")
ARCFACE_VARIANTS = ("faceid", "faceid-plusv2", "instantid")
# The InsightFace pack each ArcFace variant was trained with (the other ArcFace variants use buffalo_l).
ANTELOPE_VARIANTS = ("instantid", "faceid-plusv2")
# How the selfies' per-image embeddings become one identity.
IDENTITY_COMBINES = ("average", "stack")

# Face restoration models (utils/faces/restore.py holds their files and licences).
RESTORE_MODEL_NAMES = ("gfpgan", "codeformer", "gpen")


def face_pack(variant: str) -> str:
    """The InsightFace model pack an identity variant needs."""
    return "antelopev2" if variant in ANTELOPE_VARIANTS else "buffalo_l"
