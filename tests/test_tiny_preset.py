"""The tiny preset carries SAM 2's memory modules and its own video settings, and a base trained without them
gains them with every other weight kept."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from nibabel.testing import data_path as NIBABEL_DATA
from safetensors.torch import load_file

from citrus_v import CitrusV
from citrus_v.media.frame_sampling import VideoSampling
from citrus_v.processing import CitrusVProcessor
from citrus_v.processing.processor import PROCESSOR_FILE, ProcessorError
from citrus_v.recipes.presets import TINY_MEMORY, TINY_VIDEO, add_memory_modules, build_preset

ANATOMICAL = f"{NIBABEL_DATA}/anatomical.nii"  # 25 axial slices of 41 x 33
MEMORY_PREFIX = "propagator."


def test_the_preset_has_the_memory_modules_and_its_video_settings_and_they_travel_with_the_folder(tmp_path, caplog):
    folder = build_preset("tiny", tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    assert config["sam2_memory_config"] == TINY_MEMORY
    stored = load_file(folder / "model.safetensors")
    memory = [name for name in stored if name.startswith(MEMORY_PREFIX)]
    assert any(".memory_attention.layers.1." in name for name in memory)
    assert not any(".memory_attention.layers.2." in name for name in memory)  # two layers, as TINY_MEMORY says
    assert any(".memory_encoder." in name for name in memory)
    # fan-in initialised, not transformers' N(0, 0.02): the memory's projections start at PyTorch's default scale
    q_proj = stored[next(n for n in memory if n.endswith("layers.0.self_attn.q_proj.weight"))]
    bound = 1 / q_proj.shape[1] ** 0.5
    assert q_proj.abs().max() <= bound and q_proj.std() > 0.4 * bound
    with caplog.at_level(logging.WARNING, logger="citrus_v.modeling.modeling_citrus_v"):
        model = CitrusV.from_pretrained(folder)
    assert model.propagator is not None and "random weights" not in caplog.text
    processor = CitrusVProcessor.from_pretrained(folder)
    assert processor.video_sampling == VideoSampling(**TINY_VIDEO)
    video = processor.load_video(ANATOMICAL)
    # 16 frames of about 112 x 112 pixels (sides multiples of 28; this volume's slices are 41 x 33)
    width, height = video.frames[0].size
    assert len(video.frames) == 16 and width % 28 == height % 28 == 0 and width * height <= 1.25 * 112 * 112


def test_a_base_without_the_memory_modules_gains_them_with_every_other_weight_kept(tiny_dir, tmp_path):
    out = add_memory_modules(tiny_dir, tmp_path / "grown", seed=3)
    before = load_file(tiny_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    added = sorted(set(after) - set(before))
    assert added and all(name.startswith(MEMORY_PREFIX) for name in added)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert json.loads((out / "config.json").read_text())["sam2_memory_config"] == TINY_MEMORY
    assert CitrusVProcessor.from_pretrained(out).video_sampling == VideoSampling(**TINY_VIDEO)
    again = load_file(add_memory_modules(tiny_dir, tmp_path / "again", seed=3) / "model.safetensors")
    assert all(torch.equal(after[name], again[name]) for name in added)  # the seed decides the new weights


def test_a_saved_video_setting_with_an_unknown_name_is_refused_naming_it(tiny_dir, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_dir, tmp_path / "folder")
    settings = json.loads((folder / PROCESSOR_FILE).read_text())
    settings["video_sampling"] = {"fps_max_frames": 8, "video_max_pixel": 4096}
    (folder / PROCESSOR_FILE).write_text(json.dumps(settings))
    with pytest.raises(ProcessorError, match="unknown video_sampling setting.*video_max_pixel;.*video_max_pixels"):
        CitrusVProcessor.from_pretrained(folder)
    # a known one is read, and ms-swift's environment variable still wins over it
    settings["video_sampling"] = {"fps_max_frames": 8, "video_max_pixels": 4096}
    (folder / PROCESSOR_FILE).write_text(json.dumps(settings))
    monkeypatch.setenv("FPS_MAX_FRAMES", "6")
    sampling = CitrusVProcessor.from_pretrained(folder).video_sampling
    assert (sampling.fps_max_frames, sampling.video_max_pixels) == (6, 4096)
