"""The web app asks about a whole volume: the file goes to the server as one ``video_url`` part, the answer's
per-frame masks follow the slider (along every NIfTI axis), the legend gives each mask's volume in mL, an absent
target is a line without colour, and the 3-D masks download on the source's grid.

The server here is a small OpenAI-compatible endpoint that reads the volume it is sent with
:func:`citrus_v.media.read_volume_bytes` and answers in ``citrus-v deploy``'s format for volumes
(``grounding.volume_masks``: per ``[SEG]`` the frames with their COCO RLE, ``volume_ml``, ``spacing``,
``bbox3d``, ``key_frame``, ``present``); files are nibabel's and pydicom's test data.
"""

from __future__ import annotations

import base64
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from citrus_v.app.answer_chips import answer_html
from citrus_v.app.handlers import CLEARED_RESULTS
from citrus_v.app.scan import View, load_volume, open_scan
from citrus_v.app.volume_answer import decode_volume_grounding, view_masks
from citrus_v.app.volume_legend import NOT_PRESENT, volume_legend_html
from citrus_v.app.volume_request import volume_bytes, volume_data_url
from citrus_v.infer.overlay import PALETTE
from citrus_v.media import mask_to_rle, read_nifti, read_volume, read_volume_bytes

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402  (the fake server's route signatures resolve these names)
from nibabel.testing import data_path as NIBABEL_DATA  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

ANATOMICAL = Path(NIBABEL_DATA) / "anatomical.nii"  # 33 x 41 x 25 voxels of 2 mm, LAS: 25 axial slices of 41 x 33
LESION_FRAMES = range(10, 15)
LESION_ML = 1.234
ANSWER = "Sure, the lesion [SEG]; the left kidney [SEG] is not in this volume."


# --- what the fake server answers --------------------------------------------------------------------------------
def lesion_mask(frame: int, shape: tuple[int, int]) -> np.ndarray:
    """The lesion on ``frame``: a block that grows one row per frame (so that frames differ)."""
    mask = np.zeros(shape, dtype=bool)
    mask[5 : 5 + frame, 6:20] = True
    return mask


def volume_grounding(num_frames: int, shape: tuple[int, int], frames=LESION_FRAMES) -> dict[str, Any]:
    """``citrus-v deploy``'s grounding for a volume: a present lesion on ``frames``, an absent left kidney."""
    height, width = shape
    return {
        "video_index": 0,
        "video_size": {"frames": num_frames, "height": height, "width": width},
        "boxes": [],
        "masks": [],
        "volume_masks": [
            {
                "index": 0, "label": "lesion", "present": True, "score": 3.5, "mode": "per_frame", "key_frame": 12,
                "frames": [{"frame": k, "area": int(lesion_mask(k, shape).sum()),
                            "rle": mask_to_rle(lesion_mask(k, shape))} for k in frames],
                "voxels": int(sum(lesion_mask(k, shape).sum() for k in frames)), "volume_ml": LESION_ML,
                "spacing": [2.0, 2.0, 2.0],
                "bbox3d": {"frames": [frames[0], frames[-1] + 1], "rows": [5, 5 + frames[-1]], "columns": [6, 20],
                           "size_mm": [10.0, 28.0, 28.0]},
            },
            {
                "index": 1, "label": "left kidney", "present": False, "score": -2.0, "mode": "per_frame",
                "key_frame": 0, "frames": [], "voxels": 0, "volume_ml": 0.0, "spacing": [2.0, 2.0, 2.0], "bbox3d": None,
            },
        ],
        "notes": [],
    }  # fmt: skip


def fake_volume_server(requests: list[dict]):
    """An OpenAI-compatible app that reads the one video part of each question and answers :func:`volume_grounding`."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "volume-fake", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        requests.append(body)
        (video,) = [p for p in body["messages"][-1]["content"] if p["type"] == "video_url"]
        data = base64.b64decode(video["video_url"]["url"].split(",", 1)[1])
        volume = read_volume_bytes(data, "sent volume")
        grounding = volume_grounding(volume.num_frames, volume.frame_shape)
        message = {"role": "assistant", "content": ANSWER, "grounding": grounding}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "volume-fake", "choices": [choice]}

    return app


# --- decoding the answer -------------------------------------------------------------------------------------------
def test_per_frame_masks_decode_into_every_slice_and_an_absent_target_has_none():
    volume = read_volume(str(ANATOMICAL))
    answer = decode_volume_grounding(volume_grounding(25, (41, 33)), volume.num_frames, volume.frame_shape)
    lesion, kidney = answer.targets
    assert (lesion.label, lesion.present, lesion.volume_ml) == ("lesion", True, LESION_ML)
    assert lesion.frame_numbers == [10, 11, 12, 13, 14]
    assert (kidney.label, kidney.present, kidney.frames) == ("left kidney", False, {})
    stack = answer.stack(0)
    assert stack.shape == (25, 41, 33)
    assert int(stack.sum()) == sum(int(lesion_mask(k, (41, 33)).sum()) for k in LESION_FRAMES)
    for frame in (9, 10, 12, 14, 15):
        on_frame, on_kidney = answer.frame_masks(frame)
        expected = lesion_mask(frame, (41, 33)) if frame in LESION_FRAMES else np.zeros((41, 33), bool)
        assert np.array_equal(on_frame.mask, expected) and not on_kidney.mask.any()
        assert (on_frame.index, on_kidney.index) == (0, 1)  # positions kept: colours stay with their target


def test_masks_on_the_other_nifti_axes_are_the_3d_mask_cut_as_the_picture_is():
    """Mask the voxels above a value on the axial frames the server reads; on a coronal or sagittal picture the
    page's mask must be those same voxels of that picture, as nibabel's data put them there."""
    volume = read_volume(str(ANATOMICAL))  # axial frames, as the server reads the file
    threshold = float(np.percentile(volume.values, 80))
    frames = [{"frame": k, "rle": mask_to_rle(volume.values[k] > threshold)} for k in range(volume.num_frames)]
    grounding = {"volume_masks": [{"index": 0, "label": "bright", "present": True, "frames": frames}]}
    answer = decode_volume_grounding(grounding, volume.num_frames, volume.frame_shape)
    scan = open_scan(ANATOMICAL)
    nifti = read_nifti(ANATOMICAL)
    for axis, index in ((1, 20), (0, 9), (2, 7)):
        (mask,) = view_masks(answer, scan, View(index=index, axis=axis, whole=True))
        picture = scan.render(View(index=index, axis=axis))
        assert mask.mask.shape == (picture.height, picture.width)
        assert np.array_equal(mask.mask, nifti.slice(index, axis) > threshold), f"axis {axis} slice {index}"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: g["volume_masks"][0]["frames"][0].update(frame=25), "names frame 25, but the volume sent has 25"),
        (lambda g: g["volume_masks"][0]["frames"][0].update(rle=mask_to_rle(np.ones((33, 41), bool))), "33x41"),
        (lambda g: g["volume_masks"][1].update(frames=g["volume_masks"][0]["frames"][:1]), "'present': false but"),
        (lambda g: g["video_size"].update(frames=26), "the server read 26 frames"),
        (lambda g: g["video_size"].update(width=32), "frames of 32x41 pixels"),
        (lambda g: g["volume_masks"][0]["frames"].append(g["volume_masks"][0]["frames"][0]), "frame 10 twice"),
        (lambda g: g["volume_masks"][0]["frames"][0].pop("rle"), "not {'frame': k, 'rle': COCO RLE}"),
    ],
)
def test_an_answer_that_does_not_fit_the_volume_is_refused_naming_the_mask(change, message):
    grounding = volume_grounding(25, (41, 33))
    change(grounding)
    with pytest.raises(ValueError, match="the server") as refused:
        decode_volume_grounding(grounding, 25, (41, 33))
    assert message in str(refused.value)


def test_a_server_that_answers_with_2d_masks_is_named():
    grounding = {"masks": [{"index": 0, "segmentation": mask_to_rle(np.ones((41, 33), bool))}]}
    with pytest.raises(ValueError, match="mask\\(s\\) of one picture.*untick 'Ask about the whole volume'"):
        decode_volume_grounding(grounding, 25, (41, 33))
    assert decode_volume_grounding({"masks": [], "volume_masks": []}, 25, (41, 33)).targets == []


# --- legend and chips ----------------------------------------------------------------------------------------------
def test_legend_gives_the_volume_in_ml_and_an_absent_target_a_line_without_colour():
    from citrus_v.app.measurements import measure_masks

    answer = decode_volume_grounding(volume_grounding(25, (41, 33)), 25, (41, 33))
    legend = volume_legend_html(answer, measure_masks(answer.frame_masks(12), None), None, "axial slices")
    present_row, absent_row = legend.split('<tr class="legend-mask')[1:]
    assert "1.23 mL" in present_row and "axial slices 11–15 (5)" in present_row and "legend-swatch" in present_row
    assert "rgb(230, 25, 75)" in present_row and "13" in present_row  # key frame 12 is slider position 13
    assert NOT_PRESENT in absent_row and "legend-swatch" not in absent_row and "rgb(" not in absent_row
    chips = answer_html(ANSWER, answer.targets, absent={1})
    assert 'data-mask="1"' in chips and "rgb(230, 25, 75)" in chips
    assert "2 not present" in chips and "rgb(128, 128, 128)" in chips and "[SEG]" not in chips


# --- what is sent ------------------------------------------------------------------------------------------------
def test_the_file_is_sent_as_its_bytes_and_a_4d_file_as_the_time_point_shown():
    data, media_type = volume_bytes(open_scan(ANATOMICAL))
    assert data == ANATOMICAL.read_bytes() and media_type == "application/octet-stream"
    four_d = Path(NIBABEL_DATA) / "example4d.nii.gz"
    url = volume_data_url(open_scan(four_d), t=1)
    assert url.startswith("data:application/gzip;base64,")
    sent = read_volume_bytes(base64.b64decode(url.split(",", 1)[1]), "sent")
    shown = read_volume({"path": str(four_d), "t": 1})
    assert np.array_equal(sent.values, shown.values) and np.allclose(sent.affine, shown.affine)
    assert not np.array_equal(sent.values, read_volume({"path": str(four_d), "t": 0}).values)


def ct_series_zip(path: Path, count: int = 4) -> Path:
    """``count`` copies of ``CT_small.dcm`` 5 mm apart along the normal, one series, zipped in reverse order."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    cosines = np.array([float(v) for v in template.ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    series = pydicom.uid.generate_uid()
    with zipfile.ZipFile(path, "w") as archive:
        for k in reversed(range(count)):
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * 5.0 * normal]
            buffer = io.BytesIO()
            ds.save_as(buffer)
            archive.writestr(f"slice_{k}.dcm", buffer.getvalue())
    return path


