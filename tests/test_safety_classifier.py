"""The NSFW image classifier (utils/safety/classifier.py): the stand-in in the real layout, loading from a
folder or the Hugging Face cache, scoring, the header-only check, and how a score becomes the verdict in
each safety mode (utils/safety/policy.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests import photos
from tests.fakes import ScriptedSafetyClassifier
from utils.errors import ModelWeightsMissing
from utils.safety import classifier as cls
from utils.safety.policy import SafetyVerdict, judge


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return cls.write_standin(tmp_path_factory.mktemp("nsfw") / cls.LOCAL_NAME)


@pytest.fixture(scope="module")
def loaded(standin) -> cls.ViTSafetyClassifier:
    return cls.load_classifier(standin, name=cls.STANDIN_NAME)


def test_standin_has_the_real_layout(standin):
    assert sorted(p.name for p in standin.iterdir()) == sorted(cls.FILES)
    config = json.loads((standin / "config.json").read_text())
    assert config["model_type"] == "vit" and config["architectures"] == ["ViTForImageClassification"]
    assert config["id2label"] == {"0": "normal", "1": "nsfw"}
    assert (config["image_size"], config["patch_size"]) == (224, 16)
    assert json.loads((standin / "preprocessor_config.json").read_text()) == json.loads(json.dumps(cls.PREPROCESSOR))
    assert (standin / "model.safetensors").stat().st_size < 200_000


def test_download_spec_names_the_files_the_loader_needs():
    assert cls.DOWNLOAD.repo_id == "Falconsai/nsfw_image_detection"
    assert cls.DOWNLOAD.files == cls.FILES and cls.DOWNLOAD.licence == "Apache-2.0"


def test_scores_are_probabilities_in_order(loaded):
    images = [photos.astronaut().resize((832, 1216)), photos.group(), Image.new("RGBA", (64, 64), (0, 0, 0, 0))]
    scores = loaded.score(images)
    assert len(scores) == 3 and all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert max(scores) < 0.01        # the stand-in is biased to "normal": tiny outputs pass in block mode
    assert loaded.score(images[1:2]) == pytest.approx(scores[1:2], abs=1e-6)   # batch = one by one
    assert loaded.score([]) == []
    assert loaded.name == cls.STANDIN_NAME


def test_score_sums_every_explicit_label(tmp_path):
    """A classifier with several labels (neutral / porn / hentai ...) scores the explicit ones together."""
    import torch
    from transformers import ViTForImageClassification

    folder = cls.write_standin(tmp_path / "five")
    model = ViTForImageClassification.from_pretrained(str(folder))
    model.config.id2label = {0: "drawings", 1: "hentai", 2: "neutral", 3: "porn", 4: "sexy"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.classifier = torch.nn.Linear(model.config.hidden_size, 5)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0]))
    model.config.num_labels = 5
    model.save_pretrained(str(folder))
    score = cls.ViTSafetyClassifier(folder).load().score([photos.astronaut()])[0]
    e = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0]).exp()
    assert score == pytest.approx(float((e[1] + e[3]) / e.sum()), abs=1e-5)   # "sexy" is not explicit


def test_labels_without_an_explicit_class_are_refused(tmp_path, standin):
    folder = shutil.copytree(standin, tmp_path / "cats")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "cat", "1": "dog"}, {"cat": 0, "dog": 1}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelWeightsMissing, match="name no explicit class"):
        cls.ViTSafetyClassifier(folder).load()


def test_found_in_the_hugging_face_cache(tmp_path, standin):
    """No local folder: the hub cache's snapshot of the repo is used (local_files_only, nothing fetched)."""
    cache = tmp_path / "hub"
    snap = cache / "models--Falconsai--nsfw_image_detection" / "snapshots" / ("a" * 40)
    shutil.copytree(standin, snap)
    (cache / "models--Falconsai--nsfw_image_detection" / "refs").mkdir()
    (cache / "models--Falconsai--nsfw_image_detection" / "refs" / "main").write_text("a" * 40)
    assert cls.find_classifier(tmp_path / "nowhere", cache_dir=cache) == snap
    model = cls.load_classifier(tmp_path / "nowhere", cache_dir=cache)
    assert model.name == cls.REPO_ID and len(model.score([photos.astronaut()])) == 1


def test_missing_classifier_says_how_to_fetch_it(tmp_path):
    assert cls.find_classifier(tmp_path / "nowhere", cache_dir=tmp_path / "empty-cache") is None
    with pytest.raises(ModelWeightsMissing, match="model_loader.py download") as err:
        cls.load_classifier(tmp_path / "nowhere", cache_dir=tmp_path / "empty-cache")
    assert err.value.code == "safety_model_missing" and "TWIN_SAFETY_MODE=off" in err.value.message


