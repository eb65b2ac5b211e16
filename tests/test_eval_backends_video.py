"""The evaluator asks about volumes and gets 3-D masks back: in-process (the tiny model with a forced answer,
its volume masks placed on the video's grid) and through an OpenAI-compatible endpoint (the video sent as a
``video_url`` data URL, the stacks rebuilt from the grounding's per-frame COCO RLE).

The tiny model's masks are random: these tests check where the masks go and how they are scored, not quality.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from transformers import LogitsProcessor, LogitsProcessorList

from citrus_v.eval import seg_metrics
from citrus_v.eval.backends import GenerationOptions, InProcessBackend, OpenAIBackend
from citrus_v.eval.runner import EvalConfig, run_eval
from citrus_v.eval.samples import EvalSample
from citrus_v.infer import CitrusVPredictor, Request
from citrus_v.media import mask_to_rle, read_volume, read_volume_bytes
from citrus_v.processing import CitrusVProcessor

from .test_serve_support import running_server

openai = pytest.importorskip("openai")
pydicom = pytest.importorskip("pydicom")

from .forcing import ObjectScores  # noqa: E402
from .test_volume_outputs import ct_series  # noqa: E402

SPACING_XYZ = (0.7, 0.9, 2.5)
SHAPE_XYZ = (16, 20, 8)  # display stack: 8 frames of 20 rows x 16 columns
GRID = (8, 20, 16)
SEG_ANSWER = "Sure, the liver [SEG]."
NO_ANSWER = "There is no lesion in this scan."
SMALL_FRAMES = {"fps_max_frames": 4, "video_min_pixels": 4 * 784, "video_max_pixels": 16 * 784}


class _Force(LogitsProcessor):
    """Makes each row emit its fixed tokens (the last one repeats)."""

    def __init__(self, answers: list[list[int]]) -> None:
        self.answers, self.start = answers, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        for row, ids in enumerate(self.answers):
            scores[row] = float("-inf")
            scores[row, ids[min(step, len(ids) - 1)]] = 0.0
        return scores


class ForcedPredictor(CitrusVPredictor):
    """Answers a question naming the lesion in words (no [SEG]), any other with :data:`SEG_ANSWER`; generation,
    the [SEG] capture and SAM 2 on the frames still run for real."""

    def answer_ids(self, prompt: str) -> list[int]:
        text = NO_ANSWER if "lesion" in prompt else SEG_ANSWER
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_token_ids[0]]

    def predict_batch(self, requests, logits_processor=None, **generation):
        force = _Force([self.answer_ids(r.prompt) for r in requests])
        return super().predict_batch(requests, logits_processor=LogitsProcessorList([force]), **generation)


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([*SPACING_XYZ, 1.0])), path)
    return path


def _row(prompt: str, answer: str, **extra) -> dict:
    return {"task": "segmentation", "messages": [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": answer}], **extra}


def _write_case(folder: Path, video: str = "ct.nii.gz") -> Path:
    """A CT-like volume, its label volume (label 3: 5 x 6 x 4 voxels on frames 2..5), a segmentation row and an
    absent-target row about it; returns the rows file."""
    values = np.random.default_rng(0).normal(40, 60, SHAPE_XYZ).astype(np.float32)
    values[4:9, 5:11, 2:6] += 150
    _nifti(folder / "ct.nii.gz", values)
    labels = np.zeros(SHAPE_XYZ, np.int16)
    labels[4:9, 5:11, 2:6] = 3
    _nifti(folder / "labels.nii.gz", labels)
    rows = [
        _row("<video>Please segment the liver.", SEG_ANSWER, videos=[video], masks=["labels.nii.gz#label=3"],
             meta={"target": "liver", "modality": "CT"}),
        _row("<video>Please segment the lesion.", NO_ANSWER, videos=[video],
             meta={"absent": True, "absent_kind": "lesion_free", "target": "lesion", "modality": "CT"}),
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _records(out: Path) -> dict[str, dict]:
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return {r["task"]: r for r in map(json.loads, lines)}


def _truth(folder: Path) -> np.ndarray:
    return read_volume(folder / "labels.nii.gz").values == 3


# ------------------------------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def predictor(tiny, tiny_dir) -> ForcedPredictor:
    """The tiny model forced to answer; SAM 2 segments 4 of a volume's frames (max_frames), so that the stack
    has frames with mask and frames SAM 2 never saw."""
    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    processor.set_video_sampling(**SMALL_FRAMES)
    return ForcedPredictor(tiny[0], processor, max_frames=4)


def test_in_process_volume_masks_become_stacks_on_the_video_grid_and_are_scored(predictor, tmp_path):
    rows = _write_case(tmp_path)
    config = EvalConfig(tasks=["seg3d", "absent"], data=[str(rows)], out=tmp_path / "out", progress=False)
    with ObjectScores(predictor.model, 4.0):
        result = run_eval(config, InProcessBackend(predictor, batch_size=2))
        # the same question asked directly: the volume masks the backend had to place
        request = Request(images=[], prompt="<video>Please segment the liver.", videos=[str(tmp_path / "ct.nii.gz")])
        [direct] = predictor.predict_batch([request], max_new_tokens=64)
    records = _records(tmp_path / "out")
    seg3d, absent = records["seg3d"], records["absent"]
    assert seg3d["status"] == "ok", seg3d["error"]
    assert seg3d["output"] == SEG_ANSWER and seg3d["grounded"] is True

    [volume_mask] = direct.volume_masks
    assert volume_mask.source_frames == [0, 2, 5, 7]  # 4 evenly spaced of 8 frames
    expected = np.zeros(GRID, bool)
    expected[volume_mask.source_frames] = volume_mask.mask
    assert expected.any(), "the forced object scores should give SAM 2's masks some foreground"
    truth = _truth(tmp_path)
    assert seg3d["reference"]["shape"] == list(GRID) and seg3d["reference"]["voxels"] == 120
    assert seg3d["parsed"]["num_masks"] == 1 and seg3d["parsed"]["voxels"] == int(expected.sum())
    assert seg3d["parsed"]["frames"] == int(expected.any(axis=(1, 2)).sum()) <= 4
    assert seg3d["scores"]["dice"] == pytest.approx(seg_metrics.dice(expected, truth), abs=1e-6)
    assert seg3d["scores"]["volume_error"] is not None and seg3d["scores"]["seg_emitted"] == 1.0

    # the absent row asked about the volume too: words, no [SEG], no mask
    assert absent["status"] == "ok" and absent["output"] == NO_ANSWER
    assert absent["scores"]["false_mask"] == 0.0 and absent["parsed"]["num_masks"] == 0
    assert result.tasks["absent"]["overall"]["seg_emitted_present"] == 1.0


# ------------------------------------------------------------------------------------- an OpenAI-style endpoint


class FakeEndpoint:
    """A tiny OpenAI-compatible ``/v1/chat/completions`` that records each request and answers every one with
    ``content`` and ``grounding``."""

    def __init__(self, content: str, grounding: dict | None) -> None:
        self.content, self.grounding, self.requests = content, grounding, []

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: HttpRequest) -> dict:
            self.requests.append(await request.json())
            message = {"role": "assistant", "content": self.content}
            if self.grounding is not None:
                message["grounding"] = self.grounding
            return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "fake",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        return app

    def video_parts(self) -> list[dict]:
        return [p for r in self.requests for p in r["messages"][-1]["content"] if p["type"] == "video_url"]


def volume_grounding(stack: np.ndarray, label: str = "liver") -> dict:
    """``stack`` as ``citrus-v deploy`` answers a volume mask: its frames with mask, each as COCO RLE."""
    frames = [{"frame": k, "rle": mask_to_rle(stack[k])} for k in range(stack.shape[0]) if stack[k].any()]
    frames_, height, width = stack.shape
    return {"video_index": 0, "video_size": {"frames": frames_, "height": height, "width": width},
            "volume_masks": [{"index": 0, "label": label, "present": bool(frames), "frames": frames,
                              "volume_ml": 0.0, "spacing": [2.5, 0.9, 0.7], "bbox3d": None, "key_frame": 0}],
            "notes": []}


def _decoded(url: str) -> tuple[str, bytes]:
    header, _, payload = url.partition(",")
    return header, base64.b64decode(payload)


def test_api_backend_sends_the_volume_and_rebuilds_the_stacks_from_the_grounding_rle(tmp_path):
    rows = _write_case(tmp_path, video="ct.nii.gz#window=ct-abdomen")
    truth = _truth(tmp_path)
    answer = np.roll(truth, 1, axis=0)  # the truth one frame later: 3 of its 4 frames overlap
    answer[0, 0, :3] = True  # and a few voxels on the first frame
    endpoint = FakeEndpoint(SEG_ANSWER, volume_grounding(answer))
    with running_server(endpoint.app()) as url:
        backend = OpenAIBackend(url, "fake", retries=0, timeout=30)
        sample = EvalSample("s", "seg3d", "<video>Please segment the liver.", [], ["labels.nii.gz#label=3"], "t",
                            base_dir=tmp_path, videos=["ct.nii.gz#window=ct-abdomen"])
        [output] = backend.predict([sample], [[]], GenerationOptions(32, 0.0, 0))
        config = EvalConfig(tasks=["seg3d"], data=[str(rows)], out=tmp_path / "out", progress=False)
        run_eval(config, OpenAIBackend(url, "fake", retries=0, timeout=30))

    assert output.grounded and len(output.masks) == 1
    np.testing.assert_array_equal(output.masks[0], answer)  # rebuilt exactly, frame by frame
    # what went over the wire: the NIfTI file's own bytes with its window as a parameter, where <video> was
    content = endpoint.requests[0]["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["video_url", "text"] and content[1]["text"] == "Please segment the liver."
    header, data = _decoded(content[0]["video_url"]["url"])
    assert header == "data:application/gzip;window=40%2C400;base64"
    assert data == (tmp_path / "ct.nii.gz").read_bytes()

    record = _records(tmp_path / "out")["seg3d"]
    assert record["status"] == "ok", record["error"]
    assert record["parsed"]["voxels"] == 120 + 3 and record["parsed"]["frames"] == 5
    assert record["scores"]["dice"] == pytest.approx(2 * 90 / (123 + 120))


def test_api_backend_zips_the_chosen_dicom_series_and_refuses_frames_off_the_grid(tmp_path):
    volume, _ = ct_series(tmp_path / "study", count=5)
    stray = pydicom.dcmread(tmp_path / "study" / "slice_0.dcm")  # a second series in the same folder
    stray.SeriesInstanceUID = pydicom.uid.generate_uid()
    stray.save_as(tmp_path / "study" / "other.dcm")
    uid = str(volume.datasets[0].SeriesInstanceUID)
    reference = f"study/#series={uid}"
    shape = read_volume(tmp_path / reference).values.shape
    answer = np.zeros(shape, bool)
    answer[1:4, 20:40, 30:50] = True
    endpoint = FakeEndpoint(SEG_ANSWER, volume_grounding(answer))
    sample = EvalSample("s", "seg3d", "Please segment the liver.", [], [], "t", base_dir=tmp_path, videos=[reference])
    with running_server(endpoint.app()) as url:
        backend = OpenAIBackend(url, "fake", retries=0, timeout=30)
        [output] = backend.predict([sample], [[]], GenerationOptions(32, 0.0, 0))
        endpoint.grounding["volume_masks"][0]["frames"].append({"frame": 5, "rle": mask_to_rle(answer[0])})
        with pytest.raises(ValueError, match=r"frame 5 is outside the video, which has 5 frames"):
            backend.predict([sample], [[]], GenerationOptions(32, 0.0, 0))
        # a server that read the series otherwise says so by its video_size: refused, not placed
        endpoint.grounding["video_size"]["frames"] = 6
        with pytest.raises(ValueError, match=r"video_size is 6 frames of 128x128 but the video sent is 5 frames"):
            backend.predict([sample], [[]], GenerationOptions(32, 0.0, 0))

    np.testing.assert_array_equal(output.masks[0], answer)
    header, data = _decoded(endpoint.video_parts()[0]["video_url"]["url"])
    assert header == "data:application/zip;base64"  # no placeholder: the video goes first
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert len(archive.namelist()) == 5  # the chosen series only, not the stray instance
    sent = read_volume_bytes(data, "sent.zip")
    np.testing.assert_array_equal(sent.values, volume.values)
    assert endpoint.requests[0]["messages"][-1]["content"][0]["type"] == "video_url"


# ---------------------------------------------------------------------------------------- the real citrus-v deploy


def test_api_backend_against_citrus_v_deploy_scores_what_the_in_process_backend_scores(predictor, tmp_path):
    from citrus_v.serve.server import ServerSettings, create_app

    rows = _write_case(tmp_path)
    backends = {"in_process": lambda url: InProcessBackend(predictor),
                "api": lambda url: OpenAIBackend(url, "citrus-v-test", retries=0, timeout=120)}
    with ObjectScores(predictor.model, 4.0), \
            running_server(create_app(predictor, ServerSettings(served_model_name="citrus-v-test"))) as url:
        for name, make in backends.items():
            config = EvalConfig(tasks=["seg3d", "absent"], data=[str(rows)], out=tmp_path / name, progress=False)
            run_eval(config, make(url))
    local, served = _records(tmp_path / "in_process"), _records(tmp_path / "api")
    for task in ("seg3d", "absent"):
        assert served[task]["status"] == "ok", served[task]["error"]
        assert served[task]["output"] == local[task]["output"] and served[task]["grounded"] is True
        assert served[task]["parsed"] == local[task]["parsed"]  # the same stacks, voxel for voxel
        assert served[task]["scores"] == local[task]["scores"]
    assert served["seg3d"]["parsed"]["voxels"] > 0 and served["absent"]["parsed"]["num_masks"] == 0
