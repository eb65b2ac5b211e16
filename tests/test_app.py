"""The Gradio app end to end in headless Chromium, talking to a real server started here."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from citrus_v.infer.overlay import PALETTE
from citrus_v.serve.server import ServerSettings, create_app

from .conftest import phantom
from .test_serve_support import ScriptedPredictor, free_port, png_bytes, running_server

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _browser_or_skip():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install '.[test]'")
    if not CHROMIUM.is_file() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (make install runs: apt-get install -y chromium chromium-driver)")
    return sync_api


@pytest.fixture(scope="module")
def app_url(tiny, tmp_path_factory):
    pytest.importorskip("gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    from citrus_v.app.page import ApiSettings, build_page, launch

    model, processor = tiny
    server_app = create_app(ScriptedPredictor(model, processor), ServerSettings(served_model_name="tiny", api_key="k"))
    with running_server(server_app) as server_url:
        page = build_page(ApiSettings(f"{server_url}/v1", api_key="k"))
        port = free_port()
        launch(page, "127.0.0.1", port, block=False)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            page.close()


def _image_from_src(page, src: str) -> Image.Image:
    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    response = page.request.get(src)
    assert response.ok, f"the overlay image {src} did not load: {response.status}"
    return Image.open(io.BytesIO(response.body())).convert("RGB")


def test_upload_segment_and_see_the_overlay(app_url, tmp_path):
    sync_api = _browser_or_skip()
    scan = phantom(4, size=192).image
    upload = tmp_path / "scan.png"
    upload.write_bytes(png_bytes(scan))
    nib = pytest.importorskip("nibabel")
    volume = tmp_path / "ct.nii.gz"
    slices = [phantom(k, size=64).image.astype(np.float32) * 4 - 1000 for k in range(4)]
    nib.save(nib.Nifti1Image(np.stack(slices, axis=-1), np.diag([0.8, 0.8, 2.5, 1.0])), volume)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(app_url, wait_until="domcontentloaded")
            page.wait_for_selector("#upload input[type=file]", state="attached", timeout=60_000)
            page.set_input_files("#upload input[type=file]", str(upload))
            page.wait_for_selector("#preview img", timeout=60_000)
            page.get_by_label("Detection").check()
            page.wait_for_function(
                "document.querySelector('#query textarea').value.startsWith('Locate')", timeout=30_000
            )
            page.get_by_label("Segmentation").check()
            page.wait_for_function(
                "document.querySelector('#query textarea').value === 'Please segment the lesion.'", timeout=30_000
            )
            page.click("#ask")
            page.wait_for_selector("#overlay img", timeout=120_000)
            page.wait_for_function("document.querySelector('#answer').innerText.includes('[SEG]')", timeout=30_000)
            overlay = _image_from_src(page, page.get_attribute("#overlay img", "src"))
            answer = page.inner_text("#answer")
            assert not page.is_visible("#slice")  # a 2-D image has no slices

            # a CT volume: the slice slider and the window preset appear, and the slider changes the picture
            page.click("#upload button[aria-label='Clear']")
            page.wait_for_selector("#upload input[type=file]", state="attached", timeout=30_000)
            page.set_input_files("#upload input[type=file]", str(volume))
            page.wait_for_selector("#slice", state="visible", timeout=60_000)
            assert page.is_visible("#window")
            page.wait_for_function("document.querySelector('#preview img') !== null", timeout=60_000)
            first = page.get_attribute("#preview img", "src")
            page.fill("#slice input[type=number]", "0")
            page.press("#slice input[type=number]", "Enter")
            page.wait_for_function(
                f"document.querySelector('#preview img') && document.querySelector('#preview img').src !== {first!r}",
                timeout=60_000,
            )
        finally:
            browser.close()
    assert "Sure, the lesion [SEG] and the organ [SEG]." in answer
    # the overlay is the scan plus a legend strip, with the first two palette colours on it
    assert overlay.width == 192 and overlay.height > 192
    pixels = np.asarray(overlay)
    for tint in PALETTE[:2]:
        assert (np.abs(pixels.astype(int) - np.array(tint)).sum(axis=-1) < 30).any(), f"no {tint} in the overlay"
