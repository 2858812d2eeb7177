"""What a session stores about its accepted selfies, as files: built here once for either backend (a
folder or a bucket), and read back into ``SessionFaces``."""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from utils.storage.names import FACES_FILE, META_FILE, REPORT_FILE, crop_name, original_name


@dataclass
class SessionFaces:
    """A session's accepted selfies as the face service described them (``Storage.session_faces``)."""
    indices: list[int]                    # upload index of each accepted selfie
    crops: list                           # aligned face crops (PIL RGB)
    embeddings: list                      # unit face embeddings (np.float32), one per accepted selfie
    face_model: str | None
    template: Any = None                  # mean of the normalised embeddings
    norms: list | None = None             # raw ArcFace lengths (InsightFace); None per selfie without one
    keypoints: list | None = None         # 5 face points per selfie in its photo (InsightFace), or None
    crop_keypoints: list | None = None    # the same points in each crop's pixels, or None

    def identity_inputs(self) -> dict[str, Any]:
        """``build_identity(**...)``'s face inputs beyond crops and embeddings (as SelfieReport.identity_inputs)."""
        if self.norms is None and self.keypoints is None:
            return {}
        n = len(self.indices)
        return {"embedding_norms": self.norms or [None] * n, "keypoints": self.keypoints or [None] * n,
                "keypoint_index": list(self.indices),
                "crop_keypoints": self.crop_keypoints or [None] * n}


def face_features_bytes(report) -> bytes:
    """Embeddings, template, raw ArcFace lengths and key points of the accepted selfies (NaN where a backend
    gives none), so an identity can be built again later for any identity method (safetensors)."""
    import numpy as np
    from safetensors.numpy import save
    acc = report.accepted
    tensors = {"embeddings": np.stack([np.asarray(a.embedding, dtype=np.float32) for a in acc]),
               "indices": np.asarray([a.index for a in acc], dtype=np.int32)}
    if report.template is not None:
        tensors["template"] = np.asarray(report.template, dtype=np.float32)
    inputs = report.identity_inputs()
    if inputs.get("embedding_norms") is not None:
        tensors["norms"] = np.asarray([np.nan if n is None else n for n in inputs["embedding_norms"]], np.float32)
    for name in ("keypoints", "crop_keypoints"):
        if inputs.get(name) is not None:
            tensors[name] = np.stack([np.full((5, 2), np.nan, np.float32) if k is None
                                      else np.asarray(k, np.float32).reshape(5, 2) for k in inputs[name]])
    return save(tensors, metadata={"model_name": str(report.model_name)})


def session_files(session_id: str, *, owner_hash: str, files: list[tuple[str, bytes]], report,
                  created_at: float | None, self_similarity: float | None) -> list[tuple[str, bytes]]:
    """(name in the session, bytes) of everything an accepted upload stores but its identity; meta.json last:
    its presence says the session is complete."""
    out = [(original_name(i, name), data) for i, (name, data) in enumerate(files)]
    for a in report.accepted:
        buf = io.BytesIO()
        a.crop.save(buf, format="PNG")
        out.append((crop_name(a.index), buf.getvalue()))
    out.append((FACES_FILE, face_features_bytes(report)))
    report_json = report.to_json()
    if self_similarity is not None:
        report_json["self_similarity"] = self_similarity
    out.append((REPORT_FILE, json.dumps(report_json, indent=2, sort_keys=True).encode()))
    meta = {"session_id": session_id, "owner": owner_hash, "created_at": created_at or time.time(),
            "files": len(files), "accepted": len(report.accepted), "rejected": len(report.rejected),
            "face_model": str(report.model_name), "self_similarity": self_similarity}
    out.append((META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode()))
    return out


def read_session_faces(faces_file: Path, crops: Callable[[list[int]], list[Path]]) -> SessionFaces:
    """SessionFaces from the stored face features and ``crops(indices)``, the local files of the crops."""
    from PIL import Image
    import numpy as np
    from safetensors.numpy import safe_open
    with safe_open(str(faces_file), framework="numpy") as f:
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}
    indices = [int(i) for i in t["indices"]]
    images = []
    for path in crops(indices):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    norms = [None if not np.isfinite(v) else float(v) for v in t["norms"]] if "norms" in t else None
    kps, crop_kps = ([None if not np.all(np.isfinite(k)) else k for k in t[name]] if name in t else None
                     for name in ("keypoints", "crop_keypoints"))
    return SessionFaces(indices=indices, crops=images, embeddings=list(t["embeddings"]),
                        face_model=meta.get("model_name") or None, template=t.get("template"),
                        norms=norms, keypoints=kps, crop_keypoints=crop_kps)


def read_template(faces_file: Path):
    from safetensors.numpy import load_file
    return load_file(str(faces_file)).get("template")


def persona_meta(session_id: str, *, owner_hash: str, created_at: float) -> bytes:
    """meta.json of a persona session (the session of one identity='none' job): no selfies, no face data."""
    return json.dumps({"session_id": session_id, "owner": owner_hash, "created_at": created_at,
                       "kind": "persona"}, indent=2, sort_keys=True).encode()


def meta_self_similarity(raw: bytes) -> float | None:
    try:
        value = json.loads(raw).get("self_similarity")
    except (ValueError, AttributeError):
        return None
    return None if value is None else float(value)
