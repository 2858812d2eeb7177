"""InfiniteYou on tiny-flux (issue 23): IR-SE50 against a numpy reference, identity from many selfies, the
tokens' path (InfuseNet, not FLUX's text stream), identity strength 0, pose, broken files, start-up refusals."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.fixtures.models import make_crops
from utils import errors

KPS = np.array([[30, 40], [66, 40], [48, 60], [34, 80], [62, 80]], np.float32)


@pytest.fixture(scope="module")
def iy_settings(tiny_flux_settings):
    return tiny_flux_settings.replace(ip_adapter_variant="infiniteyou")


@pytest.fixture(scope="module")
def iy_generator(iy_settings):
    from generate_twin import DigitalTwinGenerator
    return DigitalTwinGenerator(iy_settings).setup()


def build(g, n=2, combine="average", seed=0):
    crops = make_crops(n, seed=seed, size=(96, 112))
    kps = [KPS + i for i in range(n)]
    return g.build_identity(crops, [np.ones(512, np.float32)] * n, face_model="insightface-antelopev2",
                            combine=combine, crop_keypoints=kps, keypoints=kps, keypoint_index=list(range(n)))


def run(g, identity, **fields):
    from utils.engine.request import GenerationRequest
    req = GenerationRequest.from_dict({"prompt": "a portrait", "seed": 7, "quality_mode": "fast", **fields},
                                      g.settings).with_identity(identity)
    return g.generate(req)


def pixels(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


# --- IR-SE50 ----------------------------------------------------------------------------------------------
def _np_conv(x, w, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    co, ci, k, _ = w.shape
    h = (x.shape[1] - k) // stride + 1
    out = np.zeros((co, h, h))
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + stride * h:stride, j:j + stride * h:stride]
            out += np.einsum("oc,chw->ohw", w[:, :, i, j], patch)
    return out


def _np_bn(x, sd, p, eps=1e-5):
    shape = (-1,) + (1,) * (x.ndim - 1)
    return ((x - sd[p + "running_mean"].reshape(shape)) / np.sqrt(sd[p + "running_var"].reshape(shape) + eps)
            * sd[p + "weight"].reshape(shape) + sd[p + "bias"].reshape(shape))


def _np_prelu(x, a):
    return np.where(x > 0, x, x * a.reshape(-1, 1, 1))


def np_irse(sd, x):
    """facexlib's Backbone(mode='ir_se') forward written from its source, in numpy, one image [3, 112, 112]."""
    sd = {k: v.double().numpy() for k, v in sd.items()}
    x = _np_prelu(_np_bn(_np_conv(x, sd["input_layer.0.weight"], 1, 1), sd, "input_layer.1."), sd["input_layer.2.weight"])
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
    for i in range(n):
        p = f"body.{i}."
        cin, cout = sd[p + "res_layer.1.weight"].shape[1], sd[p + "res_layer.1.weight"].shape[0]
        stride = 2 if i == 0 or cin != cout else 1
        short = (_np_bn(_np_conv(x, sd[p + "shortcut_layer.0.weight"], stride, 0), sd, p + "shortcut_layer.1.")
                 if p + "shortcut_layer.0.weight" in sd else x[:, ::stride, ::stride])
        r = _np_bn(x, sd, p + "res_layer.0.")
        r = _np_prelu(_np_conv(r, sd[p + "res_layer.1.weight"], 1, 1), sd[p + "res_layer.2.weight"])
        r = _np_bn(_np_conv(r, sd[p + "res_layer.3.weight"], stride, 1), sd, p + "res_layer.4.")
        s = np.maximum(sd[p + "res_layer.5.fc1.weight"][:, :, 0, 0] @ r.mean(axis=(1, 2)), 0)
        s = 1 / (1 + np.exp(-(sd[p + "res_layer.5.fc2.weight"][:, :, 0, 0] @ s)))
        x = r * s[:, None, None] + short
    y = _np_bn(x, sd, "output_layer.0.").reshape(-1)
    y = sd["output_layer.3.weight"] @ y + sd["output_layer.3.bias"]
    y = _np_bn(y, sd, "output_layer.4.")
    return y / np.linalg.norm(y)


