"""Faces: the face service (``service``: validate selfies, embed, score portraits), its detector /
embedding backends (``backends``: dlib offline, InsightFace) and the torch port of dlib's descriptor
ResNet (``dlib_resnet``). ``FaceService`` picks the backend from the settings.

The names below load ``service`` (numpy, OpenCV) on first use, not when the package is imported: the web
process imports light modules of this package (``likeness``) at start-up and should not pay for that."""
from __future__ import annotations

from typing import Any

__all__ = ["AcceptedSelfie", "FaceService", "RejectedSelfie", "SelfieReport"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from utils.faces import service
        return getattr(service, name)
    raise AttributeError(f"module 'utils.faces' has no attribute {name!r}")
