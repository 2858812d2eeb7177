"""Twin studio, the trainer (utils/engine/training/): a LoRA trained on the tiny model's own modules.

A 20-step training on a fixed batch lowers the loss; the saved LoRA loads back bit-exact and changes the
output; the serving pipeline carries no trace of training; a canceled run leaves no LoRA; a run stopped
after a checkpoint resumes at that step and ends where an uninterrupted run ends."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.models import make_crops

STEPS = 20


@pytest.fixture(scope="module")
def trainer_generator(tiny_settings):
    """A generator of its own: training adds and removes adapters on the modules it holds."""
    from generate_twin import DigitalTwinGenerator
    return DigitalTwinGenerator(tiny_settings.replace(max_steps=2)).setup()


def spec_for(work_dir: Path, *, steps: int = STEPS, run_id: str = "run1", every: int = 50, fixed: bool = True,
             **body):
    from utils.engine.training import TrainRequest, TrainSpec
    from utils.engine.training.data import centre_box
    from utils.config import Settings
    req = TrainRequest.from_dict({"learning_rate": 1e-3, "rank": 4, **body}, Settings())
    faces = [(im, centre_box(*im.size)) for im in make_crops(2, size=(120, 140))]
    return TrainSpec(request=req, token="zqxkvw", work_dir=work_dir, run_id=run_id, steps=steps, faces=faces,
                     checkpoint_every=every, fixed_batch=fixed)


def portrait(gen, twin=None, mode: str = "adapter"):
    from utils.engine.request import GenerationRequest
    from utils.config import Settings
    req = GenerationRequest.from_dict({"prompt": "a portrait", "seed": 7, "quality_mode": "balanced"}, Settings())
    return np.asarray(gen.generate(req.with_twin(twin, mode)).images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def trained(trainer_generator, tmp_path_factory):
    """One 20-step training, with the portrait of an unrelated job before and after it."""
    work = tmp_path_factory.mktemp("twin")
    before = portrait(trainer_generator)
    events = []
    record = trainer_generator.train(spec_for(work), lambda *a: events.append(a))
    return {"dir": work, "record": record, "events": events, "before": before,
            "after": portrait(trainer_generator)}


def test_the_loss_on_a_fixed_batch_goes_down(trained):
    curve = trained["record"]["loss_curve"]
    assert len(curve) == STEPS
    assert np.mean(curve[-5:]) < np.mean(curve[:5])


def test_progress_carries_step_steps_and_loss(trained):
    ev = trained["events"]
    assert [e[0] for e in ev] == list(range(1, STEPS + 1))
    assert {e[1] for e in ev} == {STEPS}
    assert [e[3]["loss"] for e in ev] == pytest.approx(trained["record"]["loss_curve"], abs=1e-5)


def test_the_record_names_model_family_token_and_time(trained):
    r = trained["record"]
    assert (r["family"], r["base_model"], r["token"], r["steps"]) == ("sdxl", "tiny-sdxl", "zqxkvw", STEPS)
    assert r["caption"] == "photo of zqxkvw person"
    assert r["images"] == 2 * 3 * 2              # two selfies x three scales x mirrored
    assert r["seconds"] > 0 and r["trained_parameters"] > 0 and r["lora_bytes"] > 0
    assert sorted(p.name for p in trained["dir"].iterdir() if not p.name.startswith(".")) == [
        "record.json", "twin_lora.safetensors", "twin_lora_kohya.safetensors"]   # no checkpoint left


def test_the_serving_pipeline_carries_no_trace_of_training(trained, trainer_generator):
    np.testing.assert_array_equal(trained["before"], trained["after"])
    unet = trainer_generator.models.pipe.unet
    assert "twin_training" not in (getattr(unet, "peft_config", None) or {})
    assert not unet.is_gradient_checkpointing


def test_save_then_load_is_bit_exact(trained, trainer_generator):
    """The file loads with diffusers' load_lora_weights: the adapter in the UNet equals the file; the kohya
    copy holds the same tensors under kohya's names."""
    import hashlib
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    pipe = trainer_generator.models.pipe
    path = trained["dir"] / "twin_lora.safetensors"
    saved = load_file(str(path))
    pipe.load_lora_weights(str(path), adapter_name="twin_check")
    try:
        loaded = get_peft_model_state_dict(pipe.unet, adapter_name="twin_check")
    finally:
        pipe.delete_adapters("twin_check")
    assert len(loaded) == len(saved) > 0
    for k, v in loaded.items():
        assert torch.equal(v, saved["unet." + k]), k
    kohya = load_file(str(trained["dir"] / "twin_lora_kohya.safetensors"))
    digest = lambda ts: sorted(hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in ts)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert digest(v for k, v in kohya.items() if not k.endswith(".alpha")) == digest(saved.values())