@pytest.mark.parametrize("widths,units", [((8, 16, 24, 32), (1, 1, 1, 1)), ((8, 16, 24, 32), (2, 1, 3, 1))])
def test_irse50_matches_a_numpy_reference(tmp_path, widths, units):
    from utils.faces import irse50
    torch.manual_seed(sum(widths))
    net = irse50.build(widths, units)
    with torch.no_grad():
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / irse50.WEIGHT_FILE)
    loaded = irse50.load(tmp_path / irse50.WEIGHT_FILE)          # strict, widths/units read from the file
    chip = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    got = irse50.embed(loaded, [chip])[0]
    x = (np.asarray(chip, np.float64).transpose(2, 0, 1) / 255.0) * 2 - 1
    want = np_irse(net.state_dict(), x)
    assert got.shape == (512,) and abs(np.linalg.norm(got) - 1) < 1e-5
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_irse50_published_layout_keys():
    from utils.faces import irse50
    sd = irse50.build().state_dict()
    assert irse50.shape_from_state(sd) == ((64, 128, 256, 512), (3, 4, 14, 3))
    assert sd["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
    assert "body.0.shortcut_layer.0.weight" not in sd and "body.3.shortcut_layer.0.weight" in sd


# --- identity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,combine,k", [(1, "average", 1), (3, "average", 1), (3, "stack", 3)])
def test_identity_from_many_selfies(iy_generator, n, combine, k):
    ident = build(iy_generator, n, combine)
    e = ident.embeds
    assert ident.variant == "infiniteyou" and ident.num_selfies == n and tuple(e.shape) == (2, k, 512)
    assert torch.count_nonzero(e[0]) == 0
    assert torch.allclose(e[1].norm(dim=-1), torch.ones(k), atol=1e-5)
    r = run(iy_generator, ident)
    assert r.metadata["identity"]["num_selfies"] == n and r.metadata["identity"]["combine"] == combine


def test_average_is_the_normalised_mean_of_the_selfies(iy_generator):
    one = [build(iy_generator, 1, seed=s).embeds[1, 0] for s in (0, 1)]
    both = iy_generator.build_identity(make_crops(1, seed=0, size=(96, 112)) + make_crops(1, seed=1, size=(96, 112)),
                                       [np.ones(512, np.float32)] * 2, crop_keypoints=[KPS, KPS])
    mean = (one[0] + one[1]) / 2
    assert torch.allclose(both.embeds[1, 0], mean / mean.norm(), atol=1e-5)


def test_selfies_without_keypoints_are_refused(iy_generator):
    with pytest.raises(errors.InvalidRequest) as e:
        iy_generator.build_identity(make_crops(1), [np.ones(512, np.float32)], crop_keypoints=[None])
    assert e.value.http_status == 400 and "key points" in e.value.message


# --- the call ---------------------------------------------------------------------------------------------
def test_tokens_reach_infusenet_not_the_text_stream(iy_generator):
    ident = build(iy_generator)
    method = iy_generator.model.adapter
    net, transformer = method.infusenet, iy_generator.model.models.pipe.transformer
    seen = {"net": [], "flux": []}

    def hook(name):
        def f(module, args, kwargs):
            seen[name].append(kwargs["encoder_hidden_states"].detach().clone())
        return f
    handles = [net.transformer_blocks[0].register_forward_pre_hook(hook("net"), with_kwargs=True),
               transformer.transformer_blocks[0].register_forward_pre_hook(hook("flux"), with_kwargs=True)]
    try:
        run(iy_generator, ident, num_images=2)
    finally:
        for h in handles:
            h.remove()
    tokens = method.tokens(ident, 2)
    assert tokens.shape[:2] == (2, 8)
    # InfuseNet's text stream is the 8 tokens (after its context embedder); FLUX's is the prompt (T5 length).
    want = net.context_embedder(tokens)
    assert seen["net"] and all(torch.allclose(t, want, atol=1e-6) for t in seen["net"])
    assert seen["flux"] and all(t.shape[1] == 512 for t in seen["flux"])
    assert method.infusenet.identity_tokens is None        # cleared after the call


def test_identity_strength_zero_is_no_identity(iy_generator):
    ident = build(iy_generator)
    zero_run = run(iy_generator, ident, identity_strength=0.0)
    zero, none = pixels(zero_run), pixels(run(iy_generator, None))
    assert zero_run.metadata["control_image"] is None and zero_run.metadata["identity"]["num_selfies"] == 2
    full = pixels(run(iy_generator, ident, identity_strength=1.0))
    assert np.array_equal(zero, none)
    assert not np.array_equal(full, none)


def test_infusenet_scale_zero_gives_zero_residuals(iy_generator):
    net = iy_generator.model.adapter.infusenet
    c = net.config
    h = torch.randn(1, 16, c.in_channels)
    net.identity_tokens = torch.randn(1, 8, c.joint_attention_dim)
    try:
        blocks, singles = net(hidden_states=h, controlnet_cond=torch.randn(1, 16, c.in_channels), conditioning_scale=0.0,
                              encoder_hidden_states=torch.randn(1, 5, c.joint_attention_dim),
                              pooled_projections=torch.randn(1, c.pooled_projection_dim), timestep=torch.tensor([0.5]),
                              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]),
                              return_dict=False)
    finally:
        net.identity_tokens = None
    assert all(torch.count_nonzero(b) == 0 for b in list(blocks) + list(singles))


