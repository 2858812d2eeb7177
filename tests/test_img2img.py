"""img2img: the init_image forms, the shared img2img pipeline, strength's effect, and the service's
resolution of selfies / own outputs / inline data (another caller's output is 404)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from generate_twin import GenerationRequest
from tests.helpers.http import finished, upload_token
from tests.photos import selfie_set
from utils.errors import InvalidRequest
from utils.init_image import fit_image, parse_init_image

JOB = "A" * 22


def gradient(w: int = 96, h: int = 96) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx * 2, yy * 2, xx + yy], -1).astype(np.uint8))


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("value, kind, describe", [
    ("selfie:0", "selfie", "selfie:0"),
    ("selfie:12", "selfie", "selfie:12"),
    (f"{JOB}/avatar_002.png", "output", f"{JOB}/avatar_002.png"),
    ("data:image/png;base64," + base64.b64encode(b"\x89PNG....").decode(), "upload", "upload (8 bytes)"),
    (base64.b64encode(b"abc").decode(), "upload", "upload (3 bytes)"),          # bare base64
])
def test_the_three_forms(value, kind, describe):
    ref = parse_init_image(value, 1000)
    assert ref.kind == kind and ref.describe() == describe


@pytest.mark.parametrize("payload, needle", [
    ({"init_image": "selfie:x"}, "selfie:N"),
    ({"init_image": "selfie:-1"}, "selfie:N"),
    ({"init_image": f"{JOB}/../etc/passwd"}, "is not selfie:N"),
    ({"init_image": "data:text/html;base64,PGI+"}, "data:image/<type>;base64,"),
    ({"init_image": "not base64 at all!"}, "valid base64"),
    ({"init_image": ""}, "init_image=''"),
    ({"init_image": 7}, "init_image=7"),
    ({"init_image": "data:image/png;base64," + "A" * 2_000_000}, "characters; at most"),
    ({"init_image": "selfie:0", "strength": 0.01}, "strength=0.01"),
    ({"init_image": "selfie:0", "strength": 1.5}, "strength=1.5"),
    ({"init_image": "selfie:0", "strength": "half"}, "strength='half'"),
    ({"strength": 0.5}, "strength=0.5 applies to img2img only"),
])
def test_bad_init_image_values_name_the_value(tiny_settings, payload, needle):
    s = tiny_settings.replace(max_file_mb=1.0)
    with pytest.raises(InvalidRequest) as e:
        GenerationRequest.from_dict({"prompt": "p", **payload}, s)
    assert needle in e.value.message


def test_inline_data_is_not_echoed_into_the_job_record(tiny_settings):
    url = data_url(gradient())
    d = GenerationRequest.from_dict({"prompt": "p", "init_image": url, "strength": 0.3}, tiny_settings).to_dict()
    assert d["init_image"].startswith("upload (") and d["strength"] == 0.3
    assert GenerationRequest.from_dict({"prompt": "p"}, tiny_settings).to_dict()["strength"] is None


@pytest.mark.parametrize("size, out", [((96, 96), (64, 32)), ((40, 200), (64, 64)), ((300, 100), (48, 96))])
def test_fit_image_covers_and_crops_to_the_request_size(size, out):
    assert fit_image(Image.new("RGB", size), *out).size == out


def test_the_img2img_pipeline_shares_the_loaded_modules(tiny_generator):
    i2i = tiny_generator.model.img2img_pipe()
    pipe = tiny_generator.models.pipe
    assert type(i2i).__name__ == "StableDiffusionXLImg2ImgPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "image_encoder"):
        assert getattr(i2i, name) is getattr(pipe, name), name
    assert tiny_generator.model.img2img_pipe() is i2i                       # built once
    # The identity adapter lives in the UNet's attention processors: the same objects serve both pipelines.
    assert i2i.unet.attn_processors is not None and i2i.unet is pipe.unet


def test_strength_moves_the_picture_monotonically_away_from_the_init_image(tiny_generator, tiny_settings, face_crops):
    """Tiny profile (random weights, steps capped at 3): the mean absolute difference to the init image,
    averaged over two seeds, grows with strength; the denoised steps are int(steps * strength)."""
    init = gradient()
    url = data_url(init)
    ref = np.asarray(init, dtype=np.float32)
    identity = tiny_generator.build_identity(face_crops)
    diffs, steps = [], []
    for strength in (0.2, 0.7, 1.0):
        d = []
        for seed in (1, 2):
            req = GenerationRequest.from_dict({"prompt": "a portrait", "style": "none", "width": 96, "height": 96,
                                               "seed": seed, "init_image": url, "strength": strength},
                                              tiny_settings).with_identity(identity)
            res = tiny_generator.generate(req)
            assert res.images[0].size == (96, 96)
            d.append(float(np.abs(np.asarray(res.images[0], dtype=np.float32) - ref).mean()))
        diffs.append(sum(d) / len(d))
        steps.append(res.metadata["img2img"]["denoise_steps"])
        assert res.metadata["img2img"]["strength"] == strength and res.metadata["identity_strength"] > 0
    assert steps == [1, 2, 3]
    assert diffs[0] < diffs[1] < diffs[2], diffs


# --- through the service ------------------------------------------------------------------------------
@pytest.fixture(params=["folder", "bucket"])
def i2i_app(request, make_app, service_settings, tiny_generator, face_service, open_s3):
    """On the data folder, and on an S3 bucket (moto's server on loopback: tests/fixtures/s3.py), where the
    start picture and the selfie it names are objects."""
    settings = service_settings.replace(max_image_side=128, max_file_mb=1.0)
    if request.param == "bucket":
        settings = settings.replace(**open_s3("moto").storage_settings())
    return make_app(settings, generator=tiny_generator, faces=face_service)


def test_img2img_through_the_api(i2i_app):
    c, c_bob = i2i_app.test_client(), i2i_app.test_client()     # one client (cookie jar) per caller
    alice, bob = upload_token(c, selfie_set(1)), upload_token(c_bob, selfie_set(1))
    base = {"prompt": "a portrait", "style": "none", "width": 64, "height": 64, "strength": 0.5}

    def gen(token, **kw):
        return (c_bob if token is bob else c).post("/generate", headers=token, json={**base, **kw})

    r = gen(alice, init_image="selfie:0")
    assert r.status_code == 202, r.get_json()
    first = finished(c, r.get_json()["id"], alice, timeout=60)
    assert first["status"] == "succeeded", first["error"]
    assert first["metadata"]["img2img"]["init_image"] == "selfie:0"
    assert [o["filename"] for o in first["outputs"]] == ["avatar_001.png"]     # the stored init is not an output
    own = f"{first['id']}/avatar_001.png"
    second = finished(c, gen(alice, init_image=own).get_json()["id"], alice, timeout=60)
    assert second["status"] == "succeeded" and second["request"]["init_image"] == own
    inline = finished(c, gen(alice, init_image=data_url(gradient(), "JPEG")).get_json()["id"], alice, timeout=60)
    assert inline["status"] == "succeeded" and inline["request"]["init_image"].startswith("upload (")
    assert c.get(f"/download/{first['id']}/init_image.png", headers=alice).status_code == 404

    for token, value, status, needle in [
        (bob, own, 404, "not found"),                                    # another caller's output
        (alice, f"{first['id']}/avatar_004.png", 404, "not found"),
        (alice, "selfie:3", 404, "selfie:3"),                            # no such accepted selfie
        (alice, "data:image/png;base64," + base64.b64encode(b"GIF89a not really").decode(), 400, "init_image"),
        (alice, base64.b64encode(b"hello").decode(), 400, "init_image"),
    ]:
        r = gen(token, init_image=value)
        assert r.status_code == status, (value, r.get_json())
        assert needle in r.get_json()["error"]["message"]
