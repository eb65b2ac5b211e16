"""The OpenAI-API backend's side: messages, grounding, boxes read from text, and an endpoint that is down."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from PIL import Image

from citrus_v.eval.backends import GenerationOptions, OpenAIBackend, chat_messages
from citrus_v.eval.samples import EvalSample
from citrus_v.media import mask_to_rle

openai = pytest.importorskip("openai")


def _sample(prompt: str = "<image>Locate the lesion.", **kw) -> EvalSample:
    return EvalSample(id="s", task="det", prompt=prompt, images=[], reference=[[0, 0, 1, 1]], source="t", **kw)


def _reply(content: str, grounding: dict | None = None):
    message = {"role": "assistant", "content": content}
    if grounding is not None:
        message["grounding"] = grounding
    return openai.types.chat.ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    })


class _FakeCompletions:
    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def create(self, **kwargs):
        self.calls.append(kwargs)
        return self.reply


def _backend(reply, **kw) -> tuple[OpenAIBackend, _FakeCompletions]:
    backend = OpenAIBackend("http://127.0.0.1:9", "m", **kw)
    fake = _FakeCompletions(reply)
    backend.client = type("C", (), {"chat": type("Chat", (), {"completions": fake})()})()
    return backend, fake


def test_messages_put_each_image_where_its_placeholder_is():
    images = [Image.new("RGB", (8, 6)), Image.new("RGB", (4, 4))]
    sample = _sample("Compare <image> with <image> please", system="Be brief.",
                     history=[{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "hello"}])
    messages = chat_messages(sample, images)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "hi"} and messages[2]["role"] == "assistant"
    parts = messages[3]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    # without placeholders the images come first, as the processor does in-process
    parts = chat_messages(_sample("What is shown?"), images[:1])[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"] and parts[1]["text"] == "What is shown?"


def test_grounding_masks_and_boxes_are_read_in_original_pixels():
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:5] = True
    grounding = {"image_index": 0, "image_size": {"width": 8, "height": 6},
                 "boxes": [{"bbox_2d": [1, 2, 3, 4], "label": "lesion"}],
                 "masks": [{"index": 1, "score": 0.5, "bbox": [0, 0, 0, 0], "area": 0,
                            "segmentation": mask_to_rle(np.zeros((6, 8), bool))},
                           {"index": 0, "score": 0.9, "bbox": [2, 1, 3, 2], "area": 6,
                            "segmentation": mask_to_rle(mask)}]}
    backend, fake = _backend(_reply("a [SEG] b [SEG]", grounding))
    (out,) = backend.predict([_sample()], [[Image.new("RGB", (8, 6))]], GenerationOptions(16, 0.0, 3))
    assert out.grounded and out.boxes == [[1.0, 2.0, 3.0, 4.0]]
    assert np.array_equal(out.masks[0], mask) and not out.masks[1].any()  # ordered by [SEG] index
    call = fake.calls[0]
    assert call["max_tokens"] == 16 and call["temperature"] == 0.0 and call["seed"] == 3 and call["model"] == "m"
    wrong = dict(grounding, image_size={"width": 4, "height": 4})
    backend, _ = _backend(_reply("x", wrong))
    with pytest.raises(RuntimeError, match="does not match the image sent"):
        backend.predict([_sample()], [[Image.new("RGB", (8, 6))]], GenerationOptions())


@pytest.mark.parametrize(
    ("box_format", "expected"),
    [
        ("pixels", [10.0, 15.0, 30.0, 45.0]),
        ("norm1000", [2.0, 3.0, 6.0, 9.0]),
        # Qwen2.5-VL pixels of the smart-resized image (56x56 under these bounds) back to 200x200
        ("qwen", [10 * 200 / 56, 15 * 200 / 56, 30 * 200 / 56, 45 * 200 / 56]),
    ],
)
def test_boxes_from_text_when_the_endpoint_has_no_grounding(box_format, expected):
    text = '```json\n[{"bbox_2d": [10, 15, 30, 45], "label": "lesion"}]\n```'
    backend, _ = _backend(_reply(text), box_format=box_format, min_pixels=56 * 56, max_pixels=56 * 56)
    (out,) = backend.predict([_sample()], [[Image.new("RGB", (200, 200))]], GenerationOptions())
    assert not out.grounded and not out.masks
    assert out.boxes == [pytest.approx(expected)]


def test_an_endpoint_that_is_down_fails_samples_and_the_run_goes_on(tmp_path):
    from citrus_v.cli import main

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scan = np.zeros((32, 32, 3), np.uint8)
    Image.fromarray(scan).save(tmp_path / "scan.png")
    rows = [{"id": f"q{k}", "task": "vqa-closed", "images": ["scan.png"], "messages": [
        {"role": "user", "content": "<image>Is there a lesion?"}, {"role": "assistant", "content": "no"}]}
        for k in range(3)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["eval", "--tasks", "vqa", "--data", str(tmp_path / "rows.jsonl"), "--api", f"http://127.0.0.1:{port}",
                 "--served_model_name", "m", "--retries", "0", "--timeout", "5", "--out", str(tmp_path / "out"),
                 "--no_progress"])
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["tasks"]["vqa"]
    assert metrics["counts"] == {"samples": 3, "scored": 0, "unparsable": 0, "failed": 3}
    assert [f["id"] for f in metrics["failed"]] == ["q0", "q1", "q2"]
    assert "APIConnectionError" in metrics["failed"][0]["error"]
    assert "`q0`" in (tmp_path / "out" / "report.md").read_text()