@pytest.mark.parametrize("a,b", [("frontal", "tilt_left"), ("frontal", "look_up"), ("three_quarter_left", "selfie:1")])
def test_pose_presets_change_the_output(iy_generator, a, b):
    ident = build(iy_generator, 2)
    ra, rb = run(iy_generator, ident, pose=a), run(iy_generator, ident, pose=b)
    assert not np.array_equal(pixels(ra), pixels(rb))
    assert ra.metadata["pose"] == a and ra.metadata["control_image"] == "keypoints"


def test_no_pose_is_an_all_black_control_image(iy_generator):
    from utils.engine.request import GenerationRequest
    ident = build(iy_generator)
    req = GenerationRequest.from_dict({"prompt": "x"}, iy_generator.settings).with_identity(ident)
    img = iy_generator.model.adapter.control_image(req, {"width": 64, "height": 48})
    assert img.size == (64, 48) and not np.asarray(img).any()
    posed = GenerationRequest.from_dict({"prompt": "x", "pose": "frontal", "pose_strength": 0.5},
                                        iy_generator.settings).with_identity(ident)
    full = GenerationRequest.from_dict({"prompt": "x", "pose": "frontal"}, iy_generator.settings).with_identity(ident)
    half_img = np.asarray(iy_generator.model.adapter.control_image(posed, {"width": 64, "height": 48}), np.float32)
    full_img = np.asarray(iy_generator.model.adapter.control_image(full, {"width": 64, "height": 48}), np.float32)
    assert full_img.max() > 0 and np.allclose(half_img, np.floor(full_img * 0.5), atol=1)
    assert run(iy_generator, ident).metadata["control_image"] == "black"


@pytest.mark.parametrize("pose", ["selfie:2", "selfie:99"])
def test_selfie_pose_out_of_range_is_400(iy_generator, pose):
    from utils.engine.request import GenerationRequest
    ident = build(iy_generator, 2)
    with pytest.raises(errors.InvalidRequest) as e:
        GenerationRequest.from_dict({"prompt": "x", "pose": pose}, iy_generator.settings).with_identity(ident)
    assert e.value.http_status == 400 and pose in e.value.message


# --- files and start-up -----------------------------------------------------------------------------------
def _break_text(p):
    p.write_text("{not json")


def _truncate(p):
    p.write_bytes(p.read_bytes()[:100])


