"""Live previews (preview: true): a cheap latent -> RGB projection every few steps, from the real tiny
pipeline, through the job manager to GET /preview/<job_id> and preview events."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from generate_twin import GenerationRequest, latent_preview_jpeg, preview_steps
from tests.fakes import FakeGenerator
from tests.helpers.http import assert_error, finished, upload
from tests.helpers.sse import parse_sse
from tests.helpers.wait import wait_until


@pytest.mark.parametrize("total, expected", [
    (1, {1}), (4, {1, 2, 3, 4}), (8, {1, 2, 3, 4, 5, 6, 7, 8}), (25, {4, 8, 12, 16, 20, 24, 25}),
    (40, {5, 10, 15, 20, 25, 30, 35, 40}),
])
def test_preview_steps_are_evenly_spaced_and_include_the_last(total, expected):
    assert preview_steps(total) == expected


def test_projection_maps_latent_channels_to_colour():
    lat = torch.zeros(1, 4, 8, 8)
    grey = np.asarray(Image.open(io.BytesIO(latent_preview_jpeg(lat))))
    lat[0, 0] = 2.0  # channel 0 is mostly luminance in SDXL's latent space
    bright = np.asarray(Image.open(io.BytesIO(latent_preview_jpeg(lat))))
    assert grey.shape == bright.shape == (128, 128, 3)  # small latents are scaled up to a viewable side
    assert bright.mean() > grey.mean() + 50


def test_the_real_pipeline_sends_previews_only_when_asked(tiny_generator, tiny_settings):
    calls = {}
    for want in (False, True):
        got = []
        req = GenerationRequest.from_dict({"prompt": "a portrait", "seed": 3, "preview": want}, tiny_settings)
        tiny_generator.generate(req, on_progress=lambda s, t, *p: got.append((s, t, *p)))
        calls[want] = got
    assert all(len(c) == 2 for c in calls[False])
    with_preview = [c for c in calls[True] if len(c) == 3]
    total = calls[True][0][1]
    assert [c[0] for c in with_preview] == sorted(preview_steps(total))
    images = [np.asarray(Image.open(io.BytesIO(c[2]))) for c in with_preview]
    assert all(im.ndim == 3 and im.shape[2] == 3 for im in images)
    if len(images) > 1:
        assert not np.array_equal(images[0], images[-1])  # the image forms: previews change


class PreviewFake(FakeGenerator):
    """A generator double that sends a preview with every step and waits at step 2 until released."""

    def generate(self, req, on_progress=None, should_cancel=None):
        def progress(step, total):
            on_progress(step, total, latent_preview_jpeg(torch.full((1, 4, 4, 4), step / 10)))
            if step == 2:
                self.started.set()
                self.release.wait(10)
        return super().generate(req, on_progress=progress, should_cancel=should_cancel)


def test_preview_endpoint_and_events_while_a_job_runs(make_app):
    gen = PreviewFake()
    app = make_app(generator=gen)
    client, other = app.test_client(), app.test_client()
    upload(client)
    upload(other)
    job_id = client.post("/generate", json={"prompt": "p", "quality_mode": "fast"}).json["id"]
    wait_until(gen.started.is_set)
    r = client.get(f"/preview/{job_id}")
    assert r.status_code == 200 and r.mimetype == "image/jpeg" and r.headers["X-Preview-Step"] == "2"
    assert Image.open(io.BytesIO(r.data)).format == "JPEG"
    assert_error(other.get(f"/preview/{job_id}"), 404, "not_found")
    gen.release.set()
    finished(client, job_id)
    assert_error(client.get(f"/preview/{job_id}"), 404, "not_found", "no preview")
    events = parse_sse(client.get(f"/events/{job_id}").get_data(as_text=True))[0]
    previews = [e["data"] for e in events if e["event"] == "preview"]
    assert [p["step"] for p in previews] == [1, 2, 3, 4]
    head, b64 = previews[0]["image"].split(",", 1)
    assert head == "data:image/jpeg;base64" and Image.open(io.BytesIO(base64.b64decode(b64))).format == "JPEG"
    # Each preview follows its step's progress event.
    kinds = [(e["event"], e["data"].get("step")) for e in events if e["event"] in ("progress", "preview")]
    assert kinds == [(k, s) for s in range(1, 5) for k in ("progress", "preview")]


@pytest.mark.parametrize("value", ["yes", 1, [True]])
def test_preview_must_be_a_boolean(tiny_settings, value):
    from utils.errors import InvalidRequest
    with pytest.raises(InvalidRequest, match="preview="):
        GenerationRequest.from_dict({"prompt": "p", "preview": value}, tiny_settings)
