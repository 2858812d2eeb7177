"""The CLI end to end on the tiny profile: photos -> faces -> identity -> images.

Most tests inject tests.fakes.CliFaceService (any decodable image is a face) instead of the real face
pipeline, so they need no face model; the likeness report runs on the real dlib backend."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import generate_twin
from ipadapter_manager import SessionIdentity
from tests.fakes import CliFaceService

ROOT = Path(__file__).resolve().parents[1]


def write_selfies(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (160, 128, 3), dtype=np.uint8)).save(folder / f"selfie_{i}.jpg")
    (folder / "notes.txt").write_text("not a photo")          # ignored: not an image suffix
    (folder / "broken.png").write_bytes(b"not really a png")  # rejected by the face service
    return folder


@pytest.fixture
def cli_env(monkeypatch, tiny_models, tmp_path):
    monkeypatch.setenv("TWIN_MODEL_PROFILE", "tiny")
    monkeypatch.setenv("TWIN_TINY_MODEL_DIR", str(tiny_models))
    monkeypatch.setenv("TWIN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TWIN_MODEL_DIR", str(tmp_path / "no-models"))
    monkeypatch.setenv("TWIN_WARMUP", "0")
    monkeypatch.setenv("TWIN_MAX_STEPS", "3")
    return tmp_path


@pytest.mark.parametrize("extra, n_images, combine", [
    ([], 1, "average"),
    (["--num-images", "2", "--seed", "11", "--quality", "fast", "--combine", "stack"], 2, "stack"),
])
def test_cli_runs_the_whole_path(cli_env, capsys, extra, n_images, combine):
    selfies, out = write_selfies(cli_env / "selfies"), cli_env / "out"
    rc = generate_twin.main(["--selfies", str(selfies), "--prompt", "a portrait in a forest", "--out", str(out),
                             *extra], face_service_factory=CliFaceService)
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "step 1/" in text.out and "accepted 3 of 4" in text.out and "rejected broken.png" in text.out
    assert "DEMO MODEL" in text.out
    pngs = sorted(out.glob("avatar_*.png"))
    assert [p.name for p in pngs] == [f"avatar_{i:03d}.png" for i in range(1, n_images + 1)]
    assert Image.open(pngs[0]).size == (128, 128)
    meta = json.loads((out / "metadata.json").read_text())
    assert len(meta["result"]["seeds"]) == n_images
    ident = SessionIdentity.load(out / "identity.safetensors")
    assert ident.combine == combine and ident.num_selfies == 3 and ident.face_model == "fake-arcface-512"


@pytest.mark.parametrize("args, needle", [
    (["--num-images", "5"], "num_images=5"),
    (["--strength", "nan"], "identity_strength=nan"),
])
def test_cli_reports_bad_requests(cli_env, capsys, args, needle):
    selfies = write_selfies(cli_env / "selfies", 1)
    rc = generate_twin.main(["--selfies", str(selfies), "--prompt", "p", "--out", str(cli_env / "o"), *args],
                            face_service_factory=CliFaceService)
    assert rc == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["--identity", "none", "--selfies", "SELFIES"], "--identity none makes an avatar without selfies"),
    ([], "--selfies is required (or --identity none"),
    (["--identity", "none", "--strength", "0.5"], "identity_strength=0.5 applies to a face identity"),
])
def test_cli_identity_none_takes_no_selfies(cli_env, capsys, args, needle):
    selfies = str(write_selfies(cli_env / "selfies", 1))
    rc = generate_twin.main(["--prompt", "p", "--out", str(cli_env / "o"), *(selfies if a == "SELFIES" else a
                                                                              for a in args)],
                            face_service_factory=CliFaceService)
    assert rc == 2 and needle in capsys.readouterr().err


def test_cli_makes_an_avatar_from_a_persona_alone(cli_env, capsys):
    out = cli_env / "out"
    rc = generate_twin.main(["--identity", "none", "--prompt", "a portrait in a forest", "--out", str(out),
                             "--persona", '{"age": 40}', "--num-images", "1", "--candidates", "2", "--seed", "5",
                             "--quality", "fast"], face_service_factory=CliFaceService)
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "no photos" in text.out and "checking faces" not in text.out
    assert [p.name for p in sorted(out.glob("avatar_*.png"))] == ["avatar_001.png"]
    assert not (out / "identity.safetensors").exists()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["request"]["identity"] == "none" and meta["result"]["identity"] is None
    assert meta["result"]["ranking"]["ranked"] is False and meta["outputs"][0]["seed"] == 5
    assert meta["result"]["prompt"].startswith("a 40-year-old")


def test_cli_with_no_photos_is_a_clear_error(cli_env, capsys):
    (cli_env / "empty").mkdir()
    rc = generate_twin.main(["--selfies", str(cli_env / "empty"), "--prompt", "p", "--out", str(cli_env / "o")],
                            face_service_factory=CliFaceService)
    assert rc == 2 and "no images found" in capsys.readouterr().err


def test_cli_in_a_fresh_process_builds_the_tiny_model(tmp_path):
    """Fresh interpreter, no tiny model on disk yet: imports + model creation + faces + generation."""
    selfies = write_selfies(tmp_path / "selfies", 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env.update(TWIN_MODEL_PROFILE="tiny", TWIN_DATA_DIR=str(tmp_path / "data"), TWIN_MODEL_DIR=str(tmp_path / "m"),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    code = ("import sys, generate_twin; from tests.fakes import CliFaceService; "
            "sys.exit(generate_twin.main(sys.argv[1:], face_service_factory=CliFaceService))")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, "--selfies", str(selfies), "--prompt", "portrait",
                        "--out", str(tmp_path / "out"), "--quality", "fast"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "data" / "tiny-model" / "tiny_model.json").is_file()
    assert (tmp_path / "out" / "avatar_001.png").is_file()
    print(f"fresh-process CLI wall time: {wall:.1f} s")  # the number is reported by bench, not asserted


# --- evaluate: the likeness report -------------------------------------------------------------

def test_evaluate_reports_each_image_and_the_selfies_agreement(tmp_path, face_service, capsys):
    """Real dlib backend on photos from the wheels: the same person scores above another person, a
    picture without a face says so, and the selfies' self-similarity is the reference line."""
    from tests.photos import astronaut_variant, selfie_set, to_bytes, tom_hanks
    selfies, images = tmp_path / "selfies", tmp_path / "images"
    selfies.mkdir()
    images.mkdir()
    for name, data in selfie_set(4):
        (selfies / name).write_bytes(data)
    (images / "a_same_person.png").write_bytes(to_bytes(astronaut_variant(7), "PNG"))
    (images / "b_other_person.png").write_bytes(to_bytes(tom_hanks(), "PNG"))
    (images / "c_no_face.png").write_bytes(to_bytes(Image.new("RGB", (200, 200), (90, 120, 150)), "PNG"))
    report_path = tmp_path / "report.json"
    rc = generate_twin.main(["evaluate", "--selfies", str(selfies), "--images", str(images), "--json", str(report_path)],
                            face_service_factory=lambda s: face_service)
    assert rc == 0
    rep = json.loads(report_path.read_text())
    rows = {r["image"]: r for r in rep["images"]}
    assert rows["a_same_person.png"]["face_found"] and rows["b_other_person.png"]["face_found"]
    assert rows["a_same_person.png"]["identity_similarity"] > 0.5 > rows["b_other_person.png"]["identity_similarity"]
    assert rows["c_no_face.png"] == {"image": "c_no_face.png", "face_found": False, "identity_similarity": None}
    assert rep["overall"]["faces_found"] == 2 and rep["selfies"]["accepted"] == 4
    assert 0.5 < rep["selfies"]["self_similarity"] <= 1
    out = capsys.readouterr().out
    assert "they agree at" in out and "c_no_face.png: no face found" in out and "a_same_person.png: likeness" in out