def _drop_key(p):
    state = torch.load(p, weights_only=True)
    inner = state.get("image_proj", state)
    inner.pop(sorted(inner)[0])
    torch.save(state, p)


@pytest.mark.parametrize("rel,breaker", [
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/InfuseNetModel/config.json", _break_text),
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/InfuseNetModel/diffusion_pytorch_model-00001-of-00002.safetensors",
     _truncate),
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/InfuseNetModel/diffusion_pytorch_model-00002-of-00002.safetensors",
     lambda p: p.unlink()),
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/InfuseNetModel/diffusion_pytorch_model.safetensors.index.json",
     _break_text),
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/image_proj_model.bin", _truncate),
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/image_proj_model.bin", _drop_key),
    ("facexlib/recognition_arcface_ir_se50.pth", _truncate),
    ("facexlib/recognition_arcface_ir_se50.pth", _drop_key),
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/image_proj_model.bin", lambda p: p.unlink()),
])
def test_each_broken_file_fails_naming_it(tiny_models, iy_settings, tmp_path, rel, breaker):
    from utils.models.infiniteyou import infiniteyou_files
    from utils.models.infiniteyou_load import load_infiniteyou
    from utils.models.tiny_flux import TRANSFORMER
    root = tmp_path / "tiny"
    for sub in ("InfiniteYou", "facexlib"):
        shutil.copytree(tiny_models / sub, root / sub)
    breaker(root / rel)
    files = infiniteyou_files(iy_settings, root)
    with pytest.raises(errors.ModelWeightsMissing) as e:
        load_infiniteyou(files, dict(TRANSFORMER), "cpu", torch.float32)
    assert rel.split("/")[-1] in e.value.message and "\n" not in e.value.message


def test_stages_load_their_own_files(iy_settings):
    from generate_twin import DigitalTwinGenerator
    g = DigitalTwinGenerator(iy_settings.replace(infiniteyou_model="sim_stage1")).setup()
    assert g.info()["infiniteyou_stage"] == "sim_stage1"


@pytest.mark.parametrize("profile,variant,needle", [
    ("tiny", "infiniteyou", "flux family"), ("tiny-flux", "instantid", "sdxl family"),
    ("tiny-flux", "faceid", "sdxl family")])
def test_a_variant_of_the_other_family_refuses_to_start(tiny_settings, profile, variant, needle):
    from utils.models.layout import model_layout
    with pytest.raises(errors.ConfigError) as e:
        model_layout(tiny_settings.replace(model_profile=profile, ip_adapter_variant=variant))
    assert needle in e.value.message and f"TWIN_IP_ADAPTER_VARIANT={variant}" in e.value.message


def test_dlib_backend_refuses_infiniteyou(iy_settings):
    from types import SimpleNamespace

    from utils.service.face_setup import check_face_backend
    with pytest.raises(errors.ModelWeightsMissing) as e:
        check_face_backend(iy_settings, SimpleNamespace(backend_name="dlib"))
    msg = e.value.message
    assert "\n" not in msg and "infiniteyou" in msg and "pip install" in msg and "antelopev2" in msg


# --- download / verify --------------------------------------------------------------------------------------
HUB = [f"infu_flux_v1.0/{stage}/{f}" for stage in ("sim_stage1", "aes_stage2") for f in (
    "image_proj_model.bin", "InfuseNetModel/config.json", "InfuseNetModel/diffusion_pytorch_model.safetensors.index.json",
    "InfuseNetModel/diffusion_pytorch_model-00001-of-00002.safetensors",
    "InfuseNetModel/diffusion_pytorch_model-00002-of-00002.safetensors")] + [
    "supports/insightface/models/antelopev2/scrfd_10g_bnkps.onnx", "supports/insightface/models/antelopev2/glintr100.onnx",
    "assets/teaser.jpg", "README.md"]


