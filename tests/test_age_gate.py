"""The apparent-age gate: InsightFace's genderage model gives each accepted selfie an apparent age
(utils/faces), the session's median decides (utils/safety/policy.py), a held session is checked in
block mode whatever TWIN_SAFETY_MODE says, and no age reaches a log line or the upload report."""
from __future__ import annotations

import json
import logging

import pytest

from tests import photos
from utils.config import Settings
from utils.errors import ConfigError
from utils.faces import FaceService
from utils.faces.standins import build_pack
from utils.safety.policy import AgeGate, age_gate_off, backend_age_gate, effective_mode, session_age_gate

GATE_CASES = [
    ("all adults", [34, 40, 29], "clear", 34.0),
    ("all young", [15, 16, 14], "held", 15.0),
    ("one young outlier does not hold", [35, 36, 15], "clear", 35.0),
    ("one adult outlier does not clear", [15, 16, 40], "held", 16.0),
    ("median exactly at the threshold", [20, 21, 22], "clear", 21.0),
    ("even count: mean of the middle two", [20, 21.5], "held", 20.75),
    ("ages missing for some selfies", [None, 17, None, 18, 19], "held", 18.0),
    ("no ages at all", [None, None], "off", None),
    ("no selfies", [], "off", None),
]


@pytest.mark.parametrize("case,ages,state,median", GATE_CASES, ids=[c[0] for c in GATE_CASES])
def test_session_gate(case, ages, state, median):
    gate = session_age_gate(ages, 21)
    assert gate.state == state and gate.held == (state == "held")
    assert gate.median_age == median


def test_gate_never_shows_the_age():
    gate = session_age_gate([15.0, 16.0, 17.0], 21)
    assert "16" not in repr(gate) and "16" not in json.dumps(gate.to_json())
    assert set(gate.to_json()) == {"state", "reason"}
    assert "under 21" in gate.reason and "whatever the safety mode" in gate.reason


@pytest.mark.parametrize("ages", [[float("nan")], [-1.0, 30.0], [float("inf")]])
def test_gate_refuses_impossible_ages(ages):
    with pytest.raises(ValueError, match="finite and non-negative"):
        session_age_gate(ages, 21)


MODE_CASES = [
    ("off", "held", "block"),
    ("flag", "held", "block"),
    ("block", "held", "block"),
    ("off", "clear", "off"),
    ("flag", "clear", "flag"),
    ("off", "off", "off"),
    ("flag", None, "flag"),
]


@pytest.mark.parametrize("mode,state,expected", MODE_CASES)
def test_held_session_is_checked_in_block_mode_whatever_the_setting(mode, state, expected):
    gate = None if state is None else AgeGate(state, "why")
    assert effective_mode(mode, gate) == expected


def test_unknown_mode_is_a_bug():
    with pytest.raises(ValueError, match="not one of"):
        effective_mode("lenient", None)


@pytest.mark.parametrize("backend,has_model,available,words", [
    ("dlib", False, False, "dlib face backend has no age model"),
    ("insightface", False, False, "no genderage model"),
    ("insightface", True, True, "genderage"),
])
def test_which_backends_can_gate(backend, has_model, available, words):
    on, why = backend_age_gate(backend, has_model)
    assert on is available and words in why


def test_min_apparent_age_setting():
    assert Settings().min_apparent_age == 21
    assert Settings.from_env({"TWIN_MIN_APPARENT_AGE": "25"}).min_apparent_age == 25
    with pytest.raises(ConfigError, match="TWIN_MIN_APPARENT_AGE=17 is below the minimum 18"):
        Settings.from_env({"TWIN_MIN_APPARENT_AGE": "17"})
    with pytest.raises(ConfigError, match="TWIN_SAFETY_MODE='lenient' is not one of block, flag, off"):
        Settings.from_env({"TWIN_SAFETY_MODE": "lenient"})


# --------------------------------------------------------------------------------------------------
# Through the face service
@pytest.fixture(scope="module")
def age_services(tmp_path_factory):
    """FaceService on stand-in InsightFace packs whose faces look 15, 35, or (no genderage model) ageless."""
    out = {}
    for label, age in (("young", 15.0), ("adult", 35.0), ("no age model", None)):
        root = tmp_path_factory.mktemp("age-pack")
        settings = Settings(data_dir=root / "data", face_backend="insightface", min_face_px=20,
                            insightface_model_dir=build_pack(root / "pack", age=age))
        out[label] = FaceService(settings).setup()
    yield out
    for service in out.values():
        service.close()


@pytest.mark.parametrize("label,state,near", [("young", "held", 15), ("adult", "clear", 35), ("no age model", "off", None)])
def test_each_accepted_selfie_gets_an_apparent_age(age_services, caplog, label, state, near):
    service = age_services[label]
    caplog.set_level(logging.DEBUG)
    report = service.validate_selfies(photos.selfie_set(3) + [("flat.png", photos.to_bytes(
        photos.Image.new("RGB", (300, 300), (120, 120, 120)), "PNG"))])
    assert len(report.accepted) == 3 and len(report.rejected) == 1
    ages = report.apparent_ages()
    if near is None:
        assert ages == [None, None, None]
        assert backend_age_gate(service.backend.name, service.backend.has_age_model)[0] is False
    else:
        assert all(abs(a - near) <= 5 for a in ages), ages        # the stand-in adds up to ±5 years
        assert backend_age_gate(service.backend.name, service.backend.has_age_model) == (
            True, "apparent ages from the insightface pack's genderage model")
    gate = session_age_gate(ages, service.settings.min_apparent_age)
    assert gate.state == state
    # Never in the report's JSON, never in a log line.
    assert not _keys_with_age(report.to_json())
    assert not any("age" in r.getMessage().replace("age model", "").split() or "apparent" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert "apparent_age" not in repr(report.accepted[0])


def test_upload_report_is_the_same_whatever_the_age(age_services):
    """The report a client and the logs see carries no trace of the estimate: a young-looking and an
    adult-looking set (same detector and recogniser) give the same JSON."""
    files = photos.selfie_set(3)
    young, adult = (age_services[k].validate_selfies(files) for k in ("young", "adult"))
    assert young.apparent_ages() != adult.apparent_ages()
    assert young.to_json() == adult.to_json()


def _keys_with_age(obj) -> list[str]:
    if isinstance(obj, dict):
        return [k for k in obj if "age" in k.split("_")] + [x for v in obj.values() for x in _keys_with_age(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _keys_with_age(v)]
    return []


def test_dlib_backend_says_the_gate_is_off(face_service):
    assert face_service.backend.has_age_model is False
    assert backend_age_gate(face_service.backend.name, face_service.backend.has_age_model)[0] is False
    report = face_service.validate_selfies(photos.selfie_set(2))
    assert report.apparent_ages() == [None, None]
    assert session_age_gate(report.apparent_ages(), 21) == age_gate_off("no accepted selfie has an apparent-age estimate")
