"""The web app's parts that need no browser: chips, notes, measurements, legend, the CT window menu, scans (frames,
axes, time points, pixel spacing), the enlarged display and the mask downloads, on pydicom's and nibabel's files."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from citrus_v.app.answer_chips import answer_html, answer_notes
from citrus_v.app.client import decode_grounding
from citrus_v.app.display import display_factors, display_overlay, enlarge
from citrus_v.app.legend import SCORE_NAME, legend_html
from citrus_v.app.measurements import PixelSpacing, measure_masks, usable_spacing
from citrus_v.app.scan import AXES, View, open_scan
from citrus_v.app.window_menu import FILE_WINDOW, hounsfield_like, window_choices
from citrus_v.infer.overlay import PALETTE
from citrus_v.infer.results import MaskResult
from citrus_v.media import Box, mask_to_rle

pydicom_data = pytest.importorskip("pydicom.data")
nib = pytest.importorskip("nibabel")
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


class _Spans(HTMLParser):
    """The ``<span>`` elements of some HTML: their attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, str]] = []
        self._open: dict[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            self._open = {k: v or "" for k, v in attrs} | {"text": ""}
            self.spans.append(self._open)

    def handle_endtag(self, tag):
        if tag == "span":
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data


def spans(html_text: str, css_class: str) -> list[dict[str, str]]:
    parser = _Spans()
    parser.feed(html_text)
    return [s for s in parser.spans if css_class in s.get("class", "").split()]


def rgb(colour: tuple[int, int, int]) -> str:
    return f"background-color: rgb({colour[0]}, {colour[1]}, {colour[2]})"


def block_mask(shape, top, left, height, width) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def two_masks(shape=(32, 48)) -> list[MaskResult]:
    return [
        MaskResult(block_mask(shape, 2, 3, 10, 20), 0.91, "lesion", index=0),
        MaskResult(block_mask(shape, 15, 10, 5, 4), 0.42, "left kidney", index=1),
    ]


# --- chips and notes -------------------------------------------------------------------------------------------
def test_every_seg_becomes_a_chip_in_its_masks_palette_colour():
    text = answer_html("Sure, the lesion [SEG] and the left kidney [SEG].", two_masks())
    chips = spans(text, "seg-chip")
    assert "[SEG]" not in text
    assert [c["data-mask"] for c in chips] == ["1", "2"]
    assert [c["text"] for c in chips] == ["1", "2"]
    for chip, colour in zip(chips, PALETTE[:2], strict=True):
        assert rgb(colour) in chip["style"]
    assert "Sure, the lesion" in text and "and the left kidney" in text


def test_chips_follow_the_mask_index_and_mark_a_seg_without_mask():
    # the server returned a mask for the second [SEG] only: it is mask 1 (colour 0), the first [SEG] has none
    only_second = [MaskResult(block_mask((8, 8), 0, 0, 2, 2), 0.5, "organ", index=1)]
    chips = spans(answer_html("lesion [SEG], organ [SEG]", only_second), "seg-chip")
    assert chips[0]["data-mask"] == "0" and "seg-chip-missing" in chips[0]["class"] and chips[0]["text"] == "no mask"
    assert chips[1]["data-mask"] == "1" and rgb(PALETTE[0]) in chips[1]["style"]


def test_chips_count_the_segs_of_the_reasoning_part():
    content = "<think>first the lesion [SEG]</think><answer>and the organ [SEG]</answer>"
    masks = [
        MaskResult(block_mask((8, 8), 0, 0, 2, 2), 0.5, "lesion", 0),
        MaskResult(np.ones((8, 8), bool), 0.5, "organ", 1),
    ]
    text = answer_html(content, masks)
    assert "first the lesion" not in text and "<think>" not in text
    assert [c["data-mask"] for c in spans(text, "seg-chip")] == ["2"]


def test_the_answer_is_escaped():
    text = answer_html("<b>bold</b> [SEG]", two_masks()[:1])
    assert "<b>" not in text and "&lt;b&gt;" in text


def test_notes_say_what_does_not_add_up():
    masks = two_masks()
    assert answer_notes("the lesion [SEG] and the organ [SEG]", masks, expects_mask=True) == []
    (mismatch,) = answer_notes("two lesions [SEG]", masks, expects_mask=True)
    assert "1 target(s)" in mismatch and "2 mask(s)" in mismatch
    (none,) = answer_notes("There is no lesion.", [], expects_mask=True)
    assert none.startswith("No mask came back") and "no [SEG]" in none
    assert answer_notes("There is no lesion.", [], expects_mask=False) == []
    empty = [MaskResult(np.zeros((4, 4), bool), 0.1, "cyst", 0)]
    (line,) = answer_notes("the cyst [SEG]", empty, expects_mask=True)
    assert "Mask 1 (cyst) is empty" in line


# --- measurements and legend ---------------------------------------------------------------------------------------
def test_measurements_in_pixels_and_square_millimetres():
    masks = two_masks()
    spacing = PixelSpacing(0.5, 0.25, "DICOM PixelSpacing")
    first, second = measure_masks(masks, spacing)
    assert (first.number, first.label, first.area_px, first.bbox) == (1, "lesion", 200, (3, 2, 23, 12))
    assert first.area_mm2 == pytest.approx(200 * 0.125)
    assert (second.number, second.area_px, second.bbox) == (2, 20, (10, 15, 14, 20))
    assert measure_masks(masks, None)[0].area_mm2 is None
    assert usable_spacing(0.0, 0.0, "x") is None and usable_spacing(float("nan"), 1, "x") is None


def test_legend_names_the_score_and_uses_the_overlay_colours():
    masks = two_masks()
    spacing = PixelSpacing(0.5, 0.25, "DICOM PixelSpacing")
    text = legend_html(measure_masks(masks, spacing), [Box(1, 2, 11, 22, "lesion")], spacing)
    swatches = spans(text, "legend-swatch")
    assert [s["data-swatch"] for s in swatches] == ["1", "2", "B1"]
    assert rgb(PALETTE[0]) in swatches[0]["style"] and rgb(PALETTE[1]) in swatches[1]["style"]
    assert "rgb(0, 130, 200)" in swatches[2]["style"]  # the box: the colour after the masks', as the overlay
    assert SCORE_NAME in text and "0.91" in text and "(25.0 mm²)" in text and "DICOM PixelSpacing" in text
    assert ">IoU" not in text and "(IoU" not in text
    unknown = legend_html(measure_masks(masks, None), [], None)
    assert "mm²" not in unknown.split("legend-note")[0] and "Pixel spacing unknown" in unknown
    assert legend_html([], [], None) == ""


# --- CT window menu ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "modality", "ct"),
    [("CT_small.dcm", "CT", True), ("emri_small.dcm", "MR", False), ("RG1_UNCR.dcm", "CR", False)],
)
def test_window_presets_only_for_ct_dicom(name, modality, ct):
    scan = open_scan(pydicom_data.get_testdata_file(name))
    assert (scan.kind, scan.modality, scan.ct) == ("dicom", modality, ct)
    assert bool(window_choices(scan.ct)) is ct
    if ct:
        assert window_choices(True)[0] == FILE_WINDOW and "ct-lung" in window_choices(True)


