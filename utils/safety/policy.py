"""Safety decisions as pure functions: no model, no I/O, no logging.

- ``judge(score, mode=..., threshold=..., model=...)`` turns one classifier score into the ``safety``
  entry every output carries (``{"result", "score", "model"}``).
- ``session_age_gate(ages, min_age)`` turns the apparent ages of a session's accepted selfies into the
  session's ``AgeGate``; ``age_gate_off(reason)`` is the gate when no age model is there (dlib).
- ``effective_mode(mode, gate)``: a held session is checked in ``block`` mode whatever the setting.

Apparent ages are biometric estimates: ``AgeGate`` keeps the median for the session record, but its
``to_json()`` and ``repr`` never show it, and nothing here logs.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

SAFETY_MODES = ("block", "flag", "off")

#: ``SafetyVerdict.result`` values. ``passed``: checked, below the threshold; ``flagged``: at or above it
#: in flag mode (served, marked); ``blocked``: at or above it in block mode (never written or served);
#: ``unchecked``: the mode is off.
RESULTS = ("passed", "flagged", "blocked", "unchecked")


@dataclass(frozen=True)
class SafetyVerdict:
    result: str
    score: float | None
    model: str | None

    @property
    def blocked(self) -> bool:
        return self.result == "blocked"

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "score": None if self.score is None else round(self.score, 4),
                "model": self.model}


def _check_mode(mode: str) -> str:
    if mode not in SAFETY_MODES:
        raise ValueError(f"safety mode {mode!r} is not one of {', '.join(SAFETY_MODES)}")
    return mode


def judge(score: float | None, *, mode: str, threshold: float, model: str | None) -> SafetyVerdict:
    """The verdict on one image. ``score`` (the probability of explicit content, 0-1) may be None only
    when ``mode`` is off: in block and flag mode an unscored image is a caller bug, not a pass."""
    _check_mode(mode)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"safety threshold {threshold!r} is not between 0 and 1")
    if mode == "off":
        return SafetyVerdict("unchecked", None, None)
    if score is None or not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise ValueError(f"safety score {score!r} is not a probability; mode {mode!r} needs one per image")
    if score < threshold:
        return SafetyVerdict("passed", float(score), model)
    return SafetyVerdict("blocked" if mode == "block" else "flagged", float(score), model)


# --------------------------------------------------------------------------------------------------
# Apparent-age gate
@dataclass(frozen=True)
class AgeGate:
    """``state``: ``clear`` (median at or above the threshold), ``held`` (below it: the session is checked
    in block mode whatever TWIN_SAFETY_MODE says), ``off`` (no age model; ``reason`` says why)."""
    state: str
    reason: str
    median_age: float | None = field(default=None, repr=False)   # for the session record only

    @property
    def held(self) -> bool:
        return self.state == "held"

    def to_json(self) -> dict[str, Any]:
        """What the upload report and /system-status may show: never the age itself."""
        return {"state": self.state, "reason": self.reason}


def session_age_gate(ages: Sequence[float | None], min_age: float) -> AgeGate:
    """The gate of a session from its accepted selfies' apparent ages (None: the backend gave none for
    that selfie). The median, so one odd estimate neither holds nor clears a session."""
    known = [float(a) for a in ages if a is not None]
    bad = [a for a in known if not math.isfinite(a) or a < 0]
    if bad:
        raise ValueError(f"apparent ages must be finite and non-negative; got {len(bad)} that are not")
    if not known:
        return age_gate_off("no accepted selfie has an apparent-age estimate")
    median = float(statistics.median(known))
    if median < min_age:
        return AgeGate("held", f"the people in these selfies may be under {min_age:g} (apparent age, median of "
                               f"{len(known)} selfie{'s' if len(known) != 1 else ''}): explicit content is "
                               "blocked for this session whatever the safety mode", median)
    return AgeGate("clear", f"median apparent age of {len(known)} selfie{'s' if len(known) != 1 else ''} is at "
                            f"least {min_age:g}", median)


def age_gate_off(reason: str) -> AgeGate:
    return AgeGate("off", reason)


def backend_age_gate(backend_name: str, has_age_model: bool) -> tuple[bool, str]:
    """(gate available, why) for a face backend, for /system-status and the session record."""
    if backend_name == "dlib":
        return False, ("the dlib face backend has no age model: the apparent-age gate is off "
                       "(TWIN_FACE_BACKEND=insightface with a pack holding genderage.onnx turns it on)")
    if not has_age_model:
        return False, (f"the {backend_name} face backend's model pack has no genderage model: the apparent-age "
                       "gate is off (buffalo_l and antelopev2 ship genderage.onnx)")
    return True, f"apparent ages from the {backend_name} pack's genderage model"


def effective_mode(mode: str, gate: AgeGate | None) -> str:
    """The mode a session's images are checked in: ``block`` when its age gate holds it."""
    _check_mode(mode)
    return "block" if gate is not None and gate.held else mode
