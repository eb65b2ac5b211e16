"""Save/load round trips, and clear errors for broken checkpoint folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from citrus_v import CitrusV, CitrusVProcessor
from citrus_v.checkpoint_layout import CheckpointError
from citrus_v.processing import ProcessorError
from citrus_v.processing.tokenizer_builder import build_tokenizer

from .conftest import seg_sample


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_save_load_gives_identical_logits_and_masks(tiny, tiny_dir):
    model, processor = tiny
    loaded = CitrusV.from_pretrained(tiny_dir).eval()
    loaded_processor = CitrusVProcessor.from_pretrained(tiny_dir)
    batch = processor([seg_sample(2, seed=1), seg_sample(1, seed=2)])
    batch2 = loaded_processor([seg_sample(2, seed=1), seg_sample(1, seed=2)])
    with torch.no_grad():
        a, b = model.eval()(**batch), loaded(**batch2)
    assert torch.equal(a.logits, b.logits)
    # mask logits agree to float rounding (CPU kernels may differ by an ulp with the buffer's alignment)
    for x, y in zip(a.pred_masks, b.pred_masks, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        assert torch.equal(x > 0, y > 0)
    for x, y in zip(a.iou_scores, b.iou_scores, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_saved_names_follow_the_upstream_layout(tiny_dir):
    names = set(load_file(tiny_dir / "model.safetensors"))
    assert "mllm.lm_head.weight" in names
    assert "mllm.model.language_model.layers.0.self_attn.q_proj.weight" in names
    assert "mllm.model.visual.blocks.0.attn.qkv.weight" in names
    assert {"seg_projector.0.weight", "seg_projector.2.weight"} <= names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "citrus_v" and config["architectures"] == ["CitrusV"]
    assert isinstance(config["seg_token_idx"], int)


def test_missing_config(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"m/config.json is missing.*citrus-v build"):
        CitrusV.from_pretrained(folder)


def test_missing_weights_and_missing_shard(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*model.safetensors or model.safetensors.index.json"):
        CitrusV.from_pretrained(folder)
    index = {"metadata": {}, "weight_map": {"mllm.lm_head.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing: model-00001-of-00002.safetensors"):
        CitrusV.from_pretrained(folder)


def test_shape_mismatch_names_the_tensor_and_the_file(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        CitrusV.from_pretrained(folder)
    message = str(err.value)
    assert "model.safetensors: mllm.model.language_model.layers.0.mlp.up_proj.weight has shape [512, 128]" in message
    assert "config.json implies [256, 128]" in message and "Fix:" in message


def test_missing_and_unexpected_tensors(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["extra.weight"] = tensors.pop("seg_projector.2.bias")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing from the weights \(1\): seg_projector.2.bias"):
        CitrusV.from_pretrained(folder)


def test_wrong_model_type_and_bad_json(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen2_5_vl"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type is 'qwen2_5_vl'.*citrus-v build --mllm"):
        CitrusV.from_pretrained(folder)
    (folder / "config.json").write_text("{\n  oops")
    with pytest.raises(CheckpointError, match="config.json line 2: invalid JSON"):
        CitrusV.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a folder"):
        CitrusV.from_pretrained(tmp_path / "absent")


def test_tokenizer_without_seg_in_a_checkpoint(tiny_dir, tmp_path):
    folder = _copy(tiny_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    build_tokenizer(citrus_tokens=False).save_pretrained(folder)
    with pytest.raises(ProcessorError, match=r"no \[SEG\] token"):
        CitrusVProcessor.from_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ProcessorError, match="tokenizer.json is missing"):
        CitrusVProcessor.from_pretrained(folder)
