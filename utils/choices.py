"""The closed sets of names that settings, requests, the engine and the model files agree on.

Each set is defined here once; the settings' ``choices``, the request fields' enums, the download / verify
tables and the engine's checks all read it from here.
"""
from __future__ import annotations

# Identity methods (TWIN_IP_ADAPTER_VARIANT). plus-face / plain: CLIP image features of the face crops;
# faceid / faceid-plusv2 / instantid: 512-d ArcFace embeddings from the InsightFace backend.
# infiniteyou (FLUX family): IR-SE50 ArcFace of the antelopev2-aligned face + InfuseNet ControlNet.
IDENTITY_VARIANTS = ("plus-face", "plain", "faceid", "faceid-plusv2", "instantid", "infiniteyou")
# The identity methods of each family (a variant of one family refuses a base model of the other).
FAMILY_VARIANTS = {"sdxl": ("plus-face", "plain", "faceid", "faceid-plusv2", "instantid"), "flux": ("infiniteyou",)}
# The default variant: an SDXL one, but a FLUX model started with it (nothing configured) runs without an
# identity method rather than refusing to start; any other SDXL variant on FLUX refuses.
DEFAULT_IDENTITY_VARIANT = "plus-face"
# Variants that need the InsightFace backend (5 key points; 512-d ArcFace), dlib refuses them at start-up.
ARCFACE_VARIANTS = ("faceid", "faceid-plusv2", "instantid", "infiniteyou")
# The InsightFace pack each ArcFace variant was trained with (the other ArcFace variants use buffalo_l).
ANTELOPE_VARIANTS = ("instantid", "faceid-plusv2", "infiniteyou")
# InfiniteYou's two weight sets (TWIN_INFINITEYOU_MODEL): higher similarity / better aesthetics.
INFINITEYOU_STAGES = ("sim_stage1", "aes_stage2")
# How the selfies' per-image embeddings become one identity.
IDENTITY_COMBINES = ("average", "stack")

# Face restoration models (utils/faces/restore.py holds their files and licences).
RESTORE_MODEL_NAMES = ("gfpgan", "codeformer", "gpen")


def face_pack(variant: str) -> str:
    """The InsightFace model pack an identity variant needs."""
    return "antelopev2" if variant in ANTELOPE_VARIANTS else "buffalo_l"
