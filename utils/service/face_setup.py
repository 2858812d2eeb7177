"""What the face service needs before it starts: the settings it runs with (the tiny profile's stand-in
InsightFace pack for the ArcFace variants), that pack written, and a face backend that fits the identity
variant."""
from __future__ import annotations

from utils import errors
from utils.choices import ARCFACE_VARIANTS, face_pack
from utils.config import Settings


def face_settings(settings: Settings) -> Settings:
    """The settings the face service runs with. An ArcFace variant on the tiny profile, with no InsightFace
    pack configured or present, uses the tiny stand-in antelopev2 pack that the tiny builder writes (real
    pack I/O, tiny graphs), so the tiny profile runs these variants end to end offline."""
    from utils.faces.backends import insightface_pack_files
    if (settings.ip_adapter_variant not in ARCFACE_VARIANTS or settings.face_backend == "dlib"
            or settings.insightface_model_dir is not None or insightface_pack_files(settings.resolved_insightface_dir)):
        return settings
    from utils.models.layout import ANTELOPE_DIR, choose_profile
    if choose_profile(settings) != "tiny":
        return settings
    return settings.replace(insightface_model_dir=settings.resolved_tiny_model_dir / ANTELOPE_DIR)


def prepare_face_models(settings: Settings) -> None:
    """Builds the tiny folder (and so its stand-in face pack) when the face service is to use it."""
    pack = settings.insightface_model_dir
    tiny = settings.resolved_tiny_model_dir
    if pack is not None and tiny in pack.parents:
        from utils.models.tiny import make_tiny
        make_tiny(tiny)


def check_face_backend(settings: Settings, faces) -> None:
    """An ArcFace adapter with the dlib backend (128-d descriptors) cannot work: stop at start-up with what
    to install, rather than at every upload."""
    variant = settings.ip_adapter_variant
    if variant in ARCFACE_VARIANTS and faces.backend_name == "dlib":
        raise errors.ModelWeightsMissing(
            f"TWIN_IP_ADAPTER_VARIANT={variant} needs 512-d ArcFace face embeddings, but the face backend is dlib "
            f"(128-d). Install the InsightFace backend: pip install --no-deps insightface==2.1 and "
            f"pip install onnxruntime (onnxruntime-gpu on a GPU box), put the {face_pack(variant)} pack's .onnx "
            f"files in {settings.resolved_insightface_dir} (or set TWIN_INSIGHTFACE_MODEL_DIR), and set "
            f"TWIN_FACE_BACKEND=insightface (or auto)", code="face_models_missing")