def test_real_and_scripted_classifiers_obey_the_protocol(loaded):
    assert isinstance(loaded, cls.SafetyClassifier)
    fake = ScriptedSafetyClassifier([0.1, 0.9])
    assert isinstance(fake, cls.SafetyClassifier)
    assert fake.score([None, None, None]) == [0.1, 0.9, 0.9] and fake.seen == 3


# --------------------------------------------------------------------------------------------------
# Header-only check
def _edit_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _edit_json(folder: Path, name: str, change) -> None:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))


VERIFY_CASES = [
    ("intact", lambda f: None, "model.safetensors", "ok", "40 tensors, F32"),
    ("weights missing", lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "missing", "Falconsai"),
    ("weights truncated", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500]),
     "model.safetensors", "corrupt", ""),
    ("config of another size", lambda f: _edit_json(f, "config.json", lambda c: c.update(hidden_size=48)),
     "model.safetensors", "wrong_shape", "expected"),
    ("a tensor missing", lambda f: _edit_weights(f, lambda t: t.pop("classifier.bias")), "model.safetensors",
     "missing_key", "classifier.bias"),
    ("an extra tensor", lambda f: _edit_weights(f, lambda t: t.update({"extra.weight": t["classifier.bias"].clone()})),
     "model.safetensors", "unexpected_key", "extra.weight"),
    ("integer weights", lambda f: _edit_weights(f, lambda t: t.update({"classifier.bias": t["classifier.bias"].long()})),
     "model.safetensors", "wrong_dtype", "classifier.bias"),
    ("labels without nsfw", lambda f: _edit_json(f, "config.json", lambda c: c.update(id2label={"0": "a", "1": "b"})),
     "config.json", "corrupt", "no explicit class"),
    ("config not JSON", lambda f: (f / "config.json").write_text("{"), "config.json", "corrupt", ""),
    ("preprocessor with two means", lambda f: _edit_json(f, "preprocessor_config.json",
                                                         lambda c: c.update(image_mean=[0.5, 0.5])),
     "preprocessor_config.json", "corrupt", "3 values"),
    ("preprocessor without size", lambda f: _edit_json(f, "preprocessor_config.json", lambda c: c.pop("size")),
     "preprocessor_config.json", "corrupt", "KeyError"),
]


@pytest.mark.parametrize("case,change,file,status,detail", VERIFY_CASES, ids=[c[0] for c in VERIFY_CASES])
def test_verify_reads_headers_only(tmp_path, standin, case, change, file, status, detail):
    folder = shutil.copytree(standin, tmp_path / "copy")
    change(folder)
    checks = {Path(c.path).name: c for c in cls.verify_classifier(folder)}
    assert (checks[file].status, detail in checks[file].detail) == (status, True), checks[file]
    if status == "ok":
        assert all(c.status == "ok" for c in checks.values()) and len(checks) == 3


def test_verify_checks_against_the_file_layout_not_the_in_memory_names(standin):
    """transformers 5 renames ViT modules in memory (attention.k_proj) but files keep the saved names
    (attention.attention.key): the check must expect the saved names, as the published file has them."""
    from safetensors import safe_open

    with safe_open(str(standin / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "vit.encoder.layer.0.attention.attention.key.weight" in keys
    assert [c.status for c in cls.verify_classifier(standin)] == ["ok", "ok", "ok"]


# --------------------------------------------------------------------------------------------------
# The verdict per mode
JUDGE_CASES = [
    (0.10, "block", 0.5, "passed"),
    (0.50, "block", 0.5, "blocked"),
    (0.99, "block", 0.5, "blocked"),
    (0.49, "flag", 0.5, "passed"),
    (0.70, "flag", 0.5, "flagged"),
    (0.70, "block", 0.8, "passed"),
    (0.99, "off", 0.5, "unchecked"),
    (None, "off", 0.5, "unchecked"),
    (0.00, "block", 0.0, "blocked"),
]


@pytest.mark.parametrize("score,mode,threshold,result", JUDGE_CASES)
def test_verdict(score, mode, threshold, result):
    verdict = judge(score, mode=mode, threshold=threshold, model="m")
    assert verdict.result == result
    assert verdict.blocked == (result == "blocked")
    expected_json = {"result": result, "score": None if mode == "off" else score, "model": None if mode == "off" else "m"}
    assert verdict.to_json() == expected_json


@pytest.mark.parametrize("score,mode,threshold,message", [
    (None, "block", 0.5, "needs one per image"),
    (1.5, "flag", 0.5, "not a probability"),
    (float("nan"), "block", 0.5, "not a probability"),
    (0.2, "strict", 0.5, "not one of block, flag, off"),
    (0.2, "block", 1.5, "not between 0 and 1"),
])
def test_verdict_refuses_bad_input(score, mode, threshold, message):
    with pytest.raises(ValueError, match=message):
        judge(score, mode=mode, threshold=threshold, model="m")


def test_verdict_json_rounds_the_score():
    assert SafetyVerdict("flagged", 0.123456789, "m").to_json()["score"] == 0.1235
