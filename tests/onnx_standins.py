"""Tiny ONNX stand-ins for an InsightFace model pack: the builders live in ``utils.faces.standins`` (the
tiny model builder writes an ``antelopev2`` stand-in pack with them too); re-exported for the tests."""
from utils.faces.standins import (ANCHORS, DET_SIZE, STRIDES, build_detector, build_pack,  # noqa: F401
                                  build_recognizer)