@pytest.mark.parametrize("make, needle", [
    (lambda root: (root / "selfies").mkdir(), "no images found in --selfies"),
])
def test_evaluate_bad_folders_exit_2_naming_them(tmp_path, capsys, face_service, make, needle):
    make(tmp_path)
    (tmp_path / "images").mkdir()
    rc = generate_twin.main(["evaluate", "--selfies", str(tmp_path / "selfies"), "--images", str(tmp_path / "images")],
                            face_service_factory=lambda s: face_service)
    assert rc == 2 and needle in capsys.readouterr().err


def _cli_parser():
    import argparse
    ap = argparse.ArgumentParser(exit_on_error=False)
    generate_twin.add_request_flags(ap)
    return ap


@pytest.mark.parametrize("field", [f.name for f in generate_twin.REQUEST_FIELDS])
def test_every_request_field_has_a_cli_flag(field):
    # Generated from the table: a field added later reaches the CLI without anyone listing it.
    flags = {o: a.dest for a in _cli_parser()._actions for o in a.option_strings}
    assert flags.get(generate_twin.cli_flag(field)) == field


@pytest.mark.parametrize("args, field, value", [
    (["--quality", "fast"], "quality_mode", "fast"),                      # historic alias names still work
    (["--strength", "0.7"], "identity_strength", 0.7),
    (["--img2img-strength", "0.4"], "strength", 0.4),
    (["--width", "512", "--height", "640"], "height", 640),
    (["--candidates", "3"], "candidates", 3),
    (["--restore-faces"], "restore_faces", True),
    (["--no-preview"], "preview", False),
    (["--restore-model", "codeformer"], "restore_model", "codeformer"),
    (["--persona", '{"hair": "red"}'], "persona", {"hair": "red"}),
])
def test_generated_flags_parse_to_field_values(args, field, value):
    ns = _cli_parser().parse_args(["--prompt", "p", *args])
    assert getattr(ns, field) == value


def test_object_flags_read_at_file(tmp_path):
    (tmp_path / "persona.json").write_text('{"age": 30}')
    ns = _cli_parser().parse_args(["--prompt", "p", "--persona", f"@{tmp_path / 'persona.json'}"])
    assert ns.persona == {"age": 30}


