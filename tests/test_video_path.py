"""Volumes and clips through Qwen2.5-VL's video path: rows with ``"videos"`` and ``<video>``, the pixels and grids
transformers lays out, the frames ms-swift's variables choose, the rotary time positions, generation and the
``[SEG]`` states of an answer about a video — with 2-D requests unchanged."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import transformers.models.qwen2_vl as qwen2_vl
from nibabel.testing import data_path as NIBABEL_DATA
from PIL import Image
from transformers import LogitsProcessorList

from citrus_v.infer import CitrusVPredictor, Prediction, Request
from citrus_v.infer.predictor import VideoPrediction
from citrus_v.media import sample_frames
from citrus_v.processing import CitrusVProcessor, ProcessorError
from citrus_v.processing.images import load_image
from citrus_v.processing.videos import FRAME_LIST_FPS, video_pixel_values
from citrus_v.tokens import ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START

from .conftest import phantom
from .forcing import ForceAnswer

ANATOMICAL = os.path.join(NIBABEL_DATA, "anatomical.nii")  # 25 axial slices of 41 x 33
SMALL_FRAMES = {"video_min_pixels": 4 * 784, "video_max_pixels": 64 * 784}  # a few tokens per frame: fast
ANSWER = "Sure, it is [SEG]."


@pytest.fixture
def processor(tiny_dir) -> CitrusVProcessor:
    """The tiny model's processor, on its own (its video settings change per test)."""
    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    processor.set_video_sampling(fps_max_frames=8, **SMALL_FRAMES)
    return processor


@pytest.fixture
def predictor(tiny, processor) -> CitrusVPredictor:
    return CitrusVPredictor(tiny[0], processor)


