"""Parity with upstream Citrus-V: what SAM 2 sees, how masks come back, and how ms-swift rows render.

- A checkpoint in the released layout gets parity mode: SAM 2's input is made from the smart-resized image
  (``sam_input="smart_resized"``) and masks are thresholded at low resolution, then resized with nearest
  neighbour (``mask_postprocess="threshold_low_res"``).
- Rows with ``objects`` and ``<ref-object>``/``<bbox>`` render exactly as the fixed renderings in
  ``tests/data/msswift_renderings.json`` (ms-swift 4.6.0's own output for its ``qwen2_5_vl`` template, and
  upstream Citrus-V's ``citrus_v`` template without its defects).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from citrus_v import CitrusV, CitrusVProcessor
from citrus_v.checkpoint_layout.sam2_variants import VARIANTS
from citrus_v.data.rows import RowProblem, check_schema, render_objects
from citrus_v.infer import CitrusVPredictor
from citrus_v.processing.boxes import BoxScaler
from citrus_v.processing.images import load_image

from .test_upstream import TEST_VARIANT, write_upstream_folder

RENDERINGS = json.loads((Path(__file__).parent / "data" / "msswift_renderings.json").read_text())
STYLES = ("citrus_v", "qwen2_5_vl", "qwen2_5_vl_new")
ULTRASOUND = "US1_UNCR.dcm"  # pydicom's 640x480 RGB ultrasound


@pytest.fixture(scope="module")
def upstream_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(VARIANTS, TEST_VARIANT.name, TEST_VARIANT)
        root = tmp_path_factory.mktemp("parity") / "Citrus-V-tiny"
        write_upstream_folder(root)
        yield root


@pytest.fixture(scope="module")
def upstream_model(upstream_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(VARIANTS, TEST_VARIANT.name, TEST_VARIANT)
        model = CitrusV.from_pretrained(upstream_dir, dtype=torch.float32).eval()
        processor = CitrusVProcessor.from_pretrained(upstream_dir)
    return model, processor


# --- parity mode ---------------------------------------------------------------------------------------------------
def test_released_layout_gets_parity_mode_and_ours_keeps_its_own(upstream_model, tiny_dir, tmp_path):
    model, processor = upstream_model
    assert model.config.mask_postprocess == "threshold_low_res"
    assert processor.sam_input == "smart_resized"
    ours = CitrusV.from_pretrained(tiny_dir)
    assert ours.config.mask_postprocess == "upsample_logits"
    assert CitrusVProcessor.from_pretrained(tiny_dir).sam_input == "original"
    # converted to our layout, a released checkpoint keeps parity mode
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert CitrusV.from_pretrained(tmp_path).config.mask_postprocess == "threshold_low_res"
    assert CitrusVProcessor.from_pretrained(tmp_path).sam_input == "smart_resized"


def _normalised(image: Image.Image, side: int) -> torch.Tensor:
    """SAM 2's input as upstream's grounding image processor makes it: LANCZOS to side x side, /255,
    ImageNet mean and std."""
    array = np.asarray(image.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(((array - mean) / std).astype(np.float32)).permute(2, 0, 1)


def test_sam_input_is_the_smart_resized_image(upstream_model):
    _, processor = upstream_model
    path = get_testdata_file(ULTRASOUND)
    original = load_image(path)
    height, width = smart_resize(original.height, original.width, 28, processor.min_pixels, processor.max_pixels)
    assert (width, height) != original.size  # the vision tower sees a smaller image than the file holds
    resized = original.resize((width, height), Image.Resampling.BICUBIC)  # qwen_vl_utils.fetch_image's resize
    sample = {"messages": [{"role": "user", "content": "<image>Segment the liver."}], "images": [path]}
    sam_input = processor(sample, return_labels=False)["sam_pixel_values"][0]
    side = processor.sam_image_size
    assert torch.allclose(sam_input, _normalised(resized, side), atol=1e-5)
    assert not torch.allclose(sam_input, _normalised(original, side), atol=1e-2)


def test_parity_masks_are_thresholded_low_res_then_resized_by_nearest(upstream_model):
    model, processor = upstream_model
    predictor = CitrusVPredictor(model, processor)
    image = load_image(get_testdata_file(ULTRASOUND))
    answer = "Sure, lesion [SEG] and liver [SEG]."
    sample = {"messages": [{"role": "user", "content": "<image>Segment the lesion and the liver."},
                           {"role": "assistant", "content": answer}], "images": [image]}
    batch = processor([sample], return_labels=False)
    with torch.no_grad():
        out = model(**batch)
    states = list(model.seg_states(batch["input_ids"], out.last_hidden_state)[0])
    request = processor([{**sample, "messages": sample["messages"][:1]}], add_generation_prompt=True,
                        padding_side="left", return_labels=False)
    masks = predictor._masks(0, states, [image], request, answer)
    low_res = (out.pred_masks[0].float().sigmoid() > 0.5).numpy()
    assert len(masks) == 2
    for k, result in enumerate(masks):
        # upstream's client: Image.fromarray(mask).resize((W, H), resample=Image.NEAREST)
        expected = np.asarray(Image.fromarray(low_res[k].astype(np.uint8)).resize(image.size, Image.NEAREST)) > 0
        assert np.array_equal(result.low_res, low_res[k])
        assert np.array_equal(result.mask, expected)


def test_the_two_mask_postprocesses_differ_as_documented(tiny):
    model, processor = tiny
    predictor = CitrusVPredictor(model, processor)
    ramp = torch.linspace(-3, 3, 8).repeat(8, 1)  # one edge across the low-res map
    logits = torch.stack([ramp + 0.4 * torch.randn(8, 8, generator=torch.Generator().manual_seed(1))])
    size = (37, 23)
    low = (logits.sigmoid() > 0.5).numpy()
    nearest = np.asarray(Image.fromarray(low[0].astype(np.uint8)).resize(size, Image.NEAREST)) > 0
    bilinear = torch.nn.functional.interpolate(logits[:, None], size=(23, 37), mode="bilinear")[:, 0]
    try:
        model.config.mask_postprocess = "threshold_low_res"
        parity, parity_low = predictor.postprocess_masks(logits, size)
        model.config.mask_postprocess = "upsample_logits"
        smooth, smooth_low = predictor.postprocess_masks(logits, size)
    finally:
        model.config.mask_postprocess = "upsample_logits"
    assert np.array_equal(parity[0], nearest) and np.array_equal(smooth[0], (bilinear.sigmoid() > 0.5).numpy()[0])
    assert np.array_equal(parity_low, low) and np.array_equal(smooth_low, low)
    assert not np.array_equal(parity[0], smooth[0])


# --- rows rendered as ms-swift renders them ------------------------------------------------------------------------
CASES = [(case["name"], style) for case in RENDERINGS["cases"] for style in STYLES]


@pytest.mark.parametrize(("name", "style"), CASES)
def test_rows_render_exactly_as_the_fixed_renderings(name, style):
    case = next(c for c in RENDERINGS["cases"] if c["name"] == name)
    size = case["image_size"]
    scaler = BoxScaler.for_image(*size, RENDERINGS["min_pixels"], RENDERINGS["max_pixels"]) if size else None
    rendered = [m["content"] for m in render_objects(case["row"], scaler, style)]
    assert rendered == case["rendered"][style]


def test_boxes_scale_once_and_keep_their_own_labels():
    """Upstream's two defects are not copied: its single-box path scaled coordinates a second time, its
    several-box path labelled every box with the first ref."""
    case = next(c for c in RENDERINGS["cases"] if c["name"] == "several-bare-boxes")
    scaler = BoxScaler.for_image(*case["image_size"], RENDERINGS["min_pixels"], RENDERINGS["max_pixels"])
    answer = render_objects(case["row"], scaler)[1]["content"]
    listed = json.loads(answer.removeprefix("```json\n").removesuffix("\n```"))
    assert [item["label"] for item in listed] == case["row"]["objects"]["ref"]
    single = {"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": "<bbox>"}],
              "objects": {"ref": ["lesion"], "bbox": [[100, 100, 200, 200]]}}
    half = BoxScaler((400, 400), (200, 200))
    text = render_objects(single, half)[1]["content"]
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```"))[0]["bbox_2d"] == [50, 50, 100, 100]


def test_placeholders_without_objects_left_are_refused_with_the_fix():
    row = {"messages": [{"role": "user", "content": "<image>Find <ref-object> and <ref-object>."},
                        {"role": "assistant", "content": "<bbox>"}],
           "objects": {"ref": ["liver"], "bbox": [[1, 2, 3, 4]]}}
    with pytest.raises(RowProblem, match=r"<ref-object> number 2 has no objects.ref entry \(1 given\)"):
        render_objects(row, None)
    row["messages"][0]["content"] = "<image>Find <ref-object>."
    row["messages"][1]["content"] = "<bbox><bbox>"
    with pytest.raises(RowProblem, match=r"2 <bbox> placeholders in one message but only 1 objects.bbox"):
        render_objects(row, None)


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ({"ref": ["a"], "bbox": [[0.1, 0.1, 0.5, 0.5]], "bbox_type": "norm1"}, "bbox_type 'norm1' is not supported"),
        ({"ref": ["a"], "bbox": [[1, 1, 5, 5]], "image_id": [1]}, r"image_id \[1\]: boxes can refer to the first"),
    ],
)
def test_object_frames_the_renderer_cannot_place_are_refused(objects, message):
    row = {"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": "<bbox>"}],
           "images": ["a.png"], "objects": objects}
    with pytest.raises(RowProblem, match=message):
        check_schema(row)
