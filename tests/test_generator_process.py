"""GeneratorProcess: the real tiny generator in a child process behaves like the in-process one.

One child serves the whole module (spawning costs a torch import); the tests that kill or close a child
run last and use their own where they must.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from utils.service import status

from generate_twin import DigitalTwinGenerator
from tests.fixtures.models import make_crops
from tests.helpers import REPO
from tests.helpers.wait import wait_until
from utils import errors
from utils.jobs.local.generator_process import GeneratorCrashed, GeneratorProcess, _error_payload, _rebuild_error


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _png_b64() -> str:
    import base64
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.indices((48, 48)).sum(0) * 3 % 256).astype(np.uint8)).convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_INIT_PNG = _png_b64()


@pytest.fixture(scope="module")
def proc_settings(tiny_settings):
    # Uncapped steps: cancel and concurrency need a generation that lasts a while.
    return tiny_settings.replace(max_steps=0)


@pytest.fixture(scope="module")
def local_gen(proc_settings):
    from generate_twin import DigitalTwinGenerator
    return DigitalTwinGenerator(proc_settings).setup()


@pytest.fixture(scope="module")
def gen_proc(proc_settings):
    g = GeneratorProcess(proc_settings, engine_class=DigitalTwinGenerator).setup()
    yield g
    g.close()


def _req(settings, identity=None, **payload):
    from generate_twin import GenerationRequest
    base = {"prompt": "a portrait", "seed": 7, "quality_mode": "fast", "width": 64, "height": 64}
    return GenerationRequest.from_dict({**base, **payload}, settings).with_identity(identity)


@pytest.fixture(scope="module")
def identity(local_gen):
    return local_gen.build_identity(make_crops(2), None, face_model="dlib-resnet-v1-128")


def test_settings_request_and_identity_pickle(proc_settings, identity):
    req = _req(proc_settings, identity)
    back = pickle.loads(pickle.dumps((proc_settings, req)))
    assert back[0] == proc_settings and back[1] == req
    import torch
    assert torch.equal(back[1].identity.embeds, identity.embeds)


@pytest.mark.parametrize("payload", [
    {"quality_mode": "fast"},
    {"quality_mode": "balanced", "num_images": 2, "seed": 123},
    {"quality_mode": "fast", "style": "none", "aspect_ratio": "3:4", "width": None, "height": None},
    # Issue 14's controls cross the pipe too: compel weighting, the persona builder, img2img.
    {"quality_mode": "fast", "style": "cinematic", "style_strength": 0.5},
    {"quality_mode": "fast", "persona": {"age": 40}, "attributes": {"gender": "male", "hair": "grey"}},
    {"quality_mode": "fast", "init_image": _INIT_PNG, "strength": 0.5},
])
@pytest.mark.parametrize("with_identity", [False, True])
def test_same_seed_gives_the_same_images_as_in_process(gen_proc, local_gen, proc_settings, identity, payload,
                                                       with_identity):
    req = _req(proc_settings, identity if with_identity else None, **payload)
    a, b = gen_proc.generate(req), local_gen.generate(req)
    assert a.seeds == b.seeds
    assert [im.size for im in a.images] == [im.size for im in b.images]
    for x, y in zip(a.images, b.images):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert {k: v for k, v in a.metadata.items() if k != "timings"} == \
        {k: v for k, v in b.metadata.items() if k != "timings"}


def test_info_and_state_match_the_in_process_generator(gen_proc, local_gen):
    assert gen_proc.state == "ready"
    mine, theirs = gen_proc.info(), local_gen.info()
    assert mine["process"]["pid"] == gen_proc.pid != os.getpid()
    assert {k: mine[k] for k in theirs} == theirs


def test_progress_fires_once_per_step_in_the_calling_thread(gen_proc, proc_settings):
    seen, threads = [], set()

    def on_progress(step, total):
        seen.append((step, total))
        threads.add(threading.get_ident())

    res = gen_proc.generate(_req(proc_settings, quality_mode="balanced"), on_progress=on_progress,
                            should_cancel=lambda: False)
    total = res.metadata["steps"]
    assert seen == [(i, total) for i in range(1, total + 1)]
    assert threads == {threading.get_ident()}


@pytest.mark.parametrize("cancel_after_step", [0, 1, 5])
def test_cancel_stops_within_one_step_and_the_child_stays_usable(gen_proc, proc_settings, cancel_after_step):
    seen: list[int] = []
    flag = threading.Event()
    if cancel_after_step == 0:
        flag.set()

    def on_progress(step, total):
        seen.append(step)
        if step >= cancel_after_step:
            flag.set()

    with pytest.raises(errors.JobCanceled) as ei:
        gen_proc.generate(_req(proc_settings, quality_mode="high_fidelity"), on_progress=on_progress,
                          should_cancel=flag.is_set)
    assert ei.value.code == "canceled"
    # The parent sends the cancel as soon as it sees the flag; the child notices at its next step end.
    assert len(seen) <= max(cancel_after_step, 0) + 2, seen
    assert gen_proc.generate(_req(proc_settings)).images


@pytest.mark.parametrize("payload, identity_variant, code", [
    ({"lora": "no_such_lora"}, None, "invalid_request"),
    ({}, "faceid", "identity_mismatch"),
])
def test_invalid_request_raises_the_same_error_as_in_process(gen_proc, local_gen, proc_settings, identity, payload,
                                                             identity_variant, code):
    import dataclasses
    ident = dataclasses.replace(identity, variant=identity_variant) if identity_variant else None
    req = _req(proc_settings, ident, **payload)
    for call in ("validate", "generate"):
        with pytest.raises(errors.TwinError) as here:
            getattr(local_gen, call)(req)
        with pytest.raises(errors.TwinError) as there:
            getattr(gen_proc, call)(req)
        assert type(there.value) is type(here.value)
        assert (there.value.code, there.value.message, there.value.http_status) == \
            (here.value.code, here.value.message, here.value.http_status) and here.value.code == code


def test_build_identity_matches_and_does_not_wait_for_a_running_generation(gen_proc, local_gen, proc_settings):
    import torch
    crops, embs = make_crops(3, seed=4), None
    started, done = threading.Event(), threading.Event()
    box = {}

    def long_job():
        try:
            box["res"] = gen_proc.generate(_req(proc_settings, quality_mode="high_fidelity", num_images=2,
                                                width=128, height=128),
                                           on_progress=lambda s, t: started.set(), should_cancel=lambda: False)
        finally:
            done.set()

    th = threading.Thread(target=long_job)
    th.start()
    assert started.wait(120)
    ident = gen_proc.build_identity(crops, embs, face_model="dlib-resnet-v1-128", combine="stack")
    finished_first = done.is_set()
    th.join(300)
    assert not finished_first, "build_identity waited for the whole generation"
    assert box["res"].images
    expected = local_gen.build_identity(crops, embs, face_model="dlib-resnet-v1-128", combine="stack")
    assert (ident.variant, ident.combine, ident.num_selfies) == (expected.variant, "stack", 3)
    assert torch.equal(ident.embeds, expected.embeds)


@pytest.mark.parametrize("exc", [
    errors.InvalidRequest("lora='x' is not installed"),
    errors.InvalidRequest("bad identity", code="identity_invalid"),
    errors.QueueFull("queue is full", retry_after=3),
    errors.OutOfMemory("out of GPU memory at 1024x1024", details={"num_images": 4}),
    errors.JobCanceled("canceled after step 2 of 25"),
    errors.ModelWeightsMissing("weights missing in /models"),
    errors.TwinError("plain", code="custom", http_status=418),
    GeneratorCrashed("child died"),
])
def test_twin_error_round_trip_keeps_class_code_status_and_details(exc):
    back = _rebuild_error(pickle.loads(pickle.dumps(_error_payload(exc))))
    assert type(back) is type(exc)
    assert (back.message, back.code, back.http_status, back.details, back.headers) == \
        (exc.message, exc.code, exc.http_status, exc.details, exc.headers)


@pytest.mark.parametrize("exc, expected_type, code", [
    (ValueError("boom"), RuntimeError, None),                      # a bug: not a TwinError, text only logged
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA oom"), errors.OutOfMemory, "out_of_memory"),
])
def test_other_exceptions_from_the_child(exc, expected_type, code):
    back = _rebuild_error(_error_payload(exc))
    assert type(back) is expected_type
    assert getattr(back, "code", None) == code


def test_child_killed_mid_job_fails_that_call_then_restarts(gen_proc, proc_settings, tmp_path):
    from tests.fakes import FakeFaceService, fake_safety
    from utils.service.wiring import build_runtime
    settings = proc_settings.replace(data_dir=tmp_path)
    runtime = build_runtime(settings, engines=[gen_proc], faces=FakeFaceService(), safety=fake_safety(settings))
    runtime.state = "ready"  # as after set-up; /health then follows the generator process
    assert status.health(runtime)["state"] == "ready"
    old_pid = gen_proc.pid
    steps: list[int] = []

    def on_progress(step, total):
        steps.append(step)
        if step == 2:
            os.kill(old_pid, signal.SIGKILL)

    with pytest.raises(GeneratorCrashed) as ei:
        gen_proc.generate(_req(proc_settings, quality_mode="high_fidelity"), on_progress=on_progress)
    assert (ei.value.code, ei.value.http_status) == ("worker_crashed", 503)
    assert gen_proc.info()["process"]["restarts"] == 1
    assert gen_proc.state == "restarting" and status.health(runtime)["state"] == "restarting"
    # The next call waits for the restart and succeeds on a fresh child.
    res = gen_proc.generate(_req(proc_settings))
    assert res.images and gen_proc.state == "ready"
    assert gen_proc.pid != old_pid and not _alive(old_pid)
    assert status.health(runtime)["state"] == "ready"
    runtime.store.close()


def test_close_leaves_no_child_process(gen_proc):
    pid = gen_proc.pid
    assert _alive(pid)
    gen_proc.close()
    assert not _alive(pid)
    assert gen_proc.state == "stopped"
    with pytest.raises(errors.ServiceNotReady):
        gen_proc.generate(None)


def test_setup_failure_in_the_child_keeps_the_error_class(tmp_path, proc_settings):
    g = GeneratorProcess(proc_settings.replace(model_profile="sdxl", model_dir=tmp_path / "empty"),
                         engine_class=DigitalTwinGenerator)
    with pytest.raises(errors.ModelWeightsMissing) as ei:
        g.setup()
    assert g.state == "setup_failed" and g.info()["error"]["code"] == ei.value.code
    assert g.pid is None or not _alive(g.pid)
    g.close()


CHILD_OF_KILLED_PARENT = r"""
import sys, time
from generate_twin import DigitalTwinGenerator
from utils.config import Settings
from utils.jobs.local.generator_process import GeneratorProcess
if __name__ == "__main__":
    s = Settings(data_dir=sys.argv[1], model_profile="tiny", tiny_model_dir=sys.argv[2], warmup=False)
    g = GeneratorProcess(s, engine_class=DigitalTwinGenerator).setup()
    print("CHILD_PID", g.pid, flush=True)
    time.sleep(600)