def test_window_presets_for_a_hounsfield_volume_only(tmp_path):
    png = tmp_path / "photo.png"
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(png)
    assert not open_scan(png).ct
    assert not open_scan(NIBABEL_DATA / "anatomical.nii").ct  # an MR volume, one voxel at -610
    assert not open_scan(NIBABEL_DATA / "example4d.nii.gz").ct
    ct = np.full((20, 20, 6), -1000.0, np.float32)
    ct[5:15, 5:15] = 40.0
    ct[8:12, 8:12] = 900.0
    nib.save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "ct.nii.gz")
    assert open_scan(tmp_path / "ct.nii.gz").ct
    assert not hounsfield_like(np.linspace(0, 1000, 500))  # MR-like: positive values only


# --- scans: frames, axes, time points, spacing -----------------------------------------------------------------------
def test_multi_frame_dicom_frames_render_differently():
    scan = open_scan(pydicom_data.get_testdata_file("emri_small.dcm"))
    assert scan.frame_count() == 10 and scan.default_view().index == 5
    first, fourth = (np.asarray(scan.render(View(index=k))) for k in (0, 3))
    assert first.shape == (64, 64, 3) and not np.array_equal(first, fourth)
    assert scan.describe(View(index=3)) == "emri_small.dcm, frame 4 of 10"
    assert scan.pixel_spacing() is None  # pydicom's copy has no functional groups: no spacing known


def test_dicom_pixel_spacing_and_its_unusable_values():
    ct = open_scan(pydicom_data.get_testdata_file("CT_small.dcm"))
    assert ct.pixel_spacing() == PixelSpacing(0.661468, 0.661468, "DICOM PixelSpacing")
    assert open_scan(pydicom_data.get_testdata_file("RG1_UNCR.dcm")).pixel_spacing() is None  # PixelSpacing 0\0