def test_the_lora_changes_the_output_and_the_next_job_is_untouched(trained, trainer_generator):
    from utils.engine.training.loras import TwinLora
    r = trained["record"]
    twin = TwinLora(path=str(trained["dir"] / "twin_lora.safetensors"), token=r["token"], caption=r["caption"],
                    family=r["family"], base_model=r["base_model"], trained_at=r["trained_at"])
    with_lora = portrait(trainer_generator, twin, "lora")
    assert np.abs(with_lora - trained["before"]).max() > 0
    # ...and the next job without it is the unrelated portrait again (each job activates only its own)
    np.testing.assert_array_equal(portrait(trainer_generator), trained["before"])


def test_a_canceled_run_leaves_no_lora_and_no_trace(trainer_generator, tmp_path):
    from utils import errors
    before = portrait(trainer_generator)
    seen = []
    with pytest.raises(errors.JobCanceled):
        trainer_generator.train(spec_for(tmp_path), lambda *a: seen.append(a[0]), lambda: len(seen) >= 3)
    assert len(seen) == 3                                   # stopped within one optimiser step
    assert not (tmp_path / "twin_lora.safetensors").exists()
    np.testing.assert_array_equal(portrait(trainer_generator), before)


def test_a_stopped_run_resumes_at_its_last_checkpoint(trainer_generator, tmp_path):
    """Stopped after step 7 with a checkpoint every 5: the next attempt starts at step 5 and ends with the LoRA
    an uninterrupted run makes (same noise, timesteps and optimiser state)."""
    from safetensors.torch import load_file
    from utils import errors
    whole = trainer_generator.train(spec_for(tmp_path / "whole", steps=10, every=5, fixed=False))
    seen = []
    with pytest.raises(errors.JobCanceled):
        trainer_generator.train(spec_for(tmp_path / "cut", steps=10, every=5, fixed=False),
                                lambda *a: seen.append(a[0]), lambda: len(seen) >= 7)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    again = []
    record = trainer_generator.train(spec_for(tmp_path / "cut", steps=10, every=5, fixed=False),
                                     lambda *a: again.append(a[0]))
    assert record["resumed_from_step"] == 5 and again[0] == 6
    assert record["loss_curve"] == whole["loss_curve"]
    a, b = (load_file(str(tmp_path / d / "twin_lora.safetensors")) for d in ("whole", "cut"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    # a checkpoint of another run is never resumed
    assert trainer_generator.train(spec_for(tmp_path / "cut", steps=10, every=5, run_id="other",
                                            fixed=False))["resumed_from_step"] == 0


@pytest.mark.parametrize("body, field", [
    ({"rank": 2}, "rank=2"), ({"rank": 65}, "rank=65"), ({"steps": 0}, "steps=0"),
    ({"learning_rate": 1.0}, "learning_rate=1.0"), ({"resolution": 100}, "resolution=100"),
    ({"train_text_encoder": "yes"}, "train_text_encoder"), ({"seed": -1}, "seed=-1"), ({"ranks": 4}, "ranks"),
])
def test_a_bad_training_request_names_the_field(body, field):
    from utils import errors
    from utils.config import Settings
    from utils.engine.training import TrainRequest
    with pytest.raises(errors.InvalidRequest) as e:
        TrainRequest.from_dict(body, Settings())
    assert field in e.value.message


def test_text_encoder_lora_trains_and_comes_off(trainer_generator, tmp_path):
    from safetensors.torch import load_file
    before = portrait(trainer_generator)
    trainer_generator.train(spec_for(tmp_path, steps=3, train_text_encoder=True))
    keys = load_file(str(tmp_path / "twin_lora.safetensors"))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    np.testing.assert_array_equal(portrait(trainer_generator), before)


def _twin(work: Path, record: dict):
    from utils.engine.training.loras import TwinLora
    return TwinLora(path=str(work / "twin_lora.safetensors"), token=record["token"], caption=record["caption"],
                    family=record["family"], base_model=record["base_model"], trained_at=record["trained_at"])


def test_several_twins_stay_loaded_and_each_job_uses_only_its_own(trainer_generator, tmp_path):
    """Two sessions' LoRAs in the LRU at once: A after B gives exactly A's portrait; beyond the capacity the
    least recently used one is unloaded, and so is one whose file was deleted (its session is gone)."""
    twins = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        rec = trainer_generator.train(spec_for(tmp_path / name, steps=4, seed=seed, run_id=name))
        twins[name] = _twin(tmp_path / name, rec)
    cache = trainer_generator.model.twins
    first_a = portrait(trainer_generator, twins["a"], "lora")
    first_b = portrait(trainer_generator, twins["b"], "lora")
    assert np.abs(first_a - first_b).max() > 0
    np.testing.assert_array_equal(portrait(trainer_generator, twins["a"], "lora"), first_a)
    assert {twins["a"].adapter_name, twins["b"].adapter_name} <= set(cache.loaded())
    cache.capacity = 2
    portrait(trainer_generator, twins["c"], "lora")            # b is the least recently used
    assert cache.loaded() == [twins["a"].adapter_name, twins["c"].adapter_name]
    (tmp_path / "a" / "twin_lora.safetensors").unlink()
    portrait(trainer_generator, twins["c"], "lora")
    assert cache.loaded() == [twins["c"].adapter_name]
    assert twins["a"].adapter_name not in (trainer_generator.models.pipe.unet.peft_config or {})


@pytest.fixture
def twin_cli_env(monkeypatch, tiny_models, tmp_path):
    for k, v in {"TWIN_MODEL_PROFILE": "tiny", "TWIN_TINY_MODEL_DIR": str(tiny_models),
                 "TWIN_DATA_DIR": str(tmp_path / "data"), "TWIN_MODEL_DIR": str(tmp_path / "no-models"),
                 "TWIN_WARMUP": "0", "TWIN_MAX_STEPS": "2"}.items():
        monkeypatch.setenv(k, v)
    selfies = tmp_path / "selfies"
    selfies.mkdir()
    for i, im in enumerate(make_crops(2, seed=5, size=(128, 160))):
        im.save(selfies / f"s{i}.png")
    return selfies


def test_evaluate_compare_modes_prints_the_likeness_per_mode(trained, twin_cli_env, tmp_path, capsys):
    import json
    import generate_twin
    from tests.fakes import CliFaceService
    out = tmp_path / "cmp"
    rc = generate_twin.main(["evaluate", "--compare-modes", "--selfies", str(twin_cli_env), "--twin-lora",
                             str(trained["dir"]), "--seeds", "1", "2", "--out", str(out), "--json",
                             str(tmp_path / "cmp.json")], face_service_factory=CliFaceService)
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    rep = json.loads((tmp_path / "cmp.json").read_text())
    assert [r["mode"] for r in rep["modes"]] == ["adapter", "lora", "both"]
    assert all(len(r["likeness"]) == 2 for r in rep["modes"])
    for mode in ("adapter", "lora", "both"):
        assert f"\n{mode} " in printed and (out / f"{mode}_1.png").exists()
    a, lo = (np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / f"{m}_1.png")) for m in ("adapter", "lora"))
    assert np.abs(a.astype(int) - lo.astype(int)).max() > 0      # the modes really differ


