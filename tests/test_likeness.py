"""Likeness in the service: best-of-N (candidates), face restoration of outputs (raw kept), the selfies'
self-similarity as the score's reference, and the request rows behind them."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from generate_twin import MAX_CANDIDATES, GenerationRequest
from utils.choices import RESTORE_MODEL_NAMES
from tests.fakes import FakeFaceService, FakeGenerator, PhotoGenerator
from tests.helpers.http import assert_error, finished, upload, upload_ok
from tests.photos import selfie_set
from utils import errors
from utils.config import Settings
from utils.faces.likeness import batches, candidate_table, keep_best
from utils.faces.restore import RESTORE_MODELS, write_standin


# --- pure ranking ------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, keep, expected", [
    ([0.2, 0.9, 0.5], 1, [1]),
    ([0.2, 0.9, 0.5], 3, [1, 2, 0]),
    ([None, 0.1, None, 0.3], 2, [3, 1]),        # no face ranks below any score
    ([None, None], 1, [0]),                     # nothing scored: generation order
    ([0.5, 0.5, 0.7], 2, [2, 0]),               # ties keep generation order
])
def test_keep_best(scores, keep, expected):
    assert keep_best(scores, keep) == expected


def test_candidate_table_marks_kept_and_their_outputs():
    rows = candidate_table([7, 8, 9], [0.3, None, 0.8], [2, 0])
    assert rows == [
        {"candidate": 1, "seed": 7, "identity_similarity": 0.3, "kept": True, "output": 2},
        {"candidate": 2, "seed": 8, "identity_similarity": None, "kept": False, "output": None},
        {"candidate": 3, "seed": 9, "identity_similarity": 0.8, "kept": True, "output": 1},
    ]


@pytest.mark.parametrize("total, per_call, expected", [
    (1, 4, [(0, 1)]), (4, 4, [(0, 4)]), (6, 4, [(0, 4), (4, 2)]), (8, 4, [(0, 4), (4, 4)]), (3, 1, [(0, 1), (1, 1), (2, 1)]),
])
def test_batches(total, per_call, expected):
    assert batches(total, per_call) == expected


# --- request rows ------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    ({"num_images": 3, "candidates": 2}, "candidates=2 is fewer than num_images=3"),
    ({"candidates": MAX_CANDIDATES + 1}, f"candidates={MAX_CANDIDATES + 1}"),
    ({"candidates": 0}, "candidates=0"),
    ({"restore_model": "gfpgan-2"}, "restore_model='gfpgan-2' is not one of gfpgan, codeformer, gpen"),
    ({"restore_fidelity": 1.5}, "restore_fidelity=1.5 is not between 0.0 and 1.0"),
    ({"restore_fidelity": -0.1}, "restore_fidelity=-0.1"),
    ({"restore_faces": "yes"}, "restore_faces='yes' is not true or false"),
])
def test_bad_likeness_fields_are_refused_naming_the_value(extra, needle):
    with pytest.raises(errors.InvalidRequest) as e:
        GenerationRequest.from_dict({"prompt": "p", **extra}, Settings())
    assert needle in e.value.message


@pytest.mark.parametrize("env, payload, expected", [
    ({}, {}, (None, 1, False, "gfpgan", 0.5)),
    ({"restore_default": True, "restore_model": "codeformer"}, {"num_images": 2},
     (None, 2, True, "codeformer", 0.5)),
    ({}, {"num_images": 2, "candidates": 8, "restore_faces": True, "restore_model": "gpen", "restore_fidelity": 1},
     (8, 8, True, "gpen", 1.0)),
])
def test_likeness_defaults_come_from_settings(env, payload, expected):
    req = GenerationRequest.from_dict({"prompt": "p", **payload}, Settings(**env))
    assert (req.candidates, req.total_candidates, req.restore_faces, req.restore_model, req.restore_fidelity) == expected


def test_request_restore_names_match_the_restorer_table():
    assert RESTORE_MODEL_NAMES == tuple(RESTORE_MODELS)


# --- best-of-N with an injected score ----------------------------------------------------------

class ScoredFaces(FakeFaceService):
    """The score is the image's red level: FakeGenerator paints seed s with red (37·s) mod 256."""

    def identity_similarity(self, image, template):
        return float(np.asarray(image)[0, 0, 0]) / 255.0

    def self_similarity(self, embeddings):
        return 0.83


def red(seed: int) -> float:
    return round(((seed * 37) % 256) / 255.0, 4)


