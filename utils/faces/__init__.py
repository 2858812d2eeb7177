"""Faces: the face service (``service``: validate selfies, embed, score portraits), its detector /
embedding backends (``backends``: dlib offline, InsightFace) and the torch port of dlib's descriptor
ResNet (``dlib_resnet``). ``FaceService`` picks the backend from the settings."""
from utils.faces.service import AcceptedSelfie, FaceService, RejectedSelfie, SelfieReport

__all__ = ["AcceptedSelfie", "FaceService", "RejectedSelfie", "SelfieReport"]
