"""CitrusVProcessor: template, labels, image tokens, pixel bounds, SAM inputs, mask targets, errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from citrus_v.processing import CitrusVProcessor, ProcessorError
from citrus_v.processing.images import IMAGENET_MEAN, IMAGENET_STD, mask_target, sam_pixel_values
from citrus_v.processing.tokenizer_builder import build_tokenizer
from citrus_v.tokens import IGNORE_INDEX

from .conftest import phantom, seg_sample


def test_works_without_torchvision(tiny):
    assert importlib.util.find_spec("torchvision") is None
    _, processor = tiny
    assert "Pil" in type(processor.image_processor).__name__


def test_chatml_text_and_labels(tiny):
    _, processor = tiny
    sample = {
        "messages": [
            {"role": "user", "content": "Is it normal?"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "No."},
        ]
    }
    batch = processor(sample)
    text = processor.decode(batch["input_ids"][0])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nIs it normal?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n"
    )
    labels = batch["labels"][0]
    trained = processor.decode(labels[labels != IGNORE_INDEX])
    assert trained == "Yes.<|im_end|>No.<|im_end|>"


def test_generation_prompt_and_custom_system(tiny):
    _, processor = tiny
    sample = {"messages": [{"role": "user", "content": "Hi"}], "system": "Be brief."}
    batch = processor(sample, add_generation_prompt=True, return_labels=False)
    assert "labels" not in batch
    assert processor.decode(batch["input_ids"][0]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_image_tokens_match_the_grid(tiny):
    _, processor = tiny
    batch = processor(seg_sample(1))
    grid = batch["image_grid_thw"][0]
    expected = int(grid.prod()) // processor.image_processor.merge_size**2
    ids = batch["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == expected == 64  # 224 px -> 64 tokens
    assert torch.equal(batch["mm_token_type_ids"][0].bool(), ids == processor.image_token_id)
    text = processor.decode(ids)
    assert "<|vision_start|>" + "<|image_pad|>" * expected + "<|vision_end|>Segment every target." in text
    assert batch["pixel_values"].shape[0] == int(grid.prod())


def test_images_without_placeholder_go_before_the_first_user_text(tiny):
    _, processor = tiny
    sample = {"messages": [{"role": "user", "content": "Describe."}], "images": [phantom().image]}
    text = processor.decode(processor(sample)["input_ids"][0])
    assert "<|vision_end|>Describe." in text


def test_min_max_pixels_from_arguments_and_environment(tiny, monkeypatch):
    _, processor = tiny
    image = Image.new("RGB", (640, 480))
    sample = {"messages": [{"role": "user", "content": "<image>x"}], "images": [image]}
    small = CitrusVProcessor(processor.tokenizer, _fresh_image_processor(), 256, 64, max_pixels=28 * 28 * 16)
    grid = small(sample)["image_grid_thw"][0]
    assert int(grid[1] * grid[2]) * 14 * 14 <= 28 * 28 * 16
    monkeypatch.setenv("MAX_PIXELS", str(28 * 28 * 64))
    monkeypatch.setenv("MIN_PIXELS", str(28 * 28 * 32))
    env = CitrusVProcessor(processor.tokenizer, _fresh_image_processor(), 256, 64)
    assert (env.min_pixels, env.max_pixels) == (28 * 28 * 32, 28 * 28 * 64)
    grid = env(sample)["image_grid_thw"][0]
    pixels = int(grid[1] * grid[2]) * 14 * 14
    assert 28 * 28 * 32 <= pixels <= 28 * 28 * 64
    assert int(grid[1]) * 14 % 28 == 0 and int(grid[2]) * 14 % 28 == 0
    monkeypatch.setenv("MAX_PIXELS", "lots")
    with pytest.raises(ProcessorError, match="MAX_PIXELS='lots'"):
        CitrusVProcessor(processor.tokenizer, _fresh_image_processor(), 256, 64)


def _fresh_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1003520)


def test_sam_input_is_resized_and_normalised():
    image = Image.new("RGB", (300, 200), (255, 0, 128))
    pixels = sam_pixel_values(image, 64)
    assert pixels.shape == (3, 64, 64)
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1]]
    assert float(pixels[0, 10, 10]) == pytest.approx(expected[0], abs=1e-4)
    assert float(pixels[1, 10, 10]) == pytest.approx(expected[1], abs=1e-4)


def test_mask_targets_are_nearest_resized_and_binarised():
    mask = np.zeros((100, 200), dtype=np.uint8)
    mask[:, 100:] = 7  # any non-zero value is foreground
    target = mask_target(mask, (10, 20))
    assert target.shape == (10, 20)
    assert set(target.unique().tolist()) == {0.0, 1.0}
    assert target[:, 10:].all() and not target[:, :10].any()


def test_masks_from_files_and_batch_padding(tiny, tmp_path):
    _, processor = tiny
    p = phantom(3)
    Image.fromarray(p.image).save(tmp_path / "scan.png")
    Image.fromarray(p.masks["lesion"].astype(np.uint8) * 255).save(tmp_path / "lesion.png")
    sample = seg_sample(1)
    sample["images"] = [str(tmp_path / "scan.png")]
    sample["masks"] = [str(tmp_path / "lesion.png")]
    batch = processor([sample, {"messages": [{"role": "user", "content": "hi"}]}], padding_side="left")
    assert batch["gt_masks"][0].shape == (1, 64, 64)
    assert batch["gt_masks"][1].shape == (0, 64, 64)
    assert batch["sam_image_mask"].tolist() == [True, False]
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1


def test_bad_samples_get_clear_errors(tiny, tmp_path):
    _, processor = tiny
    sample = seg_sample(2)
    sample["masks"] = sample["masks"][:1]
    with pytest.raises(ProcessorError, match=r"sample 0: 1 mask\(s\) for 2 \[SEG\] token\(s\)"):
        processor(sample)
    sample = seg_sample(1)
    sample["masks"] = [np.zeros((10, 10), bool)]
    with pytest.raises(ProcessorError, match="mask 0 is 10x10 but the first image is 224x224"):
        processor(sample)
    with pytest.raises(ProcessorError, match=r"\[SEG\] token\(s\) but no image"):
        processor({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "[SEG]"}]})
    with pytest.raises(ProcessorError, match="more <image> placeholders than images"):
        processor({"messages": [{"role": "user", "content": "<image><image>x"}], "images": [phantom().image]})
    with pytest.raises(ProcessorError, match="role 'doctor'"):
        processor({"messages": [{"role": "doctor", "content": "x"}]})
    with pytest.raises(ProcessorError, match="image file not found"):
        processor({"messages": [{"role": "user", "content": "<image>"}], "images": [str(tmp_path / "no.png")]})


def test_tokenizer_without_seg_is_rejected(tiny):
    _, processor = tiny
    with pytest.raises(ProcessorError, match=r"no \[SEG\] token. Fix: add it"):
        CitrusVProcessor(build_tokenizer(citrus_tokens=False), processor.image_processor)


def test_save_and_load_round_trip(tiny, tmp_path):
    _, processor = tiny
    processor.save_pretrained(tmp_path)
    loaded = CitrusVProcessor.from_pretrained(tmp_path)
    assert (loaded.sam_image_size, loaded.mask_size) == (processor.sam_image_size, processor.mask_size)
    assert (loaded.min_pixels, loaded.max_pixels) == (processor.min_pixels, processor.max_pixels)
    assert loaded.seg_token_id == processor.seg_token_id
    a, b = processor(seg_sample(2)), loaded(seg_sample(2))
    for key in ("input_ids", "labels", "pixel_values", "sam_pixel_values"):
        assert torch.equal(a[key], b[key]), key
