"""Per-session identities: shapes of average vs stack, save/load, variant checks, thread safety."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from generate_twin import GenerationRequest
from ipadapter_manager import SessionIdentity
from tests.fixtures.models import arcface_vectors, make_crops
from utils.errors import Conflict, InvalidRequest


@pytest.fixture(scope="module")
def generators(variant_generator):
    return {v: variant_generator(v) for v in ("plus-face", "plain", "faceid")}


# Tiny profile shapes: Plus = penultimate ViT hidden states (16 patches + CLS, width 32); plain = the
# projected embedding (32); faceid = ArcFace (512). Real SDXL: [.., 257, 1280], [.., 1024], [.., 512].
@pytest.mark.parametrize("variant, combine, n, shape", [
    ("plus-face", "average", 3, (2, 1, 17, 32)),
    ("plus-face", "stack", 3, (2, 3, 17, 32)),
    ("plain", "average", 3, (2, 1, 32)),
    ("plain", "stack", 2, (2, 2, 32)),
    ("faceid", "average", 3, (2, 1, 512)),
    ("faceid", "stack", 4, (2, 4, 512)),
])
def test_identity_shapes(generators, variant, combine, n, shape):
    ident = generators[variant].build_identity(make_crops(n), arcface_vectors(n), face_model="arcface-r100",
                                               combine=combine)
    assert ident.shape == shape
    assert ident.variant == variant and ident.combine == combine and ident.num_selfies == n


@pytest.mark.parametrize("variant", ["plus-face", "plain", "faceid"])
def test_average_is_the_mean_of_stack_and_differs_from_it(generators, variant):
    g = generators[variant]
    crops, vecs = make_crops(3), arcface_vectors(3)
    avg = g.build_identity(crops, vecs, face_model="m", combine="average").embeds
    stack = g.build_identity(crops, vecs, face_model="m", combine="stack").embeds
    assert torch.allclose(avg, stack.mean(dim=1, keepdim=True), atol=1e-6)
    assert avg.shape != stack.shape
    assert not torch.allclose(stack[:, :1], stack[:, 1:2])  # selfies differ, so stacking keeps information


@pytest.mark.parametrize("variant", ["plus-face", "plain"])
def test_negative_half_is_the_encoders_black_image_output(generators, variant):
    e = generators[variant].build_identity(make_crops(2), None, face_model=None, combine="stack").embeds
    assert torch.allclose(e[0, 0], e[0, 1])  # the same unconditional embedding for every selfie
    assert not torch.all(e[0] == 0) or variant == "plain"  # Plus: not zeros (diffusers encodes a black image)


def test_faceid_negative_half_is_zeros_and_positive_is_normalised(generators):
    e = generators["faceid"].build_identity(None, arcface_vectors(2), face_model="m", combine="stack").embeds
    assert torch.all(e[0] == 0)
    assert torch.allclose(e[1].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_faceid_rejects_non_arcface_embeddings(generators):
    dlib = [np.random.default_rng(0).standard_normal(128).astype(np.float32)]
    with pytest.raises(InvalidRequest, match="128-d") as e:
        generators["faceid"].build_identity(None, dlib, face_model="dlib-resnet-v1-128")
    assert "dlib-resnet-v1-128" in e.value.message


@pytest.mark.parametrize("crops, needle", [
    ([], "no face crops"),
    (["not-an-image"], "str"),
])
def test_bad_crops_are_clear_errors(generators, crops, needle):
    with pytest.raises(InvalidRequest, match=needle):
        generators["plus-face"].build_identity(crops, None, face_model=None)


@pytest.mark.parametrize("variant", ["plus-face", "faceid"])
def test_save_and_load_roundtrip(generators, tmp_path, variant):
    ident = generators[variant].build_identity(make_crops(2), arcface_vectors(2), face_model="arcface-r100",
                                               combine="stack")
    path = ident.save(tmp_path / "s1" / "identity.safetensors")
    back = SessionIdentity.load(path)
    assert torch.equal(back.embeds, ident.embeds)
    assert (back.variant, back.model_name, back.combine, back.num_selfies, back.face_model) == \
        (variant, "tiny-sdxl", "stack", 2, "arcface-r100")


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    (b"garbage", "unreadable"),
])
def test_loading_a_bad_identity_file_is_a_clear_error(tmp_path, content, needle):
    p = tmp_path / "identity.safetensors"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(InvalidRequest, match=needle):
        SessionIdentity.load(p)


def test_identity_of_another_variant_is_refused(generators, tiny_settings):
    plain_ident = generators["plain"].build_identity(make_crops(1), None, face_model=None)
    req = GenerationRequest.from_dict({"prompt": "x", "seed": 1}, tiny_settings).with_identity(plain_ident)
    with pytest.raises(Conflict, match="'plain'.*'plus-face'"):
        generators["plus-face"].generate(req)


def test_identity_of_another_model_is_refused(generators, tiny_settings):
    ident = generators["plus-face"].build_identity(make_crops(1), None, face_model=None)
    ident.model_name = "stabilityai/stable-diffusion-xl-base-1.0"
    req = GenerationRequest.from_dict({"prompt": "x", "seed": 1}, tiny_settings).with_identity(ident)
    with pytest.raises(Conflict, match="stable-diffusion-xl-base-1.0"):
        generators["plus-face"].generate(req)


def test_build_identity_does_not_wait_for_a_running_generation(tiny_generator):
    done = threading.Event()
    result = {}

    def upload():
        result["identity"] = tiny_generator.build_identity(make_crops(2), None, face_model=None)
        done.set()

    with tiny_generator.model.lock:  # as if a job were generating right now
        t = threading.Thread(target=upload)
        t.start()
        assert done.wait(30), "build_identity blocked on the generation lock"
    t.join()
    assert result["identity"].shape == (2, 1, 17, 32)


@pytest.mark.parametrize("do_cfg, first_dim", [(True, 2), (False, 1)])
def test_pipeline_embeds_are_cfg_aware(tiny_generator, do_cfg, first_dim):
    ident = tiny_generator.build_identity(make_crops(3), None, face_model=None, combine="stack")
    (e,) = tiny_generator.adapter.pipeline_embeds(ident, do_cfg)
    assert e.shape == (first_dim, 3, 17, 32)
