"""`citrus-v build`: the tiny preset, and assembly from local Qwen2.5-VL and SAM 2 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Sam2Model

from citrus_v import CitrusV, CitrusVProcessor
from citrus_v.checkpoint_layout import CheckpointError
from citrus_v.cli import main
from citrus_v.processing.tokenizer_builder import build_tokenizer
from citrus_v.recipes.presets import tiny_image_processor, tiny_mllm_config, tiny_sam2_config

from .conftest import seg_sample


def test_build_tiny_preset_cli(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["build", "--preset", "tiny", "--out", str(out)]) == 0
    assert "saved model and processor" in capsys.readouterr().out
    model = CitrusV.from_pretrained(out)
    processor = CitrusVProcessor.from_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < params < 10_000_000
    assert model.config.seg_token_idx == processor.seg_token_id
    with torch.no_grad():
        result = model(**processor(seg_sample(1)))
    assert result.pred_masks[0].shape == (1, 64, 64)


@pytest.mark.parametrize(("patch_size", "merge_size"), [(14, 2), (7, 4)])
def test_tiny_image_processor_matches_a_tower_of_other_patch_and_merge_sizes(patch_size, merge_size):
    """A 224-px scan gives 64 merged tokens (28-px cells) whichever way patch and merge split the cell, and
    patches of the size the tower embeds."""
    processor = tiny_image_processor(patch_size, merge_size)
    batch = processor(images=[Image.new("RGB", (224, 224), 90)], return_tensors="pt")
    grid = batch["image_grid_thw"][0].tolist()
    assert grid == [1, 224 // patch_size, 224 // patch_size]
    assert grid[1] * grid[2] // merge_size**2 == 64
    assert batch["pixel_values"].shape == (grid[1] * grid[2], 3 * 2 * patch_size**2)


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
    """A random Qwen2.5-VL whose tokenizer lacks [SEG] (and whose embedding has no spare rows),
    and a random transformers SAM 2, each saved the way Hugging Face folders are."""
    root = tmp_path_factory.mktemp("bases")
    tokenizer = build_tokenizer(citrus_tokens=False)
    config = tiny_mllm_config(tokenizer)
    config.text_config.vocab_size = len(tokenizer)  # no spare rows: adding [SEG] must resize
    torch.manual_seed(1)
    mllm = Qwen2_5_VLForConditionalGeneration(config)
    mllm.save_pretrained(root / "qwen")
    tokenizer.save_pretrained(root / "qwen")
    sam = Sam2Model(tiny_sam2_config())
    sam.save_pretrained(root / "sam2")
    return root, mllm, sam


def test_build_from_checkpoints(base_checkpoints, tmp_path):
    root, mllm, sam = base_checkpoints
    out = tmp_path / "assembled"
    assert main(["build", "--mllm", str(root / "qwen"), "--sam2", str(root / "sam2"), "--out", str(out)]) == 0
    model = CitrusV.from_pretrained(out).eval()
    processor = CitrusVProcessor.from_pretrained(out)
    vocab = processor.tokenizer.get_vocab()
    assert all(t in vocab for t in ("[SEG]", "<bbox>", "</bbox>"))
    assert model.config.seg_token_idx == processor.seg_token_id == len(vocab) - 3
    rows = model.mllm.get_input_embeddings().weight.shape[0]
    assert rows >= len(vocab) and rows % 64 == 0
    # the base weights are loaded unchanged
    original = mllm.model.language_model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(model.mllm.model.language_model.layers[1].self_attn.q_proj.weight, original)
    original_sam = sam.mask_decoder.iou_token.weight
    torch.testing.assert_close(model.grounding_encoder.mask_decoder.iou_token.weight, original_sam)
    assert processor.sam_image_size == 256 and processor.mask_size == 64
    with torch.no_grad():
        result = model(**processor(seg_sample(3)))
    assert result.pred_masks[0].shape == (3, 64, 64)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["CitrusV"]


def test_build_errors(tmp_path, capsys):
    assert main(["build", "--mllm", str(tmp_path / "nope"), "--sam2", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "nope is not a folder" in capsys.readouterr().err
    assert main(["build", "--out", str(tmp_path / "o")]) == 2
    assert "give --preset NAME, or both --mllm DIR and --sam2 DIR" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="config.json is missing"):
        from citrus_v.assembly import assemble

        assemble(tmp_path, tmp_path)
