"""SafetyGuard (utils/safety/guard.py), the object the service will hold: set-up per profile and mode,
the verdicts per mode and age gate (with a scripted classifier), prompt refusal, and the bytes it
hands back to be written (watermarked, signed)."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tests import photos
from tests.fakes import ScriptedSafetyClassifier
from utils.config import Settings
from utils.errors import PromptRefused, TwinError
from utils.safety import classifier as cls
from utils.safety import provenance as pv
from utils.safety import watermark as wm
from utils.safety.guard import SafetyGuard
from utils.safety.policy import AgeGate

AGENT = pv.Generator("digital-twin-generator", "0.1.0", "tiny", "tiny", "plus-face")
HELD, CLEAR = AgeGate("held", "young"), AgeGate("clear", "adult")


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return pv.load_signer(None, None, tmp_path_factory.mktemp("guard") / "c2pa")


def guard_for(tmp_path, signer, mode="block", scores=(0.1, 0.9, 0.6)) -> SafetyGuard:
    settings = Settings(data_dir=tmp_path, safety_mode=mode)
    return SafetyGuard(settings, classifier=ScriptedSafetyClassifier(list(scores)), signer=signer).setup(profile="tiny")


def test_tiny_set_up_loads_the_stand_in_and_says_the_signer_is_a_development_one(tmp_path):
    settings = Settings(data_dir=tmp_path, tiny_model_dir=tmp_path / "tiny")
    guard = SafetyGuard(settings).setup(profile="tiny")
    assert (tmp_path / "tiny" / cls.LOCAL_NAME / "model.safetensors").is_file()
    assert guard.classifier.name == cls.STANDIN_NAME
    assert len(guard.warnings) == 1 and "untrusted" in guard.warnings[0]
    status = guard.status(age_gate=(False, "dlib has no age model"))
    assert status["mode"] == "block" and status["signer"]["kind"] == "dev"
    assert status["classifier"].startswith(cls.STANDIN_NAME) and status["prompt_terms"]["terms"] > 80
    assert status["age_gate"] == {"on": False, "min_apparent_age": 21, "reason": "dlib has no age model"}
    verdicts = guard.judge([photos.astronaut(), Image.new("RGB", (64, 64))])
    assert [v.result for v in verdicts] == ["passed", "passed"]        # the stand-in answers "normal"


def test_real_profile_without_the_classifier_says_how_to_fetch_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))   # whatever this box has
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path / "models")
    with pytest.raises(TwinError, match="model_loader.py download") as err:
        SafetyGuard(settings).setup(profile="sdxl", signer=False)
    assert err.value.code == "safety_model_missing"


def test_mode_off_loads_no_classifier_unless_an_age_gate_can_hold(tmp_path):
    settings = Settings(data_dir=tmp_path, safety_mode="off", tiny_model_dir=tmp_path / "tiny")
    off = SafetyGuard(settings).setup(profile="tiny", signer=False)
    assert off.classifier is None and off.classifier_note.startswith("off")
    assert [v.result for v in off.judge([photos.astronaut()], CLEAR)] == ["unchecked"]
    with pytest.raises(TwinError, match="needs the safety classifier") as err:
        off.judge([photos.astronaut()], HELD)
    assert err.value.code == "safety_model_missing"
    gated = SafetyGuard(settings).setup(profile="tiny", signer=False, age_gate=True)
    assert gated.classifier is not None
    assert [v.result for v in gated.judge([photos.astronaut()], HELD)] == ["passed"]


JUDGE = [
    ("block", None, ["passed", "blocked", "blocked"]),
    ("flag", None, ["passed", "flagged", "flagged"]),
    ("off", None, ["unchecked", "unchecked", "unchecked"]),
    ("off", CLEAR, ["unchecked", "unchecked", "unchecked"]),
    ("off", HELD, ["passed", "blocked", "blocked"]),       # held: block, whatever the setting
    ("flag", HELD, ["passed", "blocked", "blocked"]),
]


@pytest.mark.parametrize("mode,gate,results", JUDGE)
def test_verdicts_per_mode_and_gate(tmp_path, signer, mode, gate, results):
    guard = guard_for(tmp_path, signer, mode)
    verdicts = guard.judge([Image.new("RGB", (8, 8))] * 3, gate)
    assert [v.result for v in verdicts] == results
    checked = results[0] != "unchecked"
    assert [v.to_json()["model"] for v in verdicts] == ["scripted-nsfw-classifier" if checked else None] * 3
    assert guard.classifier.seen == (3 if checked else 0)


def test_threshold_setting_moves_the_line(tmp_path, signer):
    settings = Settings(data_dir=tmp_path, safety_threshold=0.95)
    guard = SafetyGuard(settings, classifier=ScriptedSafetyClassifier([0.9]), signer=signer).setup(profile="tiny")
    assert guard.judge([Image.new("RGB", (8, 8))])[0].result == "passed"


def test_prompt_check(tmp_path, signer):
    guard = guard_for(tmp_path, signer)
    guard.check_prompt({"prompt": "a portrait in Essex", "negative_prompt": "nude, nsfw"})
    with pytest.raises(PromptRefused, match="'topless'") as err:
        guard.check_prompt({"prompt": "beach photo", "persona": {"traits": ["t0pless"]}})
    assert err.value.details["field"] == "persona.traits[0]"


def test_written_bytes_are_watermarked_and_signed(tmp_path, signer):
    guard = guard_for(tmp_path, signer)
    image = photos.astronaut().resize((512, 640))
    data = guard.sign_png(image, AGENT)
    report = pv.read_provenance(data)
    assert (report.state, report.source_type, report.software_agent) == ("untrusted", "trainedAlgorithmicMedia",
                                                                         AGENT.software_agent())
    assert wm.detect(Image.open(io.BytesIO(data))).present
    plain = guard.sign_png(image, AGENT, watermark=False)
    assert not wm.detect(Image.open(io.BytesIO(plain))).present
    buf = io.BytesIO()
    image.resize((205, 256)).save(buf, "JPEG", quality=85)
    assert pv.read_provenance(guard.sign_jpeg(buf.getvalue(), AGENT)).state == "untrusted"