@pytest.mark.parametrize("args, needle", [
    (["--num-images", "5"], "num_images=5"),                  # from_dict's own message, as the API gives it
    (["--candidates", "99"], "99"),
    (["--width", "100"], "100"),
    (["--restore-model", "nope"], "'nope'"),                  # argparse choices from the row's enum
    (["--persona", "{not json"], "'{not json'"),
    (["--persona", "@/no/such.json"], "/no/such.json"),
    (["--candidates", "3"], "needs a face template"),        # this fake face service makes none
    (["--model", "nope"], "model='nope' is not a local base model; available: tiny-sdxl, tiny-flux, tiny-alt, "
                          "tiny-flux-alt"),
])
def test_generated_flags_bad_values_exit_2_naming_the_value(cli_env, capsys, args, needle):
    selfies = write_selfies(cli_env / "selfies", 1)
    try:
        rc = generate_twin.main(["--selfies", str(selfies), "--prompt", "p", "--out", str(cli_env / "o"), *args],
                                face_service_factory=CliFaceService)
    except SystemExit as e:  # argparse's own type/choices errors
        rc = e.code
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_cli_model_flag_starts_on_that_checkpoint(cli_env, capsys):
    selfies, out = write_selfies(cli_env / "selfies", 1), cli_env / "out"
    rc = generate_twin.main(["--selfies", str(selfies), "--prompt", "p", "--out", str(out), "--model", "tiny-alt"],
                            face_service_factory=CliFaceService)
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "(tiny-alt)" in text.out
    assert json.loads((out / "metadata.json").read_text())["request"]["model"] == "tiny-alt"


class ScoredFaceService(CliFaceService):
    """Adds the scoring half of the contract: a template, and a likeness score = the image's mean red level."""

    def validate_selfies(self, files):
        report = super().validate_selfies(files)
        report.template = np.ones(512, dtype=np.float32) / np.sqrt(512)
        return report

    def identity_similarity(self, image, template):
        return float(np.asarray(image.convert("RGB"))[..., 0].mean()) / 255.0

    def self_similarity(self, embeddings):
        return 0.83


@pytest.mark.parametrize("num_images, candidates", [(1, 3), (2, 5)])
def test_cli_best_of_n_keeps_the_best_and_lists_every_candidate(cli_env, capsys, num_images, candidates):
    selfies, out = write_selfies(cli_env / "selfies", 2), cli_env / "out"
    rc = generate_twin.main(["--selfies", str(selfies), "--prompt", "p", "--out", str(out), "--seed", "5",
                             "--num-images", str(num_images), "--candidates", str(candidates)],
                            face_service_factory=ScoredFaceService)
    assert rc == 0, capsys.readouterr().err
    assert len(list(out.glob("avatar_*.png"))) == num_images
    meta = json.loads((out / "metadata.json").read_text())
    rows = meta["result"]["candidates"]
    assert [r["seed"] for r in rows] == list(range(5, 5 + candidates))      # consecutive seeds, as the service
    assert sum(r["kept"] for r in rows) == num_images
    best = sorted((r["identity_similarity"] for r in rows), reverse=True)[:num_images]
    assert [o["identity_similarity"] for o in meta["outputs"]] == best
    assert all(o["self_similarity"] == 0.83 for o in meta["outputs"]) and meta["self_similarity"] == 0.83
    # the kept image on disk is the best candidate's
    score = ScoredFaceService().identity_similarity(Image.open(out / "avatar_001.png"), None)
    assert round(score, 4) == best[0]


def test_cli_restore_faces_writes_the_raw_copy_and_both_scores(cli_env, capsys, face_service, monkeypatch):
    """Real dlib faces and the tiny restoration stand-ins; the tiny model paints no faces, so its outputs are
    swapped for a real face photo (as tests.fakes.PhotoGenerator does for the service) after it ran."""
    from tests.fakes import FakeResult
    from tests.photos import astronaut_variant, selfie_set
    real_generate = generate_twin.DigitalTwinGenerator.generate

    def with_a_face(self, req, **kw):
        r = real_generate(self, req, **kw)
        return FakeResult(images=[astronaut_variant(s % 4, 320) for s in r.seeds], seeds=r.seeds, metadata=r.metadata)
    monkeypatch.setattr(generate_twin.DigitalTwinGenerator, "generate", with_a_face)
    selfies, out = cli_env / "selfies", cli_env / "out"
    selfies.mkdir()
    for name, data in selfie_set(3):
        (selfies / name).write_bytes(data)
    rc = generate_twin.main(["--selfies", str(selfies), "--prompt", "p", "--out", str(out), "--restore-faces",
                             "--restore-model", "gfpgan"], face_service_factory=lambda s: face_service)
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("avatar_*.png")) == ["avatar_001.png", "avatar_001_raw.png"]
    (o,) = json.loads((out / "metadata.json").read_text())["outputs"]
    assert o["restored"] is True and o["raw_filename"] == "avatar_001_raw.png" and o["faces_restored"] == 1
    assert 0 <= o["identity_similarity"] <= 1 and 0 <= o["identity_similarity_raw"] <= 1
    assert 0 < o["self_similarity"] <= 1
