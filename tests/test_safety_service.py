"""Safety and provenance in the service (docs/SAFETY.md): every file a job writes (output, raw output,
thumbnail) is C2PA-signed with no biometric field and served as signed; the classifier's decision is
honoured in each TWIN_SAFETY_MODE (a classifier double with injected scores); explicit prompts are refused
at submit; a session the apparent-age gate holds is checked in block mode whatever the mode."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fakes import FakeFaceService, PhotoGenerator, fake_safety, image_bytes
from tests.helpers.http import assert_error, finished, submit, upload, upload_token
from utils.safety.provenance import read_provenance
from utils.service.output_safety import generator_for

BIOMETRIC_WORDS = ("selfie", "crop", "embedding", "session", "face_", "ingredient", "thumbnail")


class RestoringFaces(FakeFaceService):
    """Finds one face in every image, so restore_faces keeps a raw output beside the restored one."""

    def detect_faces(self, image) -> list:
        return [object()]


class FakeRestorer:
    def check(self, name: str) -> None:
        return None

    def restore(self, image, detections, *, model: str, fidelity=None):
        return SimpleNamespace(image=image.transpose(0), faces=len(detections))


def guarded_app(make_app, service_settings, scores=(0.0,), mode: str = "block", **kw):
    settings = service_settings.replace(safety_mode=mode)
    safety = fake_safety(settings, scores)
    app = make_app(settings, safety=safety, **kw)
    return app, safety


def job_files(app, job: dict) -> dict[str, Path]:
    """Every file of a job on disk: {name: path}."""
    rt = app.extensions["twin"]
    folder = rt.storage.output_dir(job["session_id"], job["id"])
    return {p.name: p for p in folder.iterdir()} if folder.is_dir() else {}


def trust_anchor(safety) -> bytes:
    return (Path(safety.signer.chain_path).parent / "dev-ca.pem").read_bytes()


# --- provenance ---------------------------------------------------------------------------------

def test_every_file_of_a_job_is_signed_without_biometric_fields(make_app, service_settings):
    app, safety = guarded_app(make_app, service_settings, generator=PhotoGenerator(faces=False),
                              faces=RestoringFaces())
    app.extensions["twin"].restorer = FakeRestorer()
    client = app.test_client()
    headers = upload_token(client)
    job = finished(client, submit(client, headers, num_images=2, width=320, height=320,
                                  restore_faces=True)["id"], headers)
    assert job["status"] == "succeeded", job["error"]
    files = job_files(app, job)
    assert sorted(files) == ["avatar_001.png", "avatar_001.thumb.jpg", "avatar_001_raw.png",
                             "avatar_002.png", "avatar_002.thumb.jpg", "avatar_002_raw.png"]
    urls = [u for o in job["outputs"] for u in (o["url"], o["raw_url"], o["thumbnail_url"])]
    assert len(urls) == 6
    anchors = trust_anchor(safety)
    for url in urls:
        served = client.get(url, headers=headers).data
        assert served == files[url.rsplit("/", 1)[1]].read_bytes()    # /download serves the signed bytes
        report = read_provenance(served, trust_anchors=anchors)
        assert report.state == "valid", (url, report)
        assert report.source_type == "trainedAlgorithmicMedia"
        assert set(report.software_agent) == {"name", "version", "model_family", "model", "identity_method"}
        text = json.dumps(report.software_agent).lower()
        assert job["session_id"].lower() not in text and job["id"].lower() not in text
        assert not any(w in text for w in BIOMETRIC_WORDS), text
    assert job["metadata"]["service_timings"]["provenance_s"] > 0


def test_a_flipped_byte_reads_as_tampered(make_app, service_settings):
    app, safety = guarded_app(make_app, service_settings)
    client = app.test_client()
    headers = upload_token(client)
    job = finished(client, submit(client, headers, num_images=1)["id"], headers)
    data = bytearray(client.get(job["outputs"][0]["url"], headers=headers).data)
    assert read_provenance(bytes(data)).state == "untrusted"    # intact; no trust anchor given
    data[len(data) // 2] ^= 0x01
    assert read_provenance(bytes(data)).state == "tampered"


# --- the classifier's decision, per mode ---------------------------------------------------------

@pytest.mark.parametrize("mode,scores,payload,results,files,seen", [
    # block: the explicit image is never written, its entry says so; the job still succeeds.
    ("block", [0.9, 0.1], {"num_images": 2}, ["blocked", "passed"], ["avatar_002.png"], 2),
    # flag: served and marked.
    ("flag", [0.9, 0.1], {"num_images": 2}, ["flagged", "passed"], ["avatar_001.png", "avatar_002.png"], 2),
    # off: not checked at all.
    ("off", [0.9], {"num_images": 2}, ["unchecked", "unchecked"], ["avatar_001.png", "avatar_002.png"], 0),
    # best-of-N: the blocked candidates count as rejected; the one that passes is kept.
    ("block", [0.9, 0.95, 0.1], {"num_images": 1, "candidates": 3}, ["passed"], ["avatar_001.png"], 3),
])
def test_classifier_decision_per_mode(make_app, service_settings, mode, scores, payload, results, files, seen):
    app, safety = guarded_app(make_app, service_settings, scores, mode)
    client = app.test_client()
    headers = upload_token(client)
    job = finished(client, submit(client, headers, **payload)["id"], headers)
    assert job["status"] == "succeeded", job["error"]
    assert [o["safety"]["result"] for o in job["outputs"]] == results
    assert safety.classifier.seen == seen
    stored = sorted(n for n in job_files(app, job) if n.endswith(".png"))
    assert stored == files
    for o in job["outputs"]:
        if o["safety"]["result"] == "blocked":
            assert "url" not in o and "filename" not in o and "not stored" in o["note"]
            assert o["safety"]["score"] == 0.9 and o["safety"]["model"] == "scripted-nsfw-classifier"
            assert_error(client.get(f"/download/{job['id']}/avatar_{o['index']:03d}.png", headers=headers),
                         404, "not_found")
        else:
            assert client.get(o["url"], headers=headers).status_code == 200
        if o["safety"]["result"] == "flagged":
            assert "flagged" in o["note"]
    if "candidates" in payload:
        rows = job["metadata"]["candidates"]
        assert [r["safety"]["result"] for r in rows] == ["blocked", "blocked", "passed"]
        assert [r["kept"] for r in rows] == [False, False, True]
        assert "2 candidates were blocked" in job["metadata"]["ranking"]["note"]


def test_a_job_whose_every_image_is_blocked_fails(make_app, service_settings):
    app, _ = guarded_app(make_app, service_settings, [0.99])
    client = app.test_client()
    headers = upload_token(client)
    job = finished(client, submit(client, headers, num_images=2)["id"], headers)
    assert job["status"] == "failed" and job["error"]["code"] == "safety_blocked"
    assert job["outputs"] == [] and job_files(app, job) == {}


def test_each_output_log_line_carries_its_verdict(make_app, service_settings, caplog):
    app, _ = guarded_app(make_app, service_settings, [0.7, 0.2], "flag")
    client = app.test_client()
    headers = upload_token(client)
    with caplog.at_level(logging.INFO, logger="twin.runner"):
        job = finished(client, submit(client, headers, num_images=2)["id"], headers)
    assert job["status"] == "succeeded"
    lines = [r for r in caplog.records if r.name == "twin.runner" and r.getMessage() == "output stored"]
    assert [r.safety["result"] for r in lines] == ["flagged", "passed"]


# --- the prompt check at submit ------------------------------------------------------------------

def styles_with_an_explicit_one(tmp_path: Path) -> Path:
    from utils.config import Settings
    data = json.loads(Settings().resolved_styles_file.read_text())
    data["styles"]["boudoir"] = {"description": "x", "positive": "{prompt}, nude boudoir photo", "negative": ""}
    path = tmp_path / "styles.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("payload,field,term", [
    ({"prompt": "a NUDE portrait on a beach"}, "prompt", "nude"),
    ({"prompt": "a portrait", "persona": {"name": "Ann", "traits": ["calm", "naked"]}}, "persona.traits[1]", "naked"),
    ({"prompt": "a portrait", "attributes": {"outfit": "nsfw lingerie"}}, "attributes.outfit", "nsfw"),
    ({"prompt": "a portrait", "style": "boudoir"}, "style", "nude"),
])
def test_explicit_text_is_refused_before_queueing(make_app, service_settings, tmp_path, payload, field, term):
    app, safety = guarded_app(make_app, service_settings.replace(styles_file=styles_with_an_explicit_one(tmp_path)))
    client = app.test_client()
    headers = upload_token(client)
    r = client.post("/generate", json=payload, headers=headers)
    err = assert_error(r, 400, "prompt_refused", repr(term), "negative_prompt")
    assert err["details"]["field"] == field and err["details"]["term"] == term
    assert app.extensions["twin"].store.counts()["queued"] == 0 and safety.classifier.seen == 0


@pytest.mark.parametrize("payload", [
    {"prompt": "a portrait in a garden", "negative_prompt": "nsfw, nude, naked"},   # how users keep it out
    {"prompt": "a portrait", "style": "photoreal"},
])
def test_clean_text_and_negative_prompts_are_accepted(client, payload):
    headers = upload_token(client)
    job = finished(client, submit(client, headers, **payload)["id"], headers)
    assert job["status"] == "succeeded"


def test_without_a_face_identity_the_prompt_is_not_refused(client):
    headers = upload_token(client)   # a caller token; identity='none' uses no selfie
    r = client.post("/generate", json={"prompt": "a nude statue in a museum", "identity": "none"}, headers=headers)
    assert r.status_code == 202, r.data


# --- the apparent-age gate ------------------------------------------------------------------------

class AgedFaces(FakeFaceService):
    """A face service whose backend estimates ages (as InsightFace with genderage): every accepted selfie
    gets the next age of ``ages``."""
    backend_name = "insightface"

    def __init__(self, ages) -> None:
        super().__init__()
        self.ages = list(ages)
        self.backend = SimpleNamespace(has_age_model=True)

    def validate_selfies(self, files):
        report = super().validate_selfies(files)
        ages = [self.ages[i % len(self.ages)] for i in range(len(report.accepted))]
        report.apparent_ages = lambda: ages
        return report


@pytest.mark.parametrize("faces,mode,scores,state,results,seen", [
    # Looks under 21: held to block although the mode is off; the explicit image is not stored.
    # (Ages with two odd decimals: a log line leaking one is told apart from timings such as "16.5 ms".)
    (lambda: AgedFaces([15.37, 16.83, 17.29]), "off", [0.9, 0.1], "held", ["blocked", "passed"], 2),
    (lambda: AgedFaces([15.37, 16.83, 17.29]), "flag", [0.9, 0.1], "held", ["blocked", "passed"], 2),
    # Looks older: the mode applies as set.
    (lambda: AgedFaces([34.61, 41.73, 17.29]), "off", [0.9], "clear", ["unchecked", "unchecked"], 0),
    # No age model (the dlib backend, the double): the gate is off and says why.
    (FakeFaceService, "flag", [0.9, 0.1], "off", ["flagged", "passed"], 2),
])
def test_the_age_gate_holds_a_session_to_block(make_app, service_settings, caplog, faces, mode, scores, state,
                                               results, seen):
    face_service = faces()
    app, safety = guarded_app(make_app, service_settings, scores, mode, faces=face_service)
    client = app.test_client()
    with caplog.at_level(logging.DEBUG):
        r = upload(client, n=3)
    body = r.get_json()
    assert r.status_code == 200 and body["safety"]["state"] == state
    assert set(body["safety"]) == {"state", "reason"}           # never the estimate itself
    held = [w for w in body["warnings"] if w["code"] == "explicit_content_blocked"]
    assert bool(held) == (state == "held")
    logged = " ".join(r.getMessage() + json.dumps(getattr(r, "__dict__", {}), default=str) for r in caplog.records)
    ages = [str(a) for a in getattr(face_service, "ages", [])]
    assert not any(age in logged for age in ages), "an apparent age reached a log line"
    headers = {"X-Client-Token": body["client_token"]}
    job = finished(client, submit(client, headers, num_images=2, session_id=body["session_id"])["id"], headers)
    assert job["status"] == "succeeded", job["error"]
    assert [o["safety"]["result"] for o in job["outputs"]] == results
    assert safety.classifier.seen == seen
    if state == "off":
        assert "apparent-age gate is off" in body["safety"]["reason"]


# --- python generate_twin.py provenance ----------------------------------------------------------

def test_provenance_command_reads_each_state(make_app, service_settings, tmp_path, capsys):
    import io

    from PIL import Image

    from tests import photos
    from utils.cli.generate import main
    app, safety = guarded_app(make_app, service_settings)
    agent = generator_for(app.extensions["twin"].engines[0], SimpleNamespace(identity_source="session"))
    signed = safety.sign_png(photos.astronaut().resize((320, 320)), agent)
    flipped = bytearray(signed)
    flipped[len(flipped) // 2] ^= 0x01
    stripped = io.BytesIO()
    Image.open(io.BytesIO(signed)).save(stripped, "PNG")        # a re-encode drops the manifest, keeps the mark
    files = {"signed.png": signed, "tampered.png": bytes(flipped), "stripped.png": stripped.getvalue()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    anchors = Path(safety.signer.chain_path).parent / "dev-ca.pem"
    code = main(["provenance", *(str(tmp_path / n) for n in files), "--trust-anchors", str(anchors)])
    lines = [ln.removeprefix(str(tmp_path) + "/") for ln in capsys.readouterr().out.splitlines()
             if ln.startswith(str(tmp_path))]                # (the app's JSON log lines share stdout)
    assert lines[0].startswith("signed.png: manifest valid, source trainedAlgorithmicMedia, by digital-twin-generator")
    assert lines[0].endswith("watermark present (48/48 bits)")
    assert lines[1].startswith("tampered.png: manifest tampered")
    assert lines[2] == "stripped.png: manifest absent; watermark present (48/48 bits)"
    assert code == 2       # the flipped byte also broke the PNG's compressed pixels: "do not decode"
    assert main(["provenance", str(tmp_path / "signed.png"), str(tmp_path / "stripped.png")]) == 0
    (tmp_path / "plain.png").write_bytes(image_bytes(size=(320, 320)))
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["provenance", str(tmp_path / "plain.png")]) == 1
    assert main(["provenance", str(tmp_path / "notes.txt")]) == 2
    out = capsys.readouterr().out
    assert "plain.png: manifest absent; watermark absent" in out and "notes.txt: not a PNG or JPEG" in out


# --- /system-status ------------------------------------------------------------------------------

@pytest.mark.parametrize("faces,mode,gate_on,gate_says", [
    (FakeFaceService, "block", False, "no genderage model"),
    (lambda: AgedFaces([30]), "off", True, "apparent ages from the insightface pack"),
])
def test_system_status_tells_the_safety_set_up(make_app, service_settings, faces, mode, gate_on, gate_says):
    app, _ = guarded_app(make_app, service_settings, mode=mode, faces=faces())
    s = app.test_client().get("/system-status").get_json()["safety"]
    assert s["mode"] == mode and s["classifier"].startswith("scripted-nsfw-classifier")
    assert s["age_gate"]["on"] is gate_on and gate_says in s["age_gate"]["reason"]
    assert s["age_gate"]["min_apparent_age"] == 21
    assert s["signer"]["kind"] == "dev" and s["signer"]["trusted_by_readers"].startswith("no")
    assert "TWIN_C2PA_CERT" in s["certificate_help"] and s["prompt_terms"]["terms"] > 50
    assert "DWT-DCT-SVD" in s["watermark"]


def test_the_development_signer_is_said_loudly_at_start_up(service_settings, caplog):
    from tests.fakes import FakeGenerator
    from utils.service.wiring import build_runtime
    settings = service_settings.replace(safety_mode="off")
    with caplog.at_level(logging.WARNING):
        rt = build_runtime(settings, engines=[FakeGenerator()], faces=FakeFaceService())
        rt.start()
        try:
            assert rt.wait_ready(20), rt.setup_error
        finally:
            rt.shutdown()
    loud = [r for r in caplog.records if "DEVELOPMENT certificate" in r.getMessage()]
    assert len(loud) == 1 and loud[0].levelno == logging.WARNING
    assert (settings.data_dir / "c2pa" / "dev-ca.pem").is_file()
    assert rt.safety.status()["warnings"] == [loud[0].getMessage()]


@pytest.mark.parametrize("flags,refused", [
    (["--prompt", "a nude portrait"], "prompt contains 'nude'"),
    (["--prompt", "a portrait", "--persona", '{"traits": ["topless"]}'], "persona.traits[0] contains 'topless'"),
])
def test_the_cli_refuses_explicit_text_before_loading_a_model(tmp_path, capsys, flags, refused):
    from tests.helpers.http import fake_selfies
    from utils.cli.generate import main
    selfies = tmp_path / "selfies"
    selfies.mkdir()
    for name, data in fake_selfies(2):
        (selfies / name).write_bytes(data)

    def no_faces(settings):
        raise AssertionError("the refusal comes before the face service or a model is set up")
    code = main(["--selfies", str(selfies), "--out", str(tmp_path / "out"), "--profile", "tiny", *flags],
                face_service_factory=no_faces)
    assert code == 2 and refused in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- webhooks ------------------------------------------------------------------------------------

def test_webhook_payloads_carry_each_outputs_verdict(make_app, service_settings):
    from tests.helpers.wait import wait_until
    from tests.helpers.webhooks import SECRET, Receiver
    receiver = Receiver()
    try:
        settings = service_settings.replace(webhook_secret=SECRET, webhook_allow_private=True)
        app, _ = guarded_app(make_app, settings, [0.9, 0.1])
        client = app.test_client()
        headers = upload_token(client)
        submit(client, headers, num_images=2, webhook=receiver.url, webhook_events=["output", "completed"])
        wait_until(lambda: "job.completed" in receiver.events(), timeout=10)
        bodies = [json.loads(r["body"])["data"] for r in receiver.received]
    finally:
        receiver.close()
    outputs = [b for b in bodies if "safety" in b and "status" not in b]
    assert [o["safety"]["result"] for o in outputs] == ["blocked", "passed"]
    assert "filename" not in outputs[0] and outputs[1]["filename"] == "avatar_002.png"
    done = bodies[-1]
    assert done["status"] == "succeeded" and done["outputs"] == ["avatar_002.png"]
    assert [(s["filename"], s["result"], s["score"]) for s in done["safety"]] == [
        (None, "blocked", 0.9), ("avatar_002.png", "passed", 0.1)]
