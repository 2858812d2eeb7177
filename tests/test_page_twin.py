"""The /test page's twin studio in headless chromium against gunicorn on the real tiny engine: upload,
"Train my twin" (progress with the loss, then the ready twin), then the likeness picker's choice is sent
with the generation."""
from __future__ import annotations

import pytest

from tests.page_helpers import selfie_paths

pytestmark = pytest.mark.slow


def test_page_trains_a_twin_and_generates_with_it(browser, start_server, tmp_path, tiny_models):
    from tests.fixtures.service import server_env
    env = server_env(tmp_path / "data", tiny_models, TWIN_MODEL_DIR=str(tmp_path / "no-models"), TWIN_DEVICE="cpu",
                     TWIN_MAX_STEPS="2", TWIN_WARMUP="0")
    server = start_server(env)
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server.url + "/test")
        page.wait_for_selector("#service-state[data-state='ready']", timeout=60_000)
        assert page.locator("#twin-train-btn").is_disabled()               # no session yet
        paths = selfie_paths(tmp_path, 2)
        page.set_input_files("#files", paths)
        page.click("#upload-btn")
        page.locator("#upload-report").wait_for(state="visible")
        page.wait_for_selector("#twin-train-btn:not([disabled])", timeout=10_000)
        page.fill("#train_steps", "8")
        page.fill("#train_rank", "4")
        with page.expect_response(lambda r: r.url.endswith("/train")) as resp_info:
            page.click("#twin-train-btn")
        assert resp_info.value.status == 202, resp_info.value.text()
        assert resp_info.value.request.post_data_json == {"rank": 4, "steps": 8}
        assert resp_info.value.json()["kind"] == "train"
        page.wait_for_function("document.querySelector('#twin-status').textContent.includes('Your twin is ready')",
                               timeout=120_000)
        assert "step 8 of 8" in page.locator("#twin-progress-label").text_content()
        assert "loss" in page.locator("#twin-progress-label").text_content()
        page.fill("#prompt", "a portrait")
        page.select_option("#identity_mode", "both")
        with page.expect_request(lambda r: r.url.endswith("/generate")) as req_info:
            page.click("#generate-btn")
        sent = req_info.value.post_data_json
        assert (sent["identity_mode"], sent["twin_lora_scale"]) == ("both", 1)
        page.wait_for_selector("#job-progress[data-status='succeeded']", timeout=120_000)
    finally:
        context.close()
    assert not errors, errors
