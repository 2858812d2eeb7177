"""What the job runner needs of the safety guard (utils/safety/guard.py) besides the guard itself: which
images of a run may be stored, what the manifest says made them, the session's apparent-age gate as its
record keeps it, and the entries and notes a blocked or flagged image gets. Nothing here loads a model."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from utils import errors
from utils.safety.policy import AgeGate, SafetyVerdict, age_gate_off, backend_age_gate, session_age_gate
from utils.safety.provenance import Generator
from utils.storage import thumbnail_bytes
from utils.version import VERSION

SERVICE = "digital-twin-generator"
BLOCKED_NOTE = "blocked by the safety check: not stored"
FLAGGED_NOTE = "flagged by the safety check (TWIN_SAFETY_MODE=flag)"


def setup_args(settings, info: dict, faces, holds_models: bool) -> dict:
    """How a process sets its guard up: the classifier where jobs run (on the engine's device, float16 on
    CUDA), also with TWIN_SAFETY_MODE=off when the apparent-age gate may hold a session (the face backend
    estimates ages; a cluster's GPU worker cannot know the API nodes' backend, so it assumes so)."""
    device = str(info.get("device") or "cpu")
    dtype = None
    if device.startswith("cuda"):
        import torch
        dtype = torch.float16
    return {"profile": str(info.get("profile") or "unknown"), "classifier": holds_models, "signer": True,
            "age_gate": face_age_model(faces) or (settings.cluster and holds_models), "device": device,
            "dtype": dtype}


def selfie_age_gate(faces, report, min_age: float) -> AgeGate:
    """The apparent-age gate of a set of accepted selfies: the median of their estimates against
    TWIN_MIN_APPARENT_AGE, or off (and why) when the face backend has no age model."""
    on, why = backend_age_gate(faces.backend_name, face_age_model(faces))
    ages = getattr(report, "apparent_ages", None)
    if not on or ages is None:
        return age_gate_off(why if not on else "the face service gives no apparent ages")
    return session_age_gate(ages(), min_age)


def face_age_model(faces) -> bool:
    """Whether the face service's backend estimates apparent ages (InsightFace with genderage)."""
    return bool(getattr(getattr(faces, "backend", None), "has_age_model", False))


def prompt_fields(req, settings) -> dict[str, Any]:
    """The texts of a request the term list checks when a face identity is used: the prompt, the persona,
    the attributes and the style's own text (never negative_prompt)."""
    style_text = None
    if getattr(req, "style", None):
        from utils.engine.tuning import style_library
        style = style_library(settings).get(req.style)
        style_text = None if style is None else style.positive.replace("{prompt}", " ")
    return {"prompt": getattr(req, "prompt", None), "persona": getattr(req, "persona", None),
            "attributes": getattr(req, "attributes", None), "style": style_text}


def generator_for(engine, req) -> Generator:
    """The manifest's software agent: the service, the model that ran (family, name) and the identity
    method. Plain names only: no session, job, selfie or embedding ever goes in."""
    try:
        info = dict(engine.info())
    except Exception:  # noqa: BLE001 - a generator process that is restarting: the names are still known
        info = {}
    family = str(info.get("family") or info.get("profile") or "unknown")
    method = "none" if getattr(req, "identity_source", None) == "none" else str(info.get("variant") or "none")
    return Generator(SERVICE, VERSION, family, str(info.get("model_name") or "unknown"), method)


def session_gate(session: dict | None) -> AgeGate | None:
    """The age gate a session record keeps (``age_gate``, ``age_gate_reason``; set at upload), or None for a
    session without one (a persona session, a session from before the gate existed)."""
    if not session or not session.get("age_gate"):
        return None
    return AgeGate(str(session["age_gate"]), str(session.get("age_gate_reason") or ""))


@dataclass
class Screened:
    """A run's candidates after the safety check: ``allowed`` (indices that may be stored, in order) and
    one verdict per candidate."""
    verdicts: list[SafetyVerdict]
    allowed: list[int]

    @property
    def blocked(self) -> int:
        return len(self.verdicts) - len(self.allowed)


def screen(safety, images: Sequence[Any], gate: AgeGate | None) -> Screened:
    """One classifier batch over every candidate. Fails the job with ``safety_blocked`` when none passes."""
    verdicts = list(safety.judge(list(images), gate))
    allowed = [i for i, v in enumerate(verdicts) if not v.blocked]
    if images and not allowed:
        n = len(images)
        raise errors.TwinError(f"all {n} generated image{'s were' if n != 1 else ' was'} blocked by the safety "
                               "check (explicit content); none was stored. Change the prompt and try again",
                               code="safety_blocked", http_status=422,
                               details={"blocked": n, "model": verdicts[0].model})
    return Screened(verdicts, allowed)


def blocked_entry(rank: int, seed: int, image, verdict: SafetyVerdict) -> dict:
    """The output entry of a blocked image: no file name, path or thumbnail (nothing to download)."""
    return {"index": rank, "seed": int(seed), "width": image.width, "height": image.height,
            "safety": verdict.to_json(), "note": BLOCKED_NOTE}


def mark(output: dict, verdict: SafetyVerdict) -> None:
    """A stored output's ``safety`` entry, and the note a flagged one carries."""
    output["safety"] = verdict.to_json()
    if verdict.result == "flagged":
        output["note"] = f"{output['note']}; {FLAGGED_NOTE}" if output.get("note") else FLAGGED_NOTE


class SignedEncoder:
    """One run's writer of bytes: every PNG watermarked and signed, every JPEG thumbnail signed, by the same
    software agent; ``seconds`` adds up the time it took (metadata.service_timings.provenance_s)."""

    def __init__(self, safety, generator: Generator) -> None:
        self.safety, self.generator, self.seconds = safety, generator, 0.0

    def png(self, image) -> bytes:
        t0 = time.perf_counter()
        try:
            return self.safety.sign_png(image, self.generator)
        finally:
            self.seconds += time.perf_counter() - t0

    def thumbnail(self, image, side: int) -> bytes:
        t0 = time.perf_counter()
        try:
            return self.safety.sign_jpeg(thumbnail_bytes(image, side), self.generator)
        finally:
            self.seconds += time.perf_counter() - t0
