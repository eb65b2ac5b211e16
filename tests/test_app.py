"""The Gradio app end to end in headless Chromium, talking to a real server started here.

What a clinician sees is checked on screenshots and on the pictures the page shows: the small PNG enlarged, the
answer's chips in the colours of the legend and the overlay, the results gone the moment a new file is uploaded or
another frame chosen, the frame slider changing the picture, the CT window menu for CT only, and downloaded mask
files that read back.
"""

from __future__ import annotations

import base64
import io
import os
import re
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
WAIT_MS = 60_000


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


# --- reading what the page shows ---------------------------------------------------------------------------------
def _image_from_src(page, src: str) -> np.ndarray:
    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        response = page.request.get(src)
        assert response.ok, f"the image {src} did not load: {response.status}"
        data = response.body()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _viewer_images(page) -> list[np.ndarray]:
    """The viewer's two pictures (left: the image sent; right: with masks and boxes), as the server sent them."""
    return [_image_from_src(page, src) for src in _viewer_sources(page)]


def _viewer_sources(page) -> list[str]:
    return page.eval_on_selector_all("#viewer img", "els => els.map(e => e.src)")


def _screenshot(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)


def _has_colour(pixels: np.ndarray, colour, tolerance: int = 40) -> bool:
    return bool((np.abs(pixels.astype(int) - np.array(colour)).sum(axis=-1) < tolerance).any())


def _css_rgb(text: str) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in re.findall(r"\d+", text)[:3])
    return r, g, b


def _wait_viewer_change(page, before: list[str]) -> None:
    page.wait_for_function(
        "before => { const s = [...document.querySelectorAll('#viewer img')].map(e => e.src);"
        " return s.length === 2 && s.some((v, i) => v !== before[i]); }",
        arg=before,
        timeout=WAIT_MS,
    )


def _results_are_empty(page) -> bool:
    return page.evaluate(
        "() => document.querySelector('#answer').innerText.trim() === ''"
        " && document.querySelector('#legend').innerText.trim() === ''"
        " && document.querySelectorAll('#answer .seg-chip').length === 0"
        " && document.querySelectorAll('#downloads a').length === 0"
    )


def _upload(page, path: Path) -> None:
    if page.locator("#upload button[aria-label='Clear']").count():
        page.click("#upload button[aria-label='Clear']")
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=WAIT_MS)
    page.set_input_files("#upload input[type=file]", str(path))


def _ask(page) -> None:
    page.click("#ask")
    page.wait_for_selector("#answer .seg-chip, .toast-body", timeout=120_000)
    toasts = page.locator(".toast-body")
    assert toasts.count() == 0, f"the page showed an error: {toasts.first.inner_text()}"
    page.wait_for_selector("#downloads a", timeout=WAIT_MS)


def _transform(page) -> list[float]:
    """The viewer picture's CSS transform as ``[scale, translate x, translate y]``."""
    matrix = page.eval_on_selector("#viewer img", "e => getComputedStyle(e).transform")
    values = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", matrix)] if matrix != "none" else []
    return [values[0], values[4], values[5]] if len(values) == 6 else [1.0, 0.0, 0.0]


def _zoom_and_pan(page) -> None:
    """Scrolling over the viewer zooms in, dragging then moves the picture, its reset button undoes both."""
    box = page.locator("#viewer img").first.bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
    page.mouse.move(x, y)
    for _ in range(8):
        page.mouse.wheel(0, -200)
        page.wait_for_timeout(40)
    page.wait_for_timeout(300)
    scale, tx, ty = _transform(page)
    assert scale > 1.2, f"the viewer did not zoom in (scale {scale})"
    page.mouse.down()
    page.mouse.move(x + 60, y + 40, steps=5)
    page.mouse.up()
    page.wait_for_timeout(300)
    _, moved_x, moved_y = _transform(page)
    assert (moved_x, moved_y) != (tx, ty), "dragging did not pan the zoomed picture"
    page.click("#viewer button[aria-label='Undo']")  # the viewer's reset-zoom button
    page.wait_for_function("getComputedStyle(document.querySelector('#viewer img')).transform.startsWith('matrix(1,')")


def _download(page, suffix: str, out_dir: Path) -> Path:
    link = page.locator(f"#downloads a[download$='{suffix}']").first
    with page.expect_download(timeout=WAIT_MS) as info:
        link.click()
    target = out_dir / info.value.suggested_filename
    info.value.save_as(target)
    return target