def _write_clip(path: Path, frames: int = 30, fps: int = 10) -> None:
    """A white 16 px square moving 4 px to the right per frame on black, 96 x 64, with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for k in range(frames):
            image = np.zeros((64, 96, 3), np.uint8)
            image[20:36, 4 * k % 80 : 4 * k % 80 + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _transformers_patchify():
    """``Qwen2VLVideoProcessor.patchify`` from transformers' own source (the module imports torchvision, which
    this environment lacks; the method itself is plain torch)."""
    source = Path(qwen2_vl.__path__[0], "video_processing_qwen2_vl.py").read_text()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    method.returns = None
    for arg in method.args.args:
        arg.annotation = None
    namespace = {"torch": torch}
    exec(compile(ast.Module([method], []), "patchify", "exec"), namespace)
    return namespace["patchify"]


def test_video_pixels_are_laid_out_as_transformers_video_processor_does(processor):
    patchify, ip = _transformers_patchify(), processor.image_processor
    rng = np.random.default_rng(0)
    for count in (2, 5, 6):  # an odd count repeats the last frame, as transformers pads
        frames = [Image.fromarray(rng.integers(0, 255, (56, 112, 3), dtype=np.uint8)) for _ in range(count)]
        ours, grid = video_pixel_values(ip, frames)
        scale = np.float32(ip.rescale_factor)
        scaled = np.stack([np.asarray(f, np.float32).transpose(2, 0, 1) * scale for f in frames])
        mean = np.asarray(ip.image_mean, np.float32)[:, None, None]
        std = np.asarray(ip.image_std, np.float32)[:, None, None]
        reference, t, h, w = patchify(None, torch.from_numpy((scaled - mean) / std)[None], 14, 2, 2)
        assert grid.tolist() == [[t, h, w]] == [[(count + 1) // 2, 4, 8]]
        torch.testing.assert_close(ours, reference[0], rtol=0, atol=1e-5)


def test_a_nifti_row_holds_t_h_w_over_merge_video_tokens_between_its_markers(processor):
    sample = {
        "messages": [
            {"role": "user", "content": "<video>Where is the lesion?"},
            {"role": "assistant", "content": "Here."},
        ],
        "videos": [ANATOMICAL],
    }
    batch = processor(sample)
    t, h, w = batch["video_grid_thw"][0].tolist()
    merge = processor.image_processor.merge_size
    ids = batch["input_ids"][0]
    video = ids == processor.video_token_id
    positions = video.nonzero()[:, 0]
    assert t == 4 and int(video.sum()) == t * h * w // merge**2  # 8 slices (FPS_MAX_FRAMES) in pairs
    assert positions[-1] - positions[0] + 1 == len(positions)  # one block
    vocab = processor.tokenizer.get_vocab()
    assert ids[positions[0] - 1] == vocab[VISION_START] and ids[positions[-1] + 1] == vocab[VISION_END]
    assert torch.equal(batch["mm_token_type_ids"][0], 2 * video.int())  # Qwen2.5-VL: 2 marks a video token
    assert batch["pixel_values_videos"].shape == (t * h * w, 3 * 2 * 14 * 14)
    assert batch["second_per_grid_ts"].tolist() == [2 / FRAME_LIST_FPS]  # a volume has no rate: frame-list rule
    assert (batch["labels"][0][video] == -100).all() and "pixel_values" not in batch
    loaded = processor.load_video(ANATOMICAL)
    assert loaded.source_frames == sample_frames(25, 41, 33, None, processor.video_sampling).indices


def test_frames_follow_fps_max_frames_from_the_environment_or_the_processor_and_come_in_pairs(tiny_dir, monkeypatch):
    monkeypatch.setenv("FPS_MAX_FRAMES", "6")
    monkeypatch.setenv("VIDEO_MAX_PIXELS", str(64 * 784))
    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    assert processor.video_sampling.fps_max_frames == 6 and processor.video_sampling.video_max_pixels == 64 * 784
    loaded = processor.load_video(ANATOMICAL)
    assert loaded.source_frames == np.linspace(0, 24, 6).round().astype(int).tolist()
    processor.set_video_sampling(fps_max_frames=7, video_min_pixels=4 * 784)
    assert len(processor.load_video(ANATOMICAL).frames) == 6  # rounded down to pairs
    processor.set_video_sampling(fps_max_frames=30)
    every = processor.load_video(ANATOMICAL + "#axis=2")
    assert every.source_frames == [*range(25), 24]  # all 25 slices, the last repeated to make pairs
    grid = processor._encode_videos([every])["video_grid_thw"]
    assert grid[0, 0] == 13
    grey = [np.full((20, 30), k, np.float32) for k in range(5)]  # a frame list: one window for the stack
    frames = processor.load_video(grey)
    assert frames.source_frames == [0, 1, 2, 3, 4, 4]
    shades = [int(np.asarray(f)[10, 15, 0]) for f in frames.frames[:5]]
    assert shades == sorted(set(shades)) and len(shades) == 5  # one window for the stack, not one per frame
    with pytest.raises(ProcessorError, match="unknown video setting.*max_frames"):
        processor.set_video_sampling(max_frames=4)
    monkeypatch.setenv("FPS_MAX_FRAMES", "many")
    with pytest.raises(ProcessorError, match="FPS_MAX_FRAMES='many'"):
        CitrusVProcessor.from_pretrained(tiny_dir)


def test_video_settings_travel_with_the_folder_and_the_environment_still_wins(tiny_dir, tmp_path, monkeypatch):
    for name in ("FPS_MAX_FRAMES", "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS"):
        monkeypatch.delenv(name, raising=False)
    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    processor.set_video_sampling(fps_max_frames=10, video_max_pixels=32 * 784)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "citrus_v_processor.json").read_text())["video_sampling"]
    assert saved["fps_max_frames"] == 10 and saved["video_max_pixels"] == 32 * 784
    again = CitrusVProcessor.from_pretrained(tmp_path)
    assert again.video_sampling == processor.video_sampling
    assert len(again.load_video(ANATOMICAL).frames) == 10
    monkeypatch.setenv("FPS_MAX_FRAMES", "4")
    overridden = CitrusVProcessor.from_pretrained(tmp_path)
    assert overridden.video_sampling.fps_max_frames == 4 and overridden.video_sampling.video_max_pixels == 32 * 784
    settings = json.loads((tmp_path / "citrus_v_processor.json").read_text())
    settings["video_sampling"]["frames"] = 3
    (tmp_path / "citrus_v_processor.json").write_text(json.dumps(settings))
    with pytest.raises(ProcessorError, match="unknown video_sampling setting.*frames"):
        CitrusVProcessor.from_pretrained(tmp_path)


def test_a_clip_written_with_pyav_is_sampled_at_fps_with_its_time_per_temporal_patch(predictor, tmp_path):
    path = tmp_path / "clip.mp4"
    _write_clip(path)
    encoded = predictor.encode(Request(images=[], prompt="<video>What moves?", videos=[path]))
    loaded, row = encoded.videos[0], encoded.row
    plan = sample_frames(30, 64, 96, 10.0, predictor.processor.video_sampling)
    assert loaded.source_frames == plan.indices and len(plan.indices) == 6  # 3 s at FPS 2
    assert loaded.sample_fps == pytest.approx(plan.sample_fps)
    assert row["second_per_grid_ts"].item() == pytest.approx(2 / plan.sample_fps)
    assert row["video_grid_thw"][0, 0] == 3 and loaded.size == (plan.width, plan.height)
    lefts = [np.nonzero(np.asarray(f)[:, :, 0].max(axis=0) > 128)[0].min() for f in loaded.frames]
    expected = [4 * k % 80 * plan.width / 96 for k in plan.indices]  # where the square is in each chosen frame
    assert lefts == pytest.approx(expected, abs=2)


def _reference_seg_state(predictor: CitrusVPredictor, row: dict, answer_ids: list[int], seconds: torch.Tensor):
    """The [SEG] hidden state of one forward pass over prompt + answer, with the given seconds per patch."""
    ids = torch.tensor([list(row["input_ids"]) + answer_ids])
    with torch.no_grad():
        out = predictor.model.mllm.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=row["pixel_values_videos"],
            video_grid_thw=row["video_grid_thw"],
            second_per_grid_ts=seconds,
            mm_token_type_ids=predictor.processor.mm_token_type_ids(ids),
            use_cache=False,
        )
    position = int((ids[0] == predictor.seg_token_id).nonzero()[0, 0])
    return out.last_hidden_state[0, position]


def test_generation_answers_and_a_seg_about_a_video_gives_its_state(predictor, tmp_path):
    path = tmp_path / "clip.mp4"
    _write_clip(path)
    requests = [
        Request(images=[], prompt="<video>Segment the brain.", videos=[ANATOMICAL]),
        Request(images=[], prompt="Segment the square.", videos=[path]),  # no <video>: it goes first
        Request(images=[phantom(5).image], prompt="<image>Segment the lesion."),
    ]
    encoded = [predictor.encode(r) for r in requests]
    width = predictor.processor.collate([e.row for e in encoded], padding_side="left")["input_ids"].shape[1]
    answer_ids = predictor.processor.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    force = LogitsProcessorList([ForceAnswer([*answer_ids, predictor.eos_token_ids[0]], width)])
    predictions = predictor.predict_batch(requests, logits_processor=force, encoded=encoded, max_new_tokens=20)
    assert [p.text for p in predictions] == [ANSWER] * 3
    assert [type(p) for p in predictions] == [VideoPrediction, VideoPrediction, Prediction]
    assert len(predictions[2].masks) == 1  # a 2-D request next to videos still gets its mask
    for prediction, item in zip(predictions[:2], encoded[:2], strict=True):
        assert prediction.masks == [] and len(prediction.seg_states) == 1 and prediction.videos == item.videos
        seconds = item.row["second_per_grid_ts"]
        reference = _reference_seg_state(predictor, item.row, answer_ids, seconds)
        torch.testing.assert_close(prediction.seg_states[0], reference, rtol=1e-4, atol=1e-4)
        other_time = _reference_seg_state(predictor, item.row, answer_ids, seconds * 3)
        assert not torch.allclose(prediction.seg_states[0], other_time, atol=1e-4)  # the time positions count


def test_a_seg_generated_last_about_a_video_is_completed_with_the_video(predictor):
    request = Request(images=[], prompt="<video>Segment the brain.", videos=[ANATOMICAL])
    item = predictor.encode(request)
    answer_ids = predictor.processor.tokenizer("Sure [SEG]", add_special_tokens=False)["input_ids"]
    force = LogitsProcessorList([ForceAnswer(answer_ids, len(item.row["input_ids"]))])
    [prediction] = predictor.predict_batch([request], logits_processor=force, max_new_tokens=len(answer_ids))
    assert prediction.text == "Sure [SEG]" and len(prediction.seg_states) == 1
    reference = _reference_seg_state(predictor, item.row, answer_ids, item.row["second_per_grid_ts"])
    torch.testing.assert_close(prediction.seg_states[0], reference, rtol=1e-4, atol=1e-4)


def test_a_2d_request_is_encoded_and_answered_through_the_image_path_alone(predictor):
    processor, model = predictor.processor, predictor.model
    image = phantom(5).image
    row = processor.encode_sample(
        {"messages": [{"role": "user", "content": "<image>Please segment the lesion."}], "images": [image]},
        add_generation_prompt=True,
        return_labels=False,
    )
    pixels = processor.image_processor(images=[load_image(image)], return_tensors="pt")
    count = int(pixels["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
    vocab = processor.tokenizer.get_vocab()

    def text(value: str) -> list[int]:
        return processor.tokenizer(value, add_special_tokens=False)["input_ids"]

    im_start, im_end = vocab[IM_START], vocab[IM_END]
    expected = (
        [im_start, *text("system\nYou are a helpful assistant."), im_end, *text("\n"), im_start, *text("user\n")]
        + [vocab[VISION_START]] + [vocab[IMAGE_PAD]] * count + [vocab[VISION_END]]
        + [*text("Please segment the lesion."), im_end, *text("\n"), im_start, *text("assistant\n")]
    )
    assert row["input_ids"] == expected
    batch = processor.collate([row], padding_side="left", return_labels=False)
    assert not {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"} & batch.keys()
    ids = torch.tensor([expected])
    torch.testing.assert_close(batch["pixel_values"], pixels["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():
        direct = model.mllm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == vocab[IMAGE_PAD]).int(),
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            eos_token_id=[im_end, vocab[ENDOFTEXT]],
            pad_token_id=processor.tokenizer.pad_token_id,
            max_new_tokens=8,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    answer = direct[0, ids.shape[1] :].tolist()
    answer = answer[: next((k for k, t in enumerate(answer) if t in (im_end, vocab[ENDOFTEXT])), len(answer))]
    prediction = predictor.predict(image, "<image>Please segment the lesion.", max_new_tokens=8)
    assert type(prediction) is Prediction and prediction.text == processor.tokenizer.decode(answer)
    assert answer  # the random tiny model does answer this one: the comparison is not of two empty strings


def test_mismatched_videos_and_placeholders_are_clear_errors(processor, predictor):
    def sample(text: str, videos: list) -> dict:
        return {"messages": [{"role": "user", "content": text}], "videos": videos}

    with pytest.raises(ProcessorError, match=r'more <video> placeholders than videos \(1 given\).*entry of "videos"'):
        processor(sample("<video>and <video>?", [ANATOMICAL]))
    with pytest.raises(ProcessorError, match="2 video\\(s\\) given but the conversation has 1 <video> placeholder"):
        processor(sample("<video>what?", [ANATOMICAL, ANATOMICAL]))
    with pytest.raises(ProcessorError, match=r"more <video> placeholders than videos \(0 given\)"):
        predictor.encode(Request(images=[], prompt="<video>what?"))
    uneven = [np.zeros((20, 30), np.float32), np.zeros((20, 31), np.float32)]
    with pytest.raises(ProcessorError, match=r'"videos"\[0\]: frame 1 is 31x20 but frame 0 is 30x20'):
        processor(sample("<video>what?", [uneven]))
    with pytest.raises(ProcessorError, match=r'"videos"\[0\]: .*missing.nii'):
        processor(sample("<video>what?", ["missing.nii"]))
    with pytest.raises(ProcessorError, match="mask\\(s\\) but no image"):
        processor({**sample("<video>Segment it.", [ANATOMICAL]),
                   "messages": [{"role": "user", "content": "<video>Segment it."},
                                {"role": "assistant", "content": ANSWER}],
                   "masks": [np.ones((41, 33), bool)]})


def test_the_shipped_tiny_base_knows_the_video_token_its_model_looks_for():
    import json

    from citrus_v.checkpoint_layout import resolve_model

    folder = resolve_model("tiny-base")
    processor = CitrusVProcessor.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert processor.video_token_id is not None and processor.video_token_id == config["video_token_id"]