@pytest.mark.parametrize("num_images, candidates, calls", [(1, 3, 1), (2, 6, 2), (3, 8, 2), (2, None, 1)])
def test_best_of_n_keeps_the_top_scores_in_order(make_app, num_images, candidates, calls):
    gen = FakeGenerator()
    c = make_app(generator=gen, faces=ScoredFaces()).test_client()
    assert upload(c, n=3).status_code == 200
    body = {"prompt": "x", "num_images": num_images, "seed": 10}
    if candidates:
        body["candidates"] = candidates
    job = finished(c, c.post("/generate", json=body).json["id"])
    assert job["status"] == "succeeded", job
    n = candidates or num_images
    seeds = list(range(10, 10 + n))
    assert gen.calls == calls
    if candidates:
        expected = sorted(seeds, key=lambda s: (-red(s), s))[:num_images]
        assert [o["seed"] for o in job["outputs"]] == expected
        assert [o["identity_similarity"] for o in job["outputs"]] == [red(s) for s in expected]
        assert [o["filename"] for o in job["outputs"]] == [f"avatar_{i:03d}.png" for i in range(1, num_images + 1)]
        table = job["metadata"]["candidates"]
        assert [r["seed"] for r in table] == seeds
        assert [r["identity_similarity"] for r in table] == [red(s) for s in seeds]
        assert [r["seed"] for r in table if r["kept"]] == sorted(expected)
        assert all(o["self_similarity"] == 0.83 for o in job["outputs"])
        # Progress spans every candidate: steps of all calls.
        assert job["progress"]["total"] == 6 * calls and job["progress"]["step"] == 6 * calls
    else:
        assert "candidates" not in job["metadata"] and [o["seed"] for o in job["outputs"]] == seeds


def test_best_of_n_progress_and_cancel_span_the_calls(make_app):
    from tests.helpers.wait import wait_until
    gen = FakeGenerator(step_seconds=0.05)
    c = make_app(generator=gen, faces=ScoredFaces()).test_client()
    upload(c, n=3)
    job_id = c.post("/generate", json={"prompt": "x", "num_images": 1, "candidates": 8}).json["id"]
    # In the second call: the step counter goes past one call's 6 steps, out of 12.
    wait_until(lambda: c.get(f"/status/{job_id}").json["progress"]["step"] > 7, timeout=20)
    assert c.get(f"/status/{job_id}").json["progress"]["total"] == 12
    assert c.post(f"/cancel/{job_id}").status_code == 200
    job = finished(c, job_id)
    assert job["status"] == "canceled" and gen.calls == 2 and job["outputs"] == []


# --- restoration in the service ----------------------------------------------------------------

@pytest.fixture(scope="module")
def restore_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("restore-standins")
    for name, spec in RESTORE_MODELS.items():
        write_standin(d / spec.filename, name)
    return d


@pytest.mark.parametrize("model", list(RESTORE_MODELS))
def test_restored_output_keeps_its_raw_original_both_downloadable_and_deleted_with_the_session(
        make_app, service_settings, face_service, restore_dir, model):
    c = make_app(service_settings.replace(restore_model_dir=restore_dir), generator=PhotoGenerator(),
                 faces=face_service).test_client()
    up = upload_ok(c, selfie_set(3))
    assert 0 < up["self_similarity"] <= 1
    job = finished(c, c.post("/generate", json={"prompt": "x", "restore_faces": True, "restore_model": model,
                                                  "restore_fidelity": 0.2}).json["id"], timeout=60)
    assert job["status"] == "succeeded", job
    (out,) = job["outputs"]
    assert out["restored"] is True and out["restore_model"] == model and out["faces_restored"] == 1
    assert out["raw_filename"] == "avatar_001_raw.png" and "raw_path" not in out and "path" not in out
    for key in ("identity_similarity", "identity_similarity_raw"):
        assert 0 <= out[key] <= 1
    assert out["self_similarity"] == up["self_similarity"]
    restored, raw = c.get(out["url"]), c.get(out["raw_url"])
    assert restored.status_code == raw.status_code == 200
    a = np.asarray(Image.open(io.BytesIO(restored.data)).convert("RGB")).astype(int)
    b = np.asarray(Image.open(io.BytesIO(raw.data)).convert("RGB")).astype(int)
    changed = np.any(a != b, axis=2).mean()
    assert a.shape == b.shape and 0.005 < changed < 0.3     # the face changed, the rest of the picture did not
    assert c.delete(f"/sessions/{job['session_id']}").status_code == 200
    assert c.get(out["url"]).status_code == 404 and c.get(out["raw_url"]).status_code == 404