@pytest.mark.parametrize("args, code_text", [
    (["--identity-mode", "lora"], "no_twin_lora"),
    (["--identity-mode", "both"], "no_twin_lora"),
])
def test_the_cli_refuses_lora_modes_without_a_twin(twin_cli_env, tmp_path, capsys, args, code_text):
    import generate_twin
    from tests.fakes import CliFaceService
    rc = generate_twin.main(["--selfies", str(twin_cli_env), "--prompt", "p", "--out", str(tmp_path / "o"), *args],
                            face_service_factory=CliFaceService)
    assert rc == 2 and "needs a trained twin LoRA" in capsys.readouterr().err


def test_the_cli_generates_with_a_twin_folder(trained, twin_cli_env, tmp_path):
    import json
    import generate_twin
    from tests.fakes import CliFaceService
    out = tmp_path / "o"
    rc = generate_twin.main(["--selfies", str(twin_cli_env), "--prompt", "p", "--out", str(out), "--twin-lora",
                             str(trained["dir"]), "--seed", "1"], face_service_factory=CliFaceService)
    assert rc == 0
    meta = json.loads((out / "metadata.json").read_text())["result"]
    assert meta["identity_mode"] == "both" and meta["twin_lora"]["token"] == "zqxkvw"


def test_training_runs_in_the_generator_process_with_loss_progress_and_cancel(trained, tiny_settings, tmp_path):
    """The default local mode holds the model in a child process: train() goes there like generate(), its
    progress comes back with the loss, and a cancel stops it within one optimiser step."""
    from utils import errors
    from utils.engine.generator import DigitalTwinGenerator
    from utils.jobs.local.generator_process import GeneratorProcess
    g = GeneratorProcess(tiny_settings.replace(max_steps=2), engine_class=DigitalTwinGenerator).setup()
    try:
        events = []
        record = g.train(spec_for(tmp_path / "child"), lambda *a: events.append(a))
        assert [e[0] for e in events] == list(range(1, STEPS + 1))
        assert [e[3]["loss"] for e in events] == pytest.approx(record["loss_curve"], abs=1e-5)
        assert record["loss_curve"] == pytest.approx(trained["record"]["loss_curve"], rel=1e-3)
        assert (tmp_path / "child" / "twin_lora.safetensors").is_file()
        seen = []
        with pytest.raises(errors.JobCanceled):
            g.train(spec_for(tmp_path / "cut"), lambda *a: seen.append(a[0]), lambda: len(seen) >= 2)
        assert len(seen) <= 3 and not (tmp_path / "cut" / "twin_lora.safetensors").exists()
    finally:
        g.close()