def test_nifti_axes_time_points_and_spacing_per_axis():
    scan = open_scan(NIBABEL_DATA / "example4d.nii.gz")  # 128 x 96 x 24 x 2, LAS, 2 x 2 x 2.2 mm
    assert scan.time_points == 2 and scan.frames == (128, 96, 24)
    axial = scan.pixel_spacing(AXES["axial"])
    assert (axial.row_mm, axial.col_mm) == pytest.approx((2.0, 2.0)) and axial.source == "NIfTI pixdim"
    coronal = scan.pixel_spacing(AXES["coronal"])
    assert (coronal.row_mm, coronal.col_mm) == pytest.approx((2.2, 2.0))
    assert np.asarray(scan.render(View(index=10, axis=0))).shape == (24, 96, 3)
    later = np.asarray(scan.render(View(index=12, axis=2, t=1)))
    assert not np.array_equal(np.asarray(scan.render(View(index=12, axis=2, t=0))), later)
    assert scan.describe(View(index=12, axis=2, t=1)) == "example4d.nii.gz, axial slice 13 of 24, time point 2 of 2"
    unknown = open_scan(NIBABEL_DATA / "standard.nii.gz").pixel_spacing()  # no unit in the header
    assert unknown is not None and "mm assumed" in unknown.source


# --- display and grounding --------------------------------------------------------------------------------------------
def test_small_pictures_are_enlarged_with_sharp_pixels():
    assert display_factors(128, 128) == (6, 6) and display_factors(64, 32) == (12, 12)
    assert display_factors(2000, 1000) == (1, 1)
    picture = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).convert("RGB")
    big = np.asarray(enlarge(picture, (3, 3)))
    assert big.shape == (12, 12, 3) and np.array_equal(big[::3, ::3], np.asarray(picture))
    assert np.array_equal(big[1::3, 2::3], np.asarray(picture))  # every pixel a 3 x 3 block: no smoothing


def test_thick_slices_are_shown_in_the_patients_proportions():
    # a coronal slice of a volume with 0.7 mm pixels and 5 mm slices: each row 5/0.7 times as tall as wide
    assert display_factors(512, 40, PixelSpacing(5.0, 0.7, "x")) == (1, 7)
    assert display_factors(64, 64, PixelSpacing(2.2, 2.0, "x")) == (10, 11)
    assert display_factors(64, 64, PixelSpacing(1.0, 3.0, "x")) == (12, 4)  # wide pixels: rows get the smaller one
    tall = enlarge(Image.new("RGB", (10, 4)), (2, 5))
    assert tall.size == (20, 20)


def test_display_overlay_draws_each_mask_in_its_colour_at_display_size():
    masks = two_masks((32, 48))
    picture = Image.new("RGB", (48, 32), (0, 0, 0))
    shown = np.asarray(display_overlay(picture, masks, [Box(30, 20, 40, 30, "lesion")], (4, 4))).astype(int)
    assert shown.shape == (128, 192, 3)
    for colour in (*PALETTE[:2], PALETTE[2]):  # mask outlines, then the box
        assert (np.abs(shown - np.array(colour)).sum(axis=-1) < 10).any(), f"no {colour} drawn"


def test_grounding_is_decoded_in_seg_order_and_checked_against_the_picture():
    masks = two_masks((32, 48))
    grounding = {
        "masks": [
            {"index": 1, "label": "organ", "score": 0.4, "segmentation": mask_to_rle(masks[1].mask)},
            {"index": 0, "label": "lesion", "score": 0.9, "segmentation": mask_to_rle(masks[0].mask)},
        ],
        "boxes": [{"bbox_2d": [1, 2, 3, 4], "label": None}],
    }
    decoded, boxes = decode_grounding(grounding, (48, 32))
    assert [m.index for m in decoded] == [0, 1] and np.array_equal(decoded[0].mask, masks[0].mask)
    assert boxes[0].xyxy == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="mask 0 is 48x32 pixels but the picture sent is 64x64"):
        decode_grounding(grounding, (64, 64))
    with pytest.raises(ValueError, match="not valid COCO RLE"):
        decode_grounding({"masks": [{"index": 0, "segmentation": {"size": [2, 2]}}]}, (2, 2))


# --- downloads --------------------------------------------------------------------------------------------------------
def test_downloads_of_a_dicom_frame_are_png_and_a_readable_segmentation(tmp_path):
    hd = pytest.importorskip("highdicom")
    from citrus_v.app.downloads import DownloadFolder, write_downloads

    scan = open_scan(pydicom_data.get_testdata_file("emri_small.dcm"))
    masks = two_masks((64, 64))
    folder = DownloadFolder(tmp_path)
    written = write_downloads(scan, View(index=3), masks, folder.new_answer_folder())
    assert written.problems == []
    pngs = [p for p in written.files if p.suffix == ".png"]
    (seg_path,) = [p for p in written.files if p.suffix == ".dcm"]
    assert len(pngs) == 2 and np.array_equal(np.asarray(Image.open(pngs[0])) > 0, masks[0].mask)
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_segments == 2
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["lesion", "left kidney"]
    root = folder.root
    del folder
    assert not root.exists()  # the page's folder goes with the page