def test_output_without_a_face_is_kept_unrestored_with_a_note(make_app, service_settings, face_service, restore_dir):
    c = make_app(service_settings.replace(restore_model_dir=restore_dir), generator=PhotoGenerator(faces=False),
                 faces=face_service).test_client()
    upload_ok(c, selfie_set(3))
    job = finished(c, c.post("/generate", json={"prompt": "x", "num_images": 2, "restore_faces": True}).json["id"],
                   timeout=60)
    assert job["status"] == "succeeded"
    for out in job["outputs"]:
        assert out["restored"] is False and out["identity_similarity"] is None and "no face" in out["note"]
        assert "raw_filename" not in out and c.get(out["url"]).status_code == 200


def test_restoration_with_a_missing_model_is_refused_naming_the_file_and_command(make_app, service_settings,
                                                                                 face_service, tmp_path):
    c = make_app(service_settings.replace(restore_model_dir=tmp_path / "empty"), generator=PhotoGenerator(),
                 faces=face_service).test_client()
    upload_ok(c, selfie_set(3))
    err = assert_error(c.post("/generate", json={"prompt": "x", "restore_faces": True, "restore_model": "gpen"}),
                       400, "restore_model_missing", "gpen_bfr_512.onnx",
                       "python model_loader.py download --restore gpen")
    assert str(tmp_path / "empty") in err["message"]


def test_restore_default_setting_applies_when_the_request_is_silent(make_app, service_settings, face_service,
                                                                    restore_dir):
    c = make_app(service_settings.replace(restore_model_dir=restore_dir, restore_default=True),
                 generator=PhotoGenerator(), faces=face_service).test_client()
    upload_ok(c, selfie_set(3))
    job = finished(c, c.post("/generate", json={"prompt": "x"}).json["id"], timeout=60)
    assert job["request"]["restore_faces"] is True and job["outputs"][0]["restored"] is True


# --- the tiny profile with the real face backend -------------------------------------------------

def test_best_of_n_on_the_tiny_model_with_the_real_face_backend(make_app, service_settings, tiny_settings,
                                                               tiny_generator, face_service):
    settings = service_settings.replace(tiny_model_dir=tiny_settings.tiny_model_dir, model_profile="tiny",
                                        max_steps=tiny_settings.max_steps)
    c = make_app(settings, generator=tiny_generator, faces=face_service).test_client()
    upload_ok(c, selfie_set(3))
    job = finished(c, c.post("/generate", json={"prompt": "x", "num_images": 2, "candidates": 5, "seed": 40,
                                                  "quality_mode": "fast", "restore_faces": True}).json["id"],
                   timeout=120)
    assert job["status"] == "succeeded", job
    table = job["metadata"]["candidates"]
    assert [r["seed"] for r in table] == [40, 41, 42, 43, 44]        # two calls: 4 + 1
    assert sum(r["kept"] for r in table) == 2 and len(job["outputs"]) == 2
    kept = [r for r in table if r["kept"]]
    assert sorted(o["seed"] for o in job["outputs"]) == sorted(r["seed"] for r in kept)
    scores = [o["identity_similarity"] for o in job["outputs"]]
    assert scores == sorted(scores, key=lambda s: (s is None, -(s or 0)))
    assert job["progress"]["step"] == job["progress"]["total"] == 2 * job["metadata"]["steps"]
    for o in job["outputs"]:   # the tiny model draws no faces: kept as generated, with the note
        assert o.get("restored") in (True, False) and c.get(o["url"]).status_code == 200


@pytest.mark.parametrize("output, expected_keys", [
    ({"filename": "avatar_001.png", "path": "s/outputs/j/avatar_001.png", "seed": 1},
     {"job_id", "filename", "seed", "url"}),
    ({"filename": "avatar_001.png", "path": "s/outputs/j/avatar_001.png", "seed": 1, "restored": True,
      "raw_filename": "avatar_001_raw.png", "raw_path": "s/outputs/j/avatar_001_raw.png"},
     {"job_id", "filename", "seed", "url", "restored", "raw_filename", "raw_url"}),
])
def test_output_events_never_carry_server_paths(output, expected_keys):
    """SSE output events (and webhook bodies, same filter) show URLs, never the stored paths."""
    from utils.api.events import render_event
    from utils.jobs.events import Event
    body = render_event(Event(1, "output", output), {"id": "j"}, render_job=lambda j: j,
                        output_url=lambda job_id, name: f"/download/{job_id}/{name}")
    assert set(body) == expected_keys
    if "raw_url" in body:
        assert body["raw_url"] == "/download/j/avatar_001_raw.png"