@pytest.mark.parametrize("argv,env,stage,repos", [
    (["--infiniteyou"], {}, "aes_stage2", ["ByteDance/InfiniteYou"]),
    (["--infiniteyou", "--stage", "sim_stage1"], {}, "sim_stage1", ["ByteDance/InfiniteYou"]),
    (["--flux-dev", "--no-lightning"], {"TWIN_IP_ADAPTER_VARIANT": "infiniteyou", "TWIN_INFINITEYOU_MODEL": "sim_stage1"},
     "sim_stage1", ["ByteDance/InfiniteYou", "black-forest-labs/FLUX.1-dev"]),
])
def test_download_fetches_one_stage_the_pack_and_irse50(tmp_path, monkeypatch, argv, env, stage, repos):
    import fnmatch
    import urllib.request

    import huggingface_hub

    import model_loader as ml
    calls, urls = [], []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw))
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, path: (urls.append(url), open(path, "wb").close()))
    monkeypatch.setenv("TWIN_MODEL_DIR", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert ml.main(["download", *argv]) == 0
    # the output safety check's classifier comes with every download (TWIN_SAFETY_MODE is not off)
    assert [c["repo_id"] for c in calls] == ["Falconsai/nsfw_image_detection", *repos]
    taken = [f for f in HUB if any(fnmatch.fnmatch(f, p) for p in calls[1]["allow_patterns"])]
    assert sorted(taken) == sorted(f for f in HUB if f"/{stage}/" in f or "antelopev2" in f)
    assert urls == ["https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth"]
    assert (tmp_path / "facexlib" / "recognition_arcface_ir_se50.pth").is_file()


@pytest.mark.parametrize("rel,breaker", [
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/InfuseNetModel/diffusion_pytorch_model-00002-of-00002.safetensors",
     _truncate),
    ("InfiniteYou/infu_flux_v1.0/aes_stage2/image_proj_model.bin", _drop_key),
    ("facexlib/recognition_arcface_ir_se50.pth", _truncate),
])
def test_verify_names_each_broken_file(tiny_models, iy_settings, tmp_path, rel, breaker):
    from utils.models.startup import verify
    root = tmp_path / "tiny"
    shutil.copytree(tiny_models, root, symlinks=True)
    settings = iy_settings.replace(tiny_model_dir=root)
    assert all(c.ok for c in verify(settings))
    breaker(root / rel)
    bad = [c for c in verify(settings) if not c.ok]
    assert len(bad) == 1 and bad[0].path.endswith(rel.split("/", 1)[1]), [c.line() for c in bad]


@pytest.mark.parametrize("roll", [0.0, 12.0, -20.0])
def test_the_chip_from_the_stored_crop_is_the_photo_chip(roll):
    """The crop is a similarity transform of the photo, so its key points in crop pixels give the same 112 px
    ArcFace chip as the reference's norm_crop on the photo (up to resampling)."""
    import cv2
    from insightface.utils import face_align

    from utils.faces.analysis import aligned_crop, crop_keypoints
    from utils.faces.backends import Detection
    from utils.faces.irse50 import chip
    rng = np.random.default_rng(3)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (0, 0), 6)
    a = np.radians(roll)
    base = np.array([[-30, -20], [30, -20], [0, 10], [-22, 40], [22, 40]], np.float64)
    kps = base @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) + (330, 250)
    det = Detection(box=(250.0, 170.0, 410.0, 350.0), score=0.9, left_eye=tuple(kps[0]), right_eye=tuple(kps[1]),
                    nose=tuple(kps[2]), kps=kps.astype(np.float32))
    crop = aligned_crop(photo, det, size=512, scale=1.8)
    ours = chip(np.asarray(crop), crop_keypoints(det, size=512, scale=1.8)).astype(np.float32)
    ref = face_align.norm_crop(np.ascontiguousarray(photo[:, :, ::-1]), landmark=kps, image_size=112).astype(np.float32)
    assert ours.shape == ref.shape == (112, 112, 3)
    assert np.abs(ours - ref).mean() < 0.5    # of 255: resampling twice (a 3 px error in the points gives ~0.9)