def test_a_zip_of_dicom_slices_is_a_volume_and_its_masks_download_as_nifti_and_dicom_seg(tmp_path):
    hd = pytest.importorskip("highdicom")
    from citrus_v.app.downloads import write_volume_downloads
    from citrus_v.app.planes_picture import answer_picture

    scan = open_scan(ct_series_zip(tmp_path / "series.zip"))
    assert (scan.kind, scan.frames, scan.modality, scan.ct) == ("series", (4, 4, 4), "CT", True)
    assert scan.volume_capable
    volume = scan.volume()
    assert np.array_equal(np.asarray(scan.render(View(index=2, whole=True))), np.asarray(volume.frame_image(2)))
    assert volume_bytes(scan) == ((tmp_path / "series.zip").read_bytes(), "application/zip")
    grounding = volume_grounding(4, volume.frame_shape, frames=range(1, 3))
    answer = decode_volume_grounding(grounding, volume.num_frames, volume.frame_shape)
    picture = answer_picture(volume, answer)
    written = write_volume_downloads(scan, volume, answer, picture, tmp_path / "out")
    assert written.problems == []
    nifti_paths = sorted(p for p in written.files if p.name.endswith(".nii.gz"))
    assert [p.name for p in nifti_paths] == ["series_mask_1.nii.gz", "series_mask_2.nii.gz"]
    lesion = np.asarray(nib.load(nifti_paths[0]).dataobj)
    assert lesion.shape == (128, 128, 4) and int(lesion.sum()) == int(answer.stack(0).sum())
    assert not np.asarray(nib.load(nifti_paths[1]).dataobj).any()  # the absent kidney: no voxel
    (seg_path,) = [p for p in written.files if p.name.endswith(".seg.dcm")]
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_segments == 1 and [d.SegmentLabel for d in seg.SegmentSequence] == ["lesion"]
    referenced = {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    slice_uids = [ref.sop_instance_uid for ref in volume.references]
    assert int(seg.NumberOfFrames) == 2 and {slice_uids[1], slice_uids[2]} <= referenced
    assert any(p.name == "series_planes.png" for p in written.files)


def test_multiframe_dicom_and_video_are_offered_whole_and_pictures_are_not(tmp_path):
    from citrus_v.media import read_dicom

    assert open_scan(get_testdata_file("emri_small.dcm")).volume_capable
    assert not open_scan(get_testdata_file("CT_small.dcm")).volume_capable
    # an enhanced CT whose frames lie along the normal in the other order than the file's: asked whole, slider
    # frame k is the server's frame k (file frame 2 first), drawn as picture mode draws that file frame
    path = get_testdata_file("eCT_Supplemental.dcm")
    enhanced = open_scan(path)
    assert enhanced.volume_capable and volume_bytes(enhanced)[1] == "application/dicom"
    sent = read_volume_bytes(Path(path).read_bytes(), "sent")
    assert np.array_equal(read_dicom(path, 1).values, sent.values[0])
    assert enhanced.file_frame(View(index=0, whole=True)) == 1 and enhanced.file_frame(View(index=0)) == 0
    whole_first = np.asarray(enhanced.render(View(index=0, whole=True)))
    assert np.array_equal(whole_first, np.asarray(enhanced.render(View(index=1))))
    assert not np.array_equal(whole_first, np.asarray(enhanced.render(View(index=0))))
    av = pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(6):
            image = np.zeros((48, 64, 3), np.uint8)
            image[10:30, 8 * k : 8 * k + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = open_scan(clip)
    assert (video.kind, video.frames[2], video.volume_capable) == ("video", 6, True)
    assert video.render(View(index=3)).size == (64, 48) and volume_bytes(video)[1] == "video/mp4"
    assert load_volume(clip).kind == "clip"


# --- the page's handlers: the answer stays through the slices of its volume -------------------------------------------
def test_a_volume_answer_stays_while_the_slices_change_and_goes_with_the_mode_or_time_point(tmp_path):
    pytest.importorskip("gradio")
    from citrus_v.app.client import ApiClient, ApiSettings
    from citrus_v.app.downloads import DownloadFolder
    from citrus_v.app.handlers import PageHandlers

    from .test_serve_support import running_server

    requests: list[dict] = []
    with running_server(fake_volume_server(requests)) as url:
        handler = PageHandlers(ApiClient(ApiSettings(f"{url}/v1")), DownloadFolder(tmp_path))
        whole, *_ = handler.upload_page(str(ANATOMICAL))
        assert whole["visible"] and whole["value"] is True
        assert handler.ask(str(ANATOMICAL), 13, "axial", 1, "file", "Segment the lesion.", True)[1] == {
            "__type__": "update"
        }  # picture mode's handler leaves a whole-volume question alone
        viewer, answer, legend, files, _, grounding, planes, kept = handler.ask_volume(
            str(ANATOMICAL), 13, "axial", 1, "file", "Please segment the lesion.", True
        )
    (request,) = requests
    (part, text) = request["messages"][0]["content"]
    assert part["type"] == "video_url" and text == {"type": "text", "text": "Please segment the lesion."}
    assert base64.b64decode(part["video_url"]["url"].split(",", 1)[1]) == ANATOMICAL.read_bytes()
    assert "the whole volume (25 axial slices)" in answer and "1.23 mL" in legend and NOT_PRESENT in legend
    assert planes["visible"] and planes["value"].width > 200 and grounding["volume_masks"][0]["label"] == "lesion"
    assert sorted(Path(f).name for f in files) == ["anatomical_mask_1.nii.gz", "anatomical_mask_2.nii.gz",
                                                   "anatomical_planes.png"]  # fmt: skip
    saved = nib.load(next(f for f in files if f.endswith("_1.nii.gz")))
    assert saved.shape == (33, 41, 25) and np.allclose(saved.affine, nib.load(ANATOMICAL).affine)
    # another slice, another axis, another window: the answer stays, the picture shows that slice's mask
    on_11 = handler.view(str(ANATOMICAL), 11, "axial", 1, "file", True, kept)
    assert on_11[1] == {"__type__": "update"} and "1.23 mL" in on_11[2] and on_11[-1] == {"__type__": "update"}
    assert handler.axis(str(ANATOMICAL), "coronal", 1, "file", True, kept)[2] == {"__type__": "update"}
    # the other mode, another time point or another file: the answer goes
    assert tuple(handler.view(str(ANATOMICAL), 11, "axial", 1, "file", False, kept)[1:]) == CLEARED_RESULTS
    assert tuple(handler.view(str(ANATOMICAL), 11, "axial", 2, "file", True, kept)[1:]) == CLEARED_RESULTS
    other = Path(NIBABEL_DATA) / "reoriented_anat_moved.nii"
    assert tuple(handler.view(str(other), 11, "axial", 1, "file", True, kept)[1:]) == CLEARED_RESULTS


# --- against citrus-v deploy's own server ----------------------------------------------------------------------------
def test_the_real_server_answers_a_volume_and_the_page_draws_it(tiny_dir, tmp_path):
    """``citrus-v deploy``'s server (the tiny model, its answer forced to two [SEG]) reads the NIfTI the page sends;
    with SAM 2's object score forced positive both targets come back on frames the page draws and measures, and
    forced negative both are "not present" without colour."""
    pytest.importorskip("gradio")
    from citrus_v.app.client import ApiClient, ApiSettings
    from citrus_v.app.downloads import DownloadFolder
    from citrus_v.app.handlers import PageHandlers
    from citrus_v.app.volume_legend import ml_text
    from citrus_v.modeling import CitrusV
    from citrus_v.processing import CitrusVProcessor
    from citrus_v.serve.server import ServerSettings, create_app

    from .forcing import ObjectScores
    from .test_serve_support import ScriptedPredictor, running_server

    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    processor.set_video_sampling(fps_max_frames=8, video_min_pixels=4 * 784, video_max_pixels=64 * 784)
    predictor = ScriptedPredictor(CitrusV.from_pretrained(tiny_dir).eval(), processor)
    path, query = str(ANATOMICAL), "Please segment the lesion."
    with running_server(create_app(predictor, ServerSettings(served_model_name="tiny", max_wait_ms=1))) as url:
        handler = PageHandlers(ApiClient(ApiSettings(f"{url}/v1")), DownloadFolder(tmp_path))
        with ObjectScores(predictor.model, 5.0):
            found = handler.ask_volume(path, 13, "axial", 1, "file", query, True)
        with ObjectScores(predictor.model, -5.0):
            absent = handler.ask_volume(path, 13, "axial", 1, "file", query, True)
    viewer, answer, legend, files, _, grounding, planes, kept = found
    assert [t.label for t in kept.answer.targets] == ["lesion", "organ"] and all(t.present for t in kept.answer.targets)
    for target, sent in zip(kept.answer.targets, grounding["volume_masks"], strict=True):
        assert target.frame_numbers == [item["frame"] for item in sent["frames"]] and target.frame_numbers
        assert ml_text(sent["volume_ml"], clip=False) in legend
    frame = kept.answer.targets[0].frame_numbers[0]
    on_frame = handler.view(path, frame + 1, "axial", 1, "file", True, kept)[0]["value"]
    assert not np.array_equal(np.asarray(on_frame[0]), np.asarray(on_frame[1]))  # the mask drawn on that slice
    lesion_file = next(f for f in files if f.endswith("_mask_1.nii.gz"))
    assert int(np.asarray(nib.load(lesion_file).dataobj).sum()) == grounding["volume_masks"][0]["voxels"]
    assert planes["visible"] and "chip" in answer
    _, answer, legend, files, _, grounding, planes, kept = absent
    assert [t.present for t in kept.answer.targets] == [False, False] and legend.count(NOT_PRESENT) == 2
    assert "legend-swatch" not in legend and not planes["visible"]
    assert ">1 not present<" in answer and ">2 not present<" in answer
    assert all(not np.asarray(nib.load(f).dataobj).any() for f in files if f.endswith(".nii.gz"))


# --- the page in Chromium ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def volume_app(tmp_path_factory):
    pytest.importorskip("gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    from citrus_v.app.page import ApiSettings, build_page, launch

    from .test_serve_support import free_port, running_server

    requests: list[dict] = []
    with running_server(fake_volume_server(requests)) as server_url:
        page = build_page(ApiSettings(f"{server_url}/v1"))
        port = free_port()
        launch(page, "127.0.0.1", port, block=False)
        try:
            yield f"http://127.0.0.1:{port}/", requests
        finally:
            page.close()


def _expected_overlay(frame: int) -> np.ndarray:
    """The picture the page should show on the right for axial slice ``frame``: the slice with the lesion mask the
    server sent for that frame (none off the lesion), drawn as the viewer draws masks."""
    from citrus_v.app.display import display_factors, display_overlay
    from citrus_v.infer.results import MaskResult

    scan = open_scan(ANATOMICAL)
    picture = scan.render(View(index=frame, axis=2))
    shape = (picture.height, picture.width)
    lesion = lesion_mask(frame, shape) if frame in LESION_FRAMES else np.zeros(shape, bool)
    masks = [MaskResult(lesion, 3.5, "lesion", 0), MaskResult(np.zeros(shape, bool), 0.0, "left kidney", 1)]
    factors = display_factors(*picture.size, scan.pixel_spacing(2))
    return np.asarray(display_overlay(picture, masks, [], factors))


def _go_to_slice(page, number: int) -> None:
    from .test_app import _viewer_sources, _wait_viewer_change

    before = _viewer_sources(page)
    page.fill("#frame input[type=number]", str(number))
    page.press("#frame input[type=number]", "Enter")
    _wait_viewer_change(page, before)
    page.wait_for_timeout(300)  # the new picture is painted


def test_the_page_asks_about_the_whole_volume_and_its_masks_follow_the_slider(volume_app):
    from .test_app import (
        BROWSER_ARGS,
        CHROMIUM,
        WAIT_MS,
        _browser_or_skip,
        _has_colour,
        _screenshot,
        _upload,
        _viewer_images,
        _viewer_sources,
        _wait_viewer_change,
    )

    sync_api = _browser_or_skip()
    url, requests = volume_app
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#notice", timeout=WAIT_MS)
            _upload(page, ANATOMICAL)
            page.wait_for_selector("#whole", state="visible", timeout=WAIT_MS)
            assert page.is_checked("#whole input[type=checkbox]"), "a volume is asked about whole by default"
            page.wait_for_function(
                "document.querySelector('#frame input[type=number]').value === '13'", timeout=WAIT_MS
            )
            page.wait_for_function("document.querySelectorAll('#viewer img').length === 2", timeout=WAIT_MS)

            # ask: one video_url part with the file; the masks of the slice shown, the mL, the absent target
            before = _viewer_sources(page)
            page.click("#ask")
            page.wait_for_selector("#legend .legend-volume, .toast-body", timeout=WAIT_MS)
            toasts = page.locator(".toast-body")
            assert toasts.count() == 0, f"the page showed an error: {toasts.first.inner_text()}"
            _wait_viewer_change(page, before)
            (request,) = requests
            (part, _text) = request["messages"][0]["content"]
            assert base64.b64decode(part["video_url"]["url"].split(",", 1)[1]) == ANATOMICAL.read_bytes()
            legend = page.inner_text("#legend")
            assert "1.23 mL" in legend and NOT_PRESENT in legend
            assert "the whole volume (25 axial slices)" in page.inner_text("#answer")
            chips = page.eval_on_selector_all("#answer .seg-chip", "els => els.map(e => e.innerText)")
            assert chips == ["1", "2 not present"]
            page.wait_for_selector("#planes img", timeout=WAIT_MS)
            _, overlay = _viewer_images(page)
            assert np.array_equal(overlay, _expected_overlay(12))
            shot_13 = _screenshot(page.locator("#viewer"))
            assert _has_colour(shot_13, PALETTE[0]), "the lesion's colour is not on the slice shown"
            assert not _has_colour(shot_13, PALETTE[1], tolerance=20), "the absent target has a colour"

            # another slice with the lesion: its own mask, and the answer stays
            _go_to_slice(page, 11)
            _, overlay = _viewer_images(page)
            assert np.array_equal(overlay, _expected_overlay(10)) and not np.array_equal(overlay, _expected_overlay(12))
            shot_11 = _screenshot(page.locator("#viewer"))
            assert _has_colour(shot_11, PALETTE[0]) and np.abs(shot_11 - shot_13).mean() > 0.5
            assert "1.23 mL" in page.inner_text("#legend") and "Sure, the lesion" in page.inner_text("#answer")

            # a slice without the lesion: no colour, the answer still there
            _go_to_slice(page, 3)
            sent, overlay = _viewer_images(page)
            assert np.array_equal(overlay, sent) and np.array_equal(overlay, _expected_overlay(2))
            assert not _has_colour(_screenshot(page.locator("#viewer")), PALETTE[0], tolerance=20)
            assert "1.23 mL" in page.inner_text("#legend") and page.locator("#answer .seg-chip").count() == 2

            # the other mode clears the answer
            page.click("#whole input[type=checkbox]")
            page.wait_for_function("document.querySelector('#answer').innerText.trim() === ''", timeout=WAIT_MS)
            assert page.inner_text("#legend").strip() == "" and not page.is_visible("#planes")
        finally:
            browser.close()
