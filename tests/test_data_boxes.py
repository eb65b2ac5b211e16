"""Boxes: smart-resize coordinates both ways, upstream answer format, parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from citrus_v.processing.boxes import Box, BoxScaler, format_box_tokens, format_boxes, model_size, parse_boxes


def test_model_size_matches_the_image_processor(tiny):
    _, processor = tiny
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=200704, max_pixels=1003520)
    for width, height in [(224, 224), (640, 480), (1000, 300), (3000, 2000)]:
        grid = image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
        assert model_size(width, height, 200704, 1003520) == (int(grid[2]) * 14, int(grid[1]) * 14)
    scaler = BoxScaler.for_processor(processor, 300, 200)
    assert scaler.model == model_size(300, 200, processor.min_pixels, processor.max_pixels)


@pytest.mark.parametrize("size", [(224, 224), (640, 480), (1000, 300), (3000, 2000), (97, 611)])
def test_round_trips(size):
    width, height = size
    scaler = BoxScaler.for_image(width, height, 200704, 1003520)
    mw, mh = scaler.model
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, x2 = sorted(rng.integers(0, mw + 1, 2))
        y1, y2 = sorted(rng.integers(0, mh + 1, 2))
        model_box = Box(float(x1), float(y1), float(x2), float(y2))
        # model -> original -> model is exact
        assert scaler.to_model(scaler.to_original(model_box)).xyxy == model_box.xyxy
        # original -> model -> original comes back within one model pixel (in original pixels)
        ox1, ox2 = sorted(rng.uniform(0, width, 2))
        oy1, oy2 = sorted(rng.uniform(0, height, 2))
        original = Box(ox1, oy1, ox2, oy2)
        back = scaler.to_original(scaler.to_model(original))
        tolerance = max(width / mw, height / mh) / 2 + 1e-9
        assert np.abs(np.array(back.xyxy) - np.array(original.xyxy)).max() <= tolerance
        # unrounded conversion is exact to float precision
        assert np.allclose(scaler.to_original(scaler.to_model(original, rounded=False)).xyxy, original.xyxy)


def test_scaling_is_applied_once():
    scaler = BoxScaler((1000, 500), (500, 250))
    assert scaler.to_model(Box(100, 50, 300, 250)).xyxy == [50, 25, 150, 125]
    assert scaler.to_original(Box(50, 25, 150, 125)).xyxy == [100, 50, 300, 250]
    # clamped to the image
    assert scaler.to_model(Box(-10, -5, 1200, 600)).xyxy == [0, 0, 500, 250]


def test_format_is_upstreams_and_parses_back():
    boxes = [Box(61, 99, 145, 178, "heart"), Box(10, 20, 30.5, 40, "left lung")]
    text = format_boxes(boxes)
    assert text.splitlines()[0] == "```json"
    assert text.splitlines()[2] == '{"bbox_2d":[61,99,145,178],"label": "heart"},'
    assert json.loads(text.split("```json")[1].split("```")[0])[1]["bbox_2d"] == [10, 20, 30.5, 40]
    assert [(b.xyxy, b.label) for b in parse_boxes("Here:\n" + text)] == [(b.xyxy, b.label) for b in boxes]
    tokens = format_box_tokens(boxes[:1])
    assert tokens == "<|object_ref_start|>heart<|object_ref_end|><|box_start|>(61,99),(145,178)<|box_end|>"
    parsed = parse_boxes("The box: " + tokens + " and <|box_start|>(1, 2),(3,4)<|box_end|>")
    assert [(b.xyxy, b.label) for b in parsed] == [([61, 99, 145, 178], "heart"), ([1, 2, 3, 4], "")]


def test_parse_tolerates_bare_json_and_garbage():
    assert parse_boxes('[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]')[0].xyxy == [1, 2, 3, 4]
    assert parse_boxes('{"bbox_2d": [5, 6, 7, 8]}')[0].xyxy == [5, 6, 7, 8]
    assert parse_boxes("no boxes here") == []
    assert parse_boxes('```json\n[{"bbox_2d": [1, 2]}, {"bbox_2d": "x"}]\n```') == []
    assert parse_boxes("```json\n[{not json\n```") == []


def test_iou_and_inside():
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert a.iou(b) == pytest.approx(50 / 150)
    assert a.iou(a) == 1.0 and a.iou(Box(20, 20, 30, 30)) == 0.0
    assert a.inside(10, 10) and not Box(0, 0, 11, 5).inside(10, 10) and not Box(5, 0, 1, 4).inside(10, 10)


def test_parse_boxes_to_original_scales_once(tiny):
    from citrus_v.processing.boxes import parse_boxes_to_original

    _, processor = tiny  # at most 448*448 pixels per model image
    scaler = BoxScaler.for_processor(processor, 1792, 448)
    assert scaler.model == (896, 224)  # half the original size on both axes
    answer = format_boxes([Box(28, 56, 112, 100, "lesion")])
    (box,) = parse_boxes_to_original(answer, (1792, 448), processor)
    assert box.label == "lesion" and box.xyxy == [56, 112, 224, 200]