# --- the test ----------------------------------------------------------------------------------------------------
def test_viewer_chips_stale_results_frames_and_downloads(app_url, tmp_path):
    sync_api = _browser_or_skip()
    hd = pytest.importorskip("highdicom")
    from pydicom.data import get_testdata_file

    from citrus_v.app.display import enlarge
    from citrus_v.app.scan import View, open_scan

    small = tmp_path / "scan.png"
    small.write_bytes(png_bytes(phantom(4, size=128).image))
    multi_frame = Path(get_testdata_file("emri_small.dcm"))  # 10 frames of 64 x 64, MR
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400}, accept_downloads=True)
            page.goto(app_url, wait_until="domcontentloaded")
            page.wait_for_selector("#notice", timeout=WAIT_MS)
            assert "Research use only — not for diagnosis" in page.inner_text("#notice")

            # a 128-pixel PNG: shown enlarged with sharp pixels, no frame slider, no window menu
            _upload(page, small)
            page.wait_for_function("document.querySelectorAll('#viewer img').length === 2", timeout=WAIT_MS)
            sent, _ = _viewer_images(page)
            assert sent.shape == (768, 768, 3)
            assert np.array_equal(sent[::6, ::6], np.asarray(Image.open(small).convert("RGB")))
            assert page.locator("#viewer img").first.bounding_box()["width"] > 400
            assert not page.is_visible("#frame") and not page.is_visible("#window")
            _zoom_and_pan(page)

            # ask: the answer's [SEG] tokens are chips, coloured as the legend and the masks on the overlay
            before = _viewer_sources(page)
            _ask(page)
            _wait_viewer_change(page, before)
            answer = page.inner_text("#answer")
            assert "[SEG]" not in answer and "Sure, the lesion" in answer and "Answer about scan.png" in answer
            chips = page.eval_on_selector_all(
                "#answer .seg-chip", "els => els.map(e => [e.dataset.mask, getComputedStyle(e).backgroundColor])"
            )
            swatches = dict(
                page.eval_on_selector_all(
                    "#legend .legend-swatch",
                    "els => els.map(e => [e.dataset.swatch, getComputedStyle(e).backgroundColor])",
                )
            )
            assert [number for number, _ in chips] == ["1", "2"]
            _, overlay = _viewer_images(page)
            viewer_shot = _screenshot(page.locator("#viewer"))
            for k, (number, background) in enumerate(chips):
                colour = _css_rgb(background)
                assert colour == PALETTE[k] == _css_rgb(swatches[number])
                chip_shot = _screenshot(page.locator("#answer .seg-chip").nth(k))
                assert _has_colour(chip_shot, colour, tolerance=10), f"chip {number} is not drawn in {colour}"
                assert _has_colour(overlay, colour), f"mask {number}'s colour {colour} is not on the overlay"
            assert _has_colour(viewer_shot, PALETTE[1]), "the overlay's masks are not on screen"
            assert "SAM 2 predicted IoU" in page.inner_text("#legend")
            png_mask = _download(page, ".png", tmp_path)
            assert Image.open(png_mask).size == (128, 128)

            # a new upload: every result of the PNG is gone at once, the viewer shows the new scan in grey
            _upload(page, multi_frame)
            page.wait_for_selector("#frame", state="visible", timeout=WAIT_MS)
            page.wait_for_function("document.querySelector('#answer').innerText.trim() === ''", timeout=WAIT_MS)
            assert _results_are_empty(page)
            assert not page.is_visible("#window")  # MR: no CT window presets
            page.wait_for_function(
                "document.querySelectorAll('#viewer img').length === 2 && [...document.querySelectorAll('#viewer img')]"
                ".every(e => e.naturalWidth === 768)",
                timeout=WAIT_MS,
            )
            scan = open_scan(multi_frame)
            middle = np.asarray(enlarge(scan.render(View(index=5)), (12, 12)))
            page.wait_for_function(
                "document.querySelector('#frame input[type=number]').value === '6'", timeout=WAIT_MS
            )
            assert all(np.array_equal(image, middle) for image in _viewer_images(page))
            shot_middle = _screenshot(page.locator("#viewer"))
            assert not _has_colour(shot_middle, PALETTE[0], tolerance=20)  # no mask of the PNG on the MR frame

            # the frame slider changes the frame shown (and the one sent)
            before = _viewer_sources(page)
            page.fill("#frame input[type=number]", "1")
            page.press("#frame input[type=number]", "Enter")
            _wait_viewer_change(page, before)
            first = np.asarray(enlarge(scan.render(View(index=0)), (12, 12)))
            assert all(np.array_equal(image, first) for image in _viewer_images(page))
            page.wait_for_timeout(300)  # the new picture is painted
            shot_first = _screenshot(page.locator("#viewer"))
            assert np.abs(shot_first - shot_middle).mean() > 2, "the screen did not change with the frame"

            # frame 4 as a picture (untick the whole-volume mode, on by default for a multi-frame file): ask,
            # download its DICOM Segmentation, then another frame clears the results
            page.click("#whole input[type=checkbox]")
            page.wait_for_function("!document.querySelector('#whole input[type=checkbox]').checked", timeout=WAIT_MS)
            page.wait_for_timeout(300)  # the picture mode's view is shown
            before = _viewer_sources(page)
            page.fill("#frame input[type=number]", "4")
            page.press("#frame input[type=number]", "Enter")
            _wait_viewer_change(page, before)
            _ask(page)
            assert "emri_small.dcm, frame 4 of 10" in page.inner_text("#answer")
            seg = hd.seg.segread(_download(page, "_seg.dcm", tmp_path))
            assert seg.number_of_segments == 2 and int(seg.Rows) == 64
            page.fill("#frame input[type=number]", "5")
            page.press("#frame input[type=number]", "Enter")
            page.wait_for_function("document.querySelector('#answer').innerText.trim() === ''", timeout=WAIT_MS)
            assert _results_are_empty(page)

            # a CT file gets the window presets
            _upload(page, Path(get_testdata_file("CT_small.dcm")))
            page.wait_for_selector("#window", state="visible", timeout=WAIT_MS)
            assert not page.is_visible("#frame")
        finally:
            browser.close()