"""


def test_child_exits_when_its_parent_is_killed(tmp_path, tiny_models):
    script = tmp_path / "parent.py"
    script.write_text(CHILD_OF_KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), str(tiny_models)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child_pid = None
        for line in parent.stdout:  # the child logs JSON lines on the same stdout
            if line.startswith("CHILD_PID "):
                child_pid = int(line.split()[1])
                break
        assert child_pid is not None
        assert _alive(child_pid)
    finally:
        parent.kill()
        parent.wait(10)
    wait_until(lambda: not _alive(child_pid), timeout=10)


def test_close_during_a_restart_returns_promptly_and_leaves_no_child(proc_settings):
    g = GeneratorProcess(proc_settings, engine_class=DigitalTwinGenerator).setup()
    first = g.pid
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: g.state == "restarting" and g.pid != first, timeout=10)
    second = g.pid  # loading models now
    t0 = time.monotonic()
    g.close()
    assert time.monotonic() - t0 < 10
    assert g.state == "stopped" and not _alive(first) and not _alive(second)
    with pytest.raises(errors.ServiceNotReady):
        g.validate(None)


@pytest.mark.parametrize("on, expected", [(True, "GeneratorProcess"), (False, "DigitalTwinGenerator")])
def test_build_engines_picks_the_process_by_setting(tiny_settings, on, expected):
    from utils.service.wiring import build_engines
    gens = build_engines(tiny_settings.replace(generator_process=on))  # nothing starts before setup()
    assert [type(g).__name__ for g in gens] == [expected] and gens[0].state == "starting"
    for g in gens:
        g.close()


@pytest.mark.parametrize("env, expected", [({}, True), ({"TWIN_GENERATOR_PROCESS": "0"}, False),
                                           ({"TWIN_GENERATOR_PROCESS": "1"}, True)])
def test_generator_process_setting_from_env(env, expected):
    from utils.config import Settings
    assert Settings.from_env(env).generator_process is expected
