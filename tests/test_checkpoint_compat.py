"""Checkpoints saved before the training-only objectives moved behind one interface load unchanged.

The shipped tiny base was saved with every objective's head in it. Loaded now, it must
give the same logits, masks and every loss — the objectives' included — on fixed inputs as it gave then
(``tests/data/tiny_base_reference.json``; first written by the earlier code, rewritten when the base was rebuilt
with its volume parts, after the code of that day had reproduced the earlier base's figures to the digit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from citrus_v.modeling import CitrusV
from citrus_v.processing import CitrusVProcessor
from citrus_v.recipes.demo import shipped_base

REFERENCE = Path(__file__).parent / "data" / "tiny_base_reference.json"


def fixed_sample() -> dict:
    """A scan-like image with a mask, lesion annotations and a two-line character map the answer copies."""
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(224, 224, 3) * 255).astype(np.uint8))
    mask = np.zeros((224, 224), bool)
    mask[60:120, 80:150] = True
    lesion = np.zeros((224, 224), bool)
    lesion[30:50, 30:60] = True
    chars = np.zeros((224, 224), np.uint8)
    for line, text in enumerate(["Hb 12.5", "WBC 7.1"]):
        for k, char in enumerate(text):
            if char != " ":
                chars[line * 28 : (line + 1) * 28, k * 28 : (k + 1) * 28] = ord(char) - 33 + 1
    return {
        "messages": [
            {"role": "user", "content": "<image>Segment the heart. Hb?"},
            {"role": "assistant", "content": "Hb 12.5, WBC 7.1. Sure, the heart is [SEG]."},
        ],
        "images": [image],
        "masks": [mask],
        "lesion_mask": lesion,
        "lesion_points": [[45.0, 40.0]],
        "char_map": chars,
    }


@pytest.fixture(scope="module")
def base_outputs():
    base = shipped_base()
    assert base is not None
    model = CitrusV.from_pretrained(base).eval()
    processor = CitrusVProcessor.from_pretrained(base)
    with torch.no_grad():
        return base, model, model(**processor([fixed_sample()]))


def test_the_shipped_base_keeps_its_tensor_names(base_outputs):
    base, model, _ = base_outputs
    with safe_open(base / "model.safetensors", "pt") as handle:
        stored = set(handle.keys())
    assert stored == set(model.state_dict()), sorted(stored ^ set(model.state_dict()))[:10]
    # the objectives' heads are among them, under the names the earlier code saved
    assert {"lesion_map_head.proj.weight", "lesion_count_head.proj.weight", "text_map_head.proj.weight"} <= stored


def test_the_shipped_base_gives_the_outputs_it_gave_before(base_outputs):
    _, _, out = base_outputs
    ref = json.loads(REFERENCE.read_text())
    close = {"rel": 1e-5, "abs": 1e-4}
    assert float(out.logits.double().sum()) == pytest.approx(ref["logits_sum"], **close)
    assert float(out.logits.double().abs().sum()) == pytest.approx(ref["logits_abs"], **close)
    assert float(out.pred_masks[0].double().sum()) == pytest.approx(ref["mask_sum"], **close)
    assert out.iou_scores[0].tolist() == pytest.approx(ref["iou"], **close)
    for key, value in (("loss", out.loss), ("lm_loss", out.lm_loss), ("bce", out.mask_bce_loss),
                       ("dice", out.mask_dice_loss)):
        assert float(value) == pytest.approx(ref[key], **close), key
    aux = {name: float(value) for name, value in out.aux_losses.items()}
    assert aux == pytest.approx(ref["aux"], **close)