def test_downloads_of_a_nifti_slice_are_on_the_volume_grid(tmp_path):
    from citrus_v.app.downloads import DownloadFolder, write_downloads

    source = NIBABEL_DATA / "anatomical.nii"
    scan = open_scan(source)
    view = View(index=12, axis=2)
    picture = scan.render(view)
    mask = MaskResult(block_mask((picture.height, picture.width), 5, 6, 7, 8), 0.8, "lesion", 0)
    written = write_downloads(scan, view, [mask], DownloadFolder(tmp_path).new_answer_folder())
    (volume_path,) = [p for p in written.files if p.name.endswith(".nii.gz")]
    volume = nib.load(volume_path)
    assert volume.shape == nib.load(source).shape and int(np.asarray(volume.dataobj).sum()) == 56
    assert os.path.getsize(volume_path) > 0


# --- the page's controls for each kind of file ---------------------------------------------------------------------
@pytest.fixture
def handlers(tmp_path):
    pytest.importorskip("gradio")
    from citrus_v.app.client import ApiClient, ApiSettings
    from citrus_v.app.downloads import DownloadFolder
    from citrus_v.app.handlers import CLEARED_RESULTS, PageHandlers

    handler = PageHandlers(ApiClient(ApiSettings("http://127.0.0.1:9/v1", model="m")), DownloadFolder(tmp_path))
    return handler, CLEARED_RESULTS


def _controls(handler, path) -> dict:
    frame, axis, time, window, viewer, *results = handler.upload(str(path))
    return {"frame": frame, "axis": axis, "time": time, "window": window, "viewer": viewer, "results": results}


def test_upload_controls_follow_the_file(handlers, tmp_path):
    handler, cleared = handlers
    volume = _controls(handler, NIBABEL_DATA / "example4d.nii.gz")
    assert volume["results"] == list(cleared)
    assert volume["frame"]["visible"] and volume["frame"]["maximum"] == 24 and volume["frame"]["value"] == 13
    assert volume["frame"]["label"] == "Slice" and volume["axis"]["visible"] and volume["time"]["visible"]
    assert volume["time"]["maximum"] == 2 and not volume["window"]["visible"]
    left, right = volume["viewer"]["value"]
    assert left.size == (128 * 6, 96 * 6) and left is right  # enlarged, the same picture on both sides
    dicom = _controls(handler, pydicom_data.get_testdata_file("emri_small.dcm"))
    assert dicom["frame"]["visible"] and dicom["frame"]["maximum"] == 10 and dicom["frame"]["label"] == "Frame"
    assert not dicom["axis"]["visible"] and not dicom["time"]["visible"] and not dicom["window"]["visible"]
    ct = _controls(handler, pydicom_data.get_testdata_file("CT_small.dcm"))
    assert ct["window"]["visible"] and "ct-abdomen" in ct["window"]["choices"] and not ct["frame"]["visible"]


def test_a_new_axis_gives_its_middle_slice_and_clears_the_results(handlers):
    handler, cleared = handlers
    frame, viewer, *results = handler.axis(str(NIBABEL_DATA / "example4d.nii.gz"), "sagittal", 2, FILE_WINDOW)
    assert results == list(cleared) and frame["maximum"] == 128 and frame["value"] == 65
    assert viewer["value"][0].size == (96 * 8, 24 * 9)  # 2 mm columns, 2.2 mm rows: 8 and 9 times
    viewer, *results = handler.view(str(NIBABEL_DATA / "example4d.nii.gz"), 3, "coronal", 2, FILE_WINDOW)
    assert results == list(cleared) and viewer["value"][0].size == (128 * 6, 24 * 7)


def test_an_unreadable_upload_still_clears_the_results(handlers, tmp_path):
    handler, cleared = handlers
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    with pytest.warns(UserWarning, match="cannot read broken.dcm"):
        frame, axis, time, window, viewer, *results = handler.upload(str(broken))
    assert viewer["value"] is None and not frame["visible"] and not window["visible"]
    assert "cannot read broken.dcm" in results[0] and results[1:] == list(cleared)[1:]


def test_app_help_never_shows_the_api_key(monkeypatch, capsys):
    """Whatever prints the defaults in --help (the command line shows them all) never prints the key."""
    import argparse
    import functools

    from citrus_v.app.commands import add_parser

    monkeypatch.setenv("CITRUS_V_API_KEY", "s3cret-key")
    formatter = argparse.ArgumentDefaultsHelpFormatter
    showing_defaults = functools.partial(argparse.ArgumentParser, formatter_class=formatter)
    parser = argparse.ArgumentParser(prog="citrus-v")
    add_parser(parser.add_subparsers(parser_class=showing_defaults))
    with pytest.raises(SystemExit):
        parser.parse_args(["app", "--help"])
    text = capsys.readouterr().out
    assert "--api_key" in text and "s3cret-key" not in text
