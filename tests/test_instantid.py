"""InstantID and FaceID Plus v2 on the tiny profile: keypoint drawing, poses, the IdentityNet's input,
both variants through the real loader with the real file names, and the pose request fields."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

import instantid as iid
import model_loader as ml
from generate_twin import GenerationRequest
from tests.fixtures.models import arcface_vectors, make_crops
from utils.errors import InvalidRequest

# A selfie's 5 key points in image pixels (eyes, nose, mouth corners), slightly rolled.
SELFIE_KPS = [np.array([[40, 50], [72, 54], [55, 70], [43, 90], [68, 93]], np.float32),
              np.array([[30, 40], [60, 40], [48, 58], [36, 76], [58, 76]], np.float32)]


@pytest.fixture(scope="module")
def gens(variant_generator):
    return {v: variant_generator(v) for v in ("instantid", "faceid-plusv2")}


@pytest.fixture(scope="module")
def instantid_identity(gens):
    return gens["instantid"].build_identity(None, arcface_vectors(2), face_model="insightface-antelopev2",
                                            embedding_norms=[21.0, 23.5], keypoints=SELFIE_KPS,
                                            keypoint_index=[0, 3])


def run(gen, identity, **fields):
    req = GenerationRequest.from_dict({"prompt": "a portrait", "seed": 7, **fields}, gen.settings)
    return np.asarray(gen.generate(req.with_identity(identity)).images[0]).astype(np.int16)


# --- keypoint image ------------------------------------------------------------------------------
KNOWN = np.array([[60, 60], [140, 60], [100, 110], [70, 160], [130, 160]], float)


@pytest.mark.parametrize("xy, rgb", [
    # centre of each point: the full colour of that point (circles are drawn after the x 0.6 dimming)
    ((60, 60), (255, 0, 0)), ((140, 60), (0, 255, 0)), ((100, 110), (0, 0, 255)),
    ((70, 160), (255, 255, 0)), ((130, 160), (255, 0, 255)),
    # middle of the eye->nose limbs, outside the circles: the first point's colour x 0.6
    ((80, 85), (153, 0, 0)), ((120, 85), (0, 153, 0)),
    # middle of the mouth-corner->nose limbs
    ((85, 135), (153, 153, 0)), ((115, 135), (153, 0, 153)),
    # away from everything: black
    ((5, 5), (0, 0, 0)), ((100, 190), (0, 0, 0)), ((100, 35), (0, 0, 0)),
])
def test_keypoint_image_pixels_for_a_known_layout(xy, rgb):
    img = np.asarray(iid.draw_kps(200, 200, KNOWN))
    assert img.shape == (200, 200, 3)
    assert tuple(img[xy[1], xy[0]]) == rgb


def test_keypoint_circles_have_radius_10_and_limbs_half_width_4():
    img = np.asarray(iid.draw_kps(200, 200, KNOWN))
    row = img[60, :, 0]                                   # through the red eye at x=60
    red = np.flatnonzero(row == 255)
    assert (red.min(), red.max()) == (50, 70)
    # limb 0->2 runs from (60,60) to (100,110): across it at its middle, ~2*4+1 px of dimmed red
    normal = np.array([50.0, -40.0]) / np.hypot(50, 40)
    on = [tuple(img[int(round(85 + t * normal[1])), int(round(80 + t * normal[0]))]) == (153, 0, 0)
          for t in np.arange(-8, 8.5, 1.0)]
    assert 7 <= sum(on) <= 10


@pytest.mark.parametrize("a, b", list(itertools.combinations(iid.POSE_PRESETS, 2)))
def test_each_pose_preset_draws_a_different_keypoint_image(a, b):
    ia = np.asarray(iid.pose_image(a, 256, 256))
    ib = np.asarray(iid.pose_image(b, 256, 256))
    assert not np.array_equal(ia, ib)


@pytest.mark.parametrize("pose, check", [
    ("three_quarter_left", lambda k: k[2, 0] < (k[0, 0] + k[1, 0]) / 2 - 0.05),   # nose towards image left
    ("three_quarter_right", lambda k: k[2, 0] > (k[0, 0] + k[1, 0]) / 2 + 0.05),
    ("tilt_left", lambda k: k[0, 1] > k[1, 1] + 0.1),                              # left eye lower
    ("tilt_right", lambda k: k[1, 1] > k[0, 1] + 0.1),
    ("look_up", lambda k: k[2, 1] - k[0, 1] < iid.preset_layout("frontal")[2, 1] - iid.preset_layout("frontal")[0, 1]),
    ("look_down", lambda k: k[2, 1] - k[0, 1] > iid.preset_layout("frontal")[2, 1] - iid.preset_layout("frontal")[0, 1]),
    ("frontal", lambda k: abs(k[0, 1] - k[1, 1]) < 0.02 and abs(k[2, 0] - (k[0, 0] + k[1, 0]) / 2) < 0.05),
])
def test_pose_presets_have_the_named_geometry(pose, check):
    assert check(iid.preset_layout(pose))


def test_selfie_pose_replays_that_selfies_roll_and_auto_is_level():
    layouts = np.stack([iid.normalise_selfie_kps(k) for k in SELFIE_KPS])
    s0 = iid.resolve_pose("selfie:0", layouts, [0, 3])
    d = s0[1] - s0[0]
    assert np.degrees(np.arctan2(d[1], d[0])) == pytest.approx(np.degrees(np.arctan2(4, 32)), abs=0.01)
    auto = iid.resolve_pose("auto", layouts, [0, 3])
    assert auto[0, 1] == pytest.approx(auto[1, 1], abs=1e-9)        # eye line level
    assert auto[2, 0] == pytest.approx(0.0, abs=1e-9)               # nose on the symmetry axis
    assert np.array_equal(iid.resolve_pose("auto", None, None), iid.preset_layout("frontal"))


# --- generation ------------------------------------------------------------------------------------
def test_each_pose_changes_the_output(gens, instantid_identity):
    g = gens["instantid"]
    outs = {p: run(g, instantid_identity, pose=p) for p in iid.POSE_PRESETS + ("auto", "selfie:0", "selfie:3")}
    for a, b in itertools.combinations(outs, 2):
        assert not np.array_equal(outs[a], outs[b]), (a, b)


def test_pose_strength_zero_equals_no_controlnet(gens, instantid_identity):
    from diffusers import StableDiffusionXLPipeline
    g = gens["instantid"]
    got = run(g, instantid_identity, pose="look_up", pose_strength=0.0)
    req = GenerationRequest.from_dict({"prompt": "a portrait", "seed": 7}, g.settings).with_identity(instantid_identity)
    plan = g.model.plan(req)
    kwargs = g.model.call_kwargs(req, plan, [7])
    kwargs["ip_adapter_image_embeds"] = g.adapter.pipeline_embeds(instantid_identity, True)
    bare = StableDiffusionXLPipeline.from_pipe(g.models.pipe)     # same UNet / adapter / scheduler, no ControlNet
    with torch.inference_mode():
        ref = np.asarray(bare(**kwargs).images[0]).astype(np.int16)
    assert np.array_equal(got, ref)
    assert not np.array_equal(run(g, instantid_identity, pose="look_up", pose_strength=0.8), ref)


def test_identity_tokens_reach_the_controlnet_not_the_text(gens, instantid_identity):
    g = gens["instantid"]
    net, unet = g.models.pipe.controlnet, g.models.pipe.unet
    seen = {"net": [], "unet": []}

    def hook(name):
        def f(module, args, kwargs):
            ehs = kwargs["encoder_hidden_states"]
            # The UNet's IP-Adapter attention gets (text, [adapter tokens]); the ControlNet's plain attention one tensor.
            seen[name].append(ehs[0] if isinstance(ehs, tuple) else ehs.detach().clone())
        return f
    attn_net = next(m for n, m in net.named_modules() if n.endswith("attn2"))
    attn_unet = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    handles = [attn_net.register_forward_pre_hook(hook("net"), with_kwargs=True),
               attn_unet.register_forward_pre_hook(hook("unet"), with_kwargs=True)]
    try:
        run(g, instantid_identity, num_images=2)
    finally:
        for h in handles:
            h.remove()
    expected = iid.identity_tokens(unet, instantid_identity.embeds, 2, True)
    C = unet.config.cross_attention_dim
    assert expected.shape == (4, 16, C)                       # [neg x 2; pos x 2], 16 tokens
    assert seen["net"] and all(torch.equal(t, expected) for t in seen["net"])
    # The UNet still reads the text (77 tokens; the adapter's 16 go through its own IP attention).
    assert all(t.shape[1] == 77 for t in seen["unet"])
    # The negative half is the projection of zeros, the positive one of the session's mean raw ArcFace vector.
    assert not torch.equal(expected[0], expected[2])


def test_instantid_identity_is_the_mean_raw_arcface_vector(instantid_identity):
    e = instantid_identity.embeds
    assert e.shape == (2, 1, 1, 512) and torch.count_nonzero(e[0]) == 0
    v = arcface_vectors(2)
    raw = np.mean([v[0] / np.linalg.norm(v[0]) * 21.0, v[1] / np.linalg.norm(v[1]) * 23.5], axis=0)
    assert np.allclose(e[1, 0, 0].numpy(), raw, atol=1e-5)
    assert instantid_identity.extras["keypoint_index"].tolist() == [0, 3]


def test_identity_with_keypoints_survives_save_and_load(instantid_identity, tmp_path):
    from ipadapter_manager import SessionIdentity
    back = SessionIdentity.load(instantid_identity.save(tmp_path / "identity.safetensors"))
    assert torch.equal(back.embeds, instantid_identity.embeds)
    assert back.extras.keys() == instantid_identity.extras.keys()
    assert all(torch.equal(back.extras[k], v) for k, v in instantid_identity.extras.items())


@pytest.mark.parametrize("variant, projection, weight, pipeline, lora", [
    ("instantid", "IPAdapterPlusImageProjection", "InstantID/ip-adapter.bin", "StableDiffusionXLControlNetPipeline", False),
    ("faceid-plusv2", "IPAdapterFaceIDPlusImageProjection", "IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sdxl.bin",
     "StableDiffusionXLPipeline", True),
])
def test_both_variants_load_through_the_real_loader_with_real_file_names(gens, tiny_models, variant, projection,
                                                                        weight, pipeline, lora):
    g = gens[variant]
    assert (tiny_models / weight).is_file()
    # The real nested .bin layout, loadable with weights_only=True.
    sd = torch.load(tiny_models / weight, weights_only=True, map_location="cpu")
    assert set(sd) == {"image_proj", "ip_adapter"}
    layers = g.models.pipe.unet.encoder_hid_proj.image_projection_layers
    assert [type(x).__name__ for x in layers] == [projection]
    assert type(g.models.pipe).__name__ == pipeline
    assert bool(g.adapter.faceid_adapters) == lora
    if variant == "instantid":
        assert layers[0].latents.shape[1] == 16 and g.models.pipe.image_encoder is None
        assert type(g.models.pipe.controlnet).__name__ == "IdentityNet"
    else:
        assert g.models.pipe.image_encoder is not None       # the ViT-H encoder from the other repo
    assert g.info()["variant"] == variant and g.state == "ready"


def test_faceid_plusv2_uses_clip_embeds_shortcut_and_identity(gens):
    g = gens["faceid-plusv2"]
    ident = g.build_identity(make_crops(2), arcface_vectors(2), face_model="m")
    assert ident.embeds.shape == (2, 1, 1, 512) and ident.extras["clip_embeds"].shape[:2] == (2, 1)
    a = run(g, ident, num_images=2)
    proj = g.models.pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert proj.shortcut is True and proj.clip_embeds.shape[0] == 4      # [neg x 2; pos x 2]
    other = g.build_identity(make_crops(2, seed=5), arcface_vectors(2, seed=5), face_model="m")
    assert not np.array_equal(a, run(g, other, num_images=2))
    assert np.array_equal(a, run(g, ident, num_images=2))              # same seed, same image


@pytest.mark.parametrize("variant, field, value", [
    ("instantid", "guidance_scale", 5.0), ("instantid", "steps", 30), ("faceid-plusv2", "guidance_scale", 5.0),
    ("plus-face", "guidance_scale", 6.0),
])
def test_per_variant_quality_defaults(variant, field, value):
    from generate_twin import quality_row
    assert quality_row("balanced", variant)[field] == value


@pytest.mark.parametrize("variant, identity, pose", [("instantid", 0.8, 0.8), ("plus-face", 0.7, 0.8)])
def test_per_variant_default_scales(tiny_settings, variant, identity, pose):
    req = GenerationRequest.from_dict({"prompt": "p"}, tiny_settings.replace(ip_adapter_variant=variant))
    assert (req.identity_strength, req.pose_strength, req.pose) == (identity, pose, "auto")


# --- request validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("payload, needle", [
    ({"pose": "sideways"}, "pose='sideways'"),
    ({"pose": 3}, "pose=3"),
    ({"pose": ["frontal"]}, "pose=['frontal']"),
    ({"pose": "selfie:x"}, "pose='selfie:x'"),
    ({"pose": "selfie:-1"}, "pose='selfie:-1'"),
    ({"pose_strength": 1.6}, "pose_strength=1.6"),
    ({"pose_strength": -0.1}, "pose_strength=-0.1"),
    ({"pose_strength": "high"}, "pose_strength='high'"),
])
def test_bad_pose_fields_are_refused_naming_the_value(tiny_settings, payload, needle):
    with pytest.raises(InvalidRequest) as e:
        GenerationRequest.from_dict({"prompt": "p", **payload}, tiny_settings)
    assert needle in e.value.message and e.value.http_status == 400


@pytest.mark.parametrize("pose, ok", [("selfie:0", True), ("selfie:3", True), ("selfie:99", False), ("selfie:1", False)])
def test_selfie_pose_must_name_an_accepted_selfie(gens, instantid_identity, pose, ok):
    g = gens["instantid"]
    req = GenerationRequest.from_dict({"prompt": "p", "pose": pose}, g.settings)
    if ok:
        g.validate(req.with_identity(instantid_identity))
        return
    # Refused when the request meets the session's identity (the service's submit), and by validate().
    with pytest.raises(InvalidRequest) as e:
        req.with_identity(instantid_identity)
    assert f"pose={pose!r}" in e.value.message and "selfie:0, selfie:3" in e.value.message
    with pytest.raises(InvalidRequest):
        g.validate(dataclasses.replace(req, identity=instantid_identity))


def test_tiny_files_mirror_the_real_layouts(tiny_models):
    for rel in ml.INSTANTID_FILES:
        assert (tiny_models / ml.INSTANTID_DIR / rel).is_file()
    import json
    cfg = json.loads((tiny_models / ml.INSTANTID_DIR / ml.CONTROLNET_SUB / "config.json").read_text())
    unet = json.loads((tiny_models / ml.BASE_DIR / "unet" / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel" and cfg["cross_attention_dim"] == unet["cross_attention_dim"]
    assert sorted(p.name for p in (tiny_models / ml.ANTELOPE_DIR).glob("*.onnx")) == ["genderage.onnx", "glintr100.onnx",
                                                                                    "scrfd_10g_bnkps.onnx"]
