"""Which likeness a generation runs with: ``identity_mode`` (auto | adapter | lora | both) against the
session's trained twin LoRA (utils/service/training.py writes it) and the family of the model that runs it."""
from __future__ import annotations

from pathlib import Path

from utils import errors
from utils.contracts import Storage
from utils.engine.training.files import LORA_FILE, read_record
from utils.engine.training.loras import TwinLora


def twin_from_dir(twin_dir: Path) -> TwinLora | None:
    """The twin LoRA in a folder (twin_lora.safetensors + record.json), or None."""
    path = Path(twin_dir) / LORA_FILE
    record = read_record(twin_dir) if path.is_file() else None
    if record is None:
        return None
    return TwinLora(path=str(path), token=record["token"], caption=record["caption"], family=record["family"],
                    base_model=record["base_model"], trained_at=float(record["trained_at"]))


def session_twin(storage: Storage, session_id: str) -> TwinLora | None:
    """The session's trained twin LoRA, or None (none trained, or a backend that cannot hold one)."""
    try:
        return twin_from_dir(Path(storage.twin_dir(session_id)))
    except errors.TwinError:
        return None


def resolve_twin(storage: Storage, session_id: str | None, mode: str, model: dict | None) -> tuple[TwinLora | None, str]:
    """(the session's twin LoRA to use or None, the mode that runs): see ``resolve_mode``."""
    twin = session_twin(storage, session_id) if session_id and mode != "adapter" else None
    return resolve_mode(twin, mode, model, f"session {session_id!r}", f"POST /sessions/{session_id}/train")


def resolve_mode(twin: TwinLora | None, mode: str, model: dict | None, owner: str,
                 how: str = "train one") -> tuple[TwinLora | None, str]:
    """``model``: {family, model_name} of the model that will run the job (None when not known yet: an API
    node of a cluster; the GPU worker checks again). auto -> both with a twin of that family, else adapter;
    lora/both: 409 ``no_twin_lora`` without one, 409 ``twin_lora_wrong_family`` naming both models."""
    if mode == "adapter":
        return None, "adapter"
    family = (model or {}).get("family")
    if mode == "auto":
        usable = twin is not None and (family is None or twin.family == family)
        return (twin, "both") if usable else (None, "adapter")
    if twin is None:
        raise errors.Conflict(f"identity_mode={mode!r} needs a trained twin LoRA and {owner} has none: {how}, "
                              "or use identity_mode='adapter'", code="no_twin_lora")
    if family is not None and twin.family != family:
        raise errors.Conflict(f"identity_mode={mode!r}: the twin LoRA of {owner} was trained on "
                              f"{twin.base_model!r} ({twin.family}), but the active model "
                              f"{(model or {}).get('model_name')!r} is {family}; load a {twin.family} model or "
                              "use identity_mode='adapter'", code="twin_lora_wrong_family")
    return twin, mode