@pytest.mark.parametrize("size, box, expect_left_top", [
    ((400, 300), (150, 100, 250, 200), [(120, 70), (90, 40), (50, 0)]),     # centred; the last shifted in
    ((400, 300), (0, 0, 60, 60), [(0, 0), (0, 0), (0, 0)]),                 # a corner face: moved inside
    ((100, 80), (20, 20, 80, 80), [(10, 0), (10, 0), (10, 0)]),             # larger than the picture: clipped
])
def test_face_squares_stay_inside_the_picture(size, box, expect_left_top):
    """Three squares around the face box (close-up, head, head-and-shoulders), resized to the training side;
    each crop is cut where the numbers say (the colour of a pixel encodes its position)."""
    from PIL import Image
    from utils.engine.training.data import CROP_SCALES, face_squares
    w, h = size
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    pic = Image.fromarray(np.stack([xs % 256, ys % 256, np.zeros_like(xs)], -1).astype(np.uint8))
    squares = face_squares(pic, box, 32)
    assert len(squares) == len(CROP_SCALES) and all(s.size == (32, 32) for s in squares)
    for sq, scale, (left, top) in zip(squares, CROP_SCALES, expect_left_top):
        side = min(max(box[2] - box[0], box[3] - box[1]) * scale, w, h)
        tol = side / 32 + 2           # the resize averages the first side/32 source pixels into the corner one
        corner = np.asarray(sq)[0, 0]
        assert abs(int(corner[0]) - left) <= tol and abs(int(corner[1]) - top) <= tol
