"""Upstream Citrus-V's users against ``citrus-v deploy``: the seed's deploy line, a client written the way
upstream's is (official ``openai`` client, ms-swift ``image`` parts, ``raw_response``), every request field
honoured or refused by name, per-request sampling inside one batch, and ``generation_config.json`` defaults."""

from __future__ import annotations

import base64
import json
import re
import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from citrus_v.infer import CitrusVPredictor, Request
from citrus_v.processing.boxes import BoxScaler
from citrus_v.processing.processor import CitrusVProcessor
from citrus_v.serve import commands
from citrus_v.serve.batching import DynamicBatcher, Job, run_in_batcher
from citrus_v.serve.generation_defaults import GenerationDefaults
from citrus_v.serve.row_sampling import RowSampling, SamplingParams
from citrus_v.serve.server import ServerSettings, create_app

from .conftest import phantom
from .test_serve_support import ScriptedPredictor, data_url, deployed_server, free_port, png_bytes, running_server

openai = pytest.importorskip("openai")

NAME = "CitrusV_8B"
SEED_ENV = {"MAX_PIXELS": "65535", "VIDEO_MAX_PIXELS": "50176", "FPS_MAX_FRAMES": "12"}
SEED_FLAGS = ("--served_model_name", NAME, "--infer_backend", "pt", "--torch_dtype", "bfloat16")
SEED_TEMPLATE = ("--template", "citrus_v_infer")
FILE_MAX_TOKENS = 5
FREE = "Free answer please."


def _scan(width: int = 200, height: int = 150) -> np.ndarray:
    """A phantom padded to a non-square size, so that original and model pixels differ."""
    image = phantom(3, size=height).image
    return np.pad(image, ((0, 0), (0, width - height)) + ((0, 0),) * (image.ndim - 2))


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode()


def _swift_message(image, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(np.uint8)


# --- a client written the way upstream's is (projects/inference_with_deploy.py, demo/citrusv_gradio_app.py) -----
def _upstream_masks(resp, size: tuple[int, int]) -> list[np.ndarray]:
    """``raw_response.seg_masks_rle`` decoded with pycocotools and resized to the original with nearest neighbour."""
    raw = getattr(resp, "raw_response", None)
    if raw is None:
        raw = resp.model_extra.get("raw_response")
    masks = [_decode(rle) for rle in raw["seg_masks_rle"]]
    return [np.array(Image.fromarray(mask).resize(size, resample=Image.NEAREST)) for mask in masks]


def _upstream_boxes(resp, size: tuple[int, int]) -> list[list[int]]:
    """The answer's ``bbox_2d`` boxes mapped back through ``image_grid_thw × 28``, truncated as upstream does."""
    grid = resp.model_extra["raw_response"]["image_grid_thw"][0]
    processed_w, processed_h = grid[2] * 28, grid[1] * 28
    boxes = []
    for match in re.findall(r'\{[^{}]*?"bbox_2d"\s*:\s*\[[^\[\]]+\][^{}]*?\}', resp.choices[0].message.content):
        x1, y1, x2, y2 = json.loads(match)["bbox_2d"]
        sx, sy = size[0] / processed_w, size[1] / processed_h
        boxes.append([int(x1 * sx), int(y1 * sy), int(x2 * sx), int(y2 * sy)])
    return boxes


def _grounding_masks(message) -> list[np.ndarray]:
    return [_decode(m["segmentation"]) for m in message.model_extra["grounding"]["masks"]]


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream-media")
    (root / "allowed").mkdir()
    (root / "allowed" / "scan.png").write_bytes(png_bytes(_scan()))
    (root / "outside.png").write_bytes(png_bytes(_scan()))
    return root


@pytest.fixture(scope="module")
def scripted(tiny, media_dir):
    """An in-process server whose answers are scripted by the prompt (the masks still come from SAM 2)."""
    model, processor = tiny
    settings = ServerSettings(
        served_model_name=NAME, allowed_local_media_path=media_dir / "allowed", max_image_pixels=300 * 300
    )
    with running_server(create_app(ScriptedPredictor(model, processor), settings)) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def predictor(tiny):
    model, processor = tiny
    return CitrusVPredictor(model, processor)


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


# --- the seed's deploy line ----------------------------------------------------------------------------------------
def test_the_seed_deploy_line_serves_an_upstream_style_client(tiny_dir, tmp_path):
    folder = tmp_path / "Citrus-V-tiny"
    shutil.copytree(tiny_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": FILE_MAX_TOKENS}))
    tokenizer = CitrusVProcessor.from_pretrained(folder).tokenizer
    force_seg = {"logit_bias": {str(tokenizer.convert_tokens_to_ids("[SEG]")): 100}}  # the random model says [SEG]
    scan = _scan(400, 300)  # 120000 pixels: MAX_PIXELS=65535 shrinks it
    port = free_port()  # the seed's --port 8000, on a port that is free here
    with deployed_server(folder, port, (*SEED_FLAGS, *SEED_TEMPLATE), env=SEED_ENV) as (_, log):
        client = openai.OpenAI(api_key="EMPTY", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        messages = _swift_message(f"data:image/png;base64,{_b64(scan)}", "please help segment the lesion in this scan.")
        resp = client.chat.completions.create(
            model=model, messages=messages, max_tokens=3, temperature=0, extra_body=force_seg
        )
        assert model == NAME and resp.choices[0].message.content == "[SEG][SEG][SEG]"
        expected = _grounding_masks(resp.choices[0].message)
        drawn = _upstream_masks(resp, (400, 300))
        assert len(drawn) == len(expected) == 3
        assert all(np.array_equal(a, b) for a, b in zip(drawn, expected, strict=True))
        # image_grid_thw × 28 is the image the model saw under MAX_PIXELS=65535, as the processor makes it
        grid = resp.model_extra["raw_response"]["image_grid_thw"]
        processor = CitrusVProcessor.from_pretrained(folder, max_pixels=65535)
        assert (grid[0][2] * 28, grid[0][1] * 28) == BoxScaler.for_processor(processor, 400, 300).model
        sample = {"messages": [{"role": "user", "content": "<image>hi"}], "images": [scan]}
        assert processor(sample, add_generation_prompt=True, return_labels=False)["image_grid_thw"][0].tolist() == [
            1,
            grid[0][1] * 2,
            grid[0][2] * 2,
        ]
        assert grid[0][1] * grid[0][2] * 28 * 28 <= 65535 < 400 * 300
        # generation_config.json gives the max_tokens of a request that names none
        default = client.chat.completions.create(model=model, messages=messages, extra_body=force_seg)
        assert default.usage.completion_tokens == FILE_MAX_TOKENS and default.choices[0].finish_reason == "length"
        log.seek(0)
        said = log.read()
    for line in (
        "MAX_PIXELS=65535: the vision tower's smart-resize bound",
        "VIDEO_MAX_PIXELS=50176: the most pixels a frame of a volume or clip is resized to",
        "FPS_MAX_FRAMES=12: the most frames of a clip, or slices of a volume",
        "--infer_backend pt: PyTorch generation",
        "--torch_dtype bfloat16: the model is loaded in torch.bfloat16",
        "--template citrus_v_infer: upstream's template name",
        f"--served_model_name {NAME}: clients send model='{NAME}'",
        f"max_tokens {FILE_MAX_TOKENS} (from generation_config.json)",
    ):
        assert line in said, said


def _run_deploy(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(["deploy", *argv])
    return args.func(args)


def test_deploy_refuses_what_it_cannot_honour_with_the_reason(tiny_dir, tmp_path, monkeypatch, capsys):
    assert _run_deploy(["--model", str(tiny_dir), "--infer_backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--infer_backend vllm is not supported" in err and "[SEG]" in err and "--infer_backend pt" in err
    monkeypatch.setenv("MAX_PIXELS", "lots")
    assert _run_deploy(["--model", str(tiny_dir)]) == 2
    assert "MAX_PIXELS='lots' is not a number" in capsys.readouterr().err
    monkeypatch.delenv("MAX_PIXELS")
    folder = tmp_path / "bad-generation-config"
    shutil.copytree(tiny_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 3.0}))
    assert _run_deploy(["--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "generation_config.json" in err and "top_p=3.0" in err
    with pytest.raises(SystemExit):
        _run_deploy(["--model", str(tiny_dir), "--template", "qwen2_5_vl"])


def test_every_ms_swift_variable_is_honoured_or_named_as_unused(tiny):
    from citrus_v.serve.deploy_flags import (
        DeployLineError,
        check_image_factor,
        environment_notes,
        read_environment,
    )

    environ = {**SEED_ENV, "MIN_PIXELS": "3136", "FPS": "2.0", "IMAGE_FACTOR": "28", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    found = read_environment(environ)
    processor = tiny[1]
    check_image_factor(found, processor)
    notes = environment_notes(found, processor, environ)
    assert len(notes) == len(found) + 1  # one line each, and one for CUDA_VISIBLE_DEVICES
    assert any(n.startswith("FPS=2.0: the rate a clip is sampled at") for n in notes)
    assert any(n.startswith("CUDA_VISIBLE_DEVICES=0,1,2,3:") and "not split" in n for n in notes)
    with pytest.raises(DeployLineError, match="IMAGE_FACTOR=32 does not match"):
        check_image_factor(read_environment({"IMAGE_FACTOR": "32"}), processor)
    with pytest.raises(DeployLineError, match="MIN_PIXELS='0' must be above 0"):
        read_environment({"MIN_PIXELS": "0"})


# --- requests: ms-swift image parts ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(scripted) -> dict:
    """The grounding of the segmentation answer when the image comes as an OpenAI ``image_url`` part."""
    url, _ = scripted
    part = {"type": "image_url", "image_url": {"url": data_url(png_bytes(_scan()))}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "Please segment the lesion."}]}]
    return _post(url, {"model": NAME, "messages": messages}).json()["choices"][0]["message"]["grounding"]


@pytest.mark.parametrize(
    "image",
    ["data URL", "bare base64", "relative path", "absolute path", "file URL", "url object", "image_url string"],
)
def test_ms_swift_image_parts_are_read_like_image_url(scripted, reference, media_dir, image):
    url, _ = scripted
    path = media_dir / "allowed" / "scan.png"
    values = {
        "data URL": data_url(png_bytes(_scan())),
        "bare base64": _b64(_scan()),
        "relative path": "scan.png",
        "absolute path": str(path),
        "file URL": path.as_uri(),
        "url object": {"url": data_url(png_bytes(_scan()))},
    }
    if image == "image_url string":
        part = {"type": "image_url", "image_url": data_url(png_bytes(_scan()))}
    else:
        part = {"type": "image", "image": values[image]}
    text = {"type": "text", "text": "Please segment the lesion."}
    response = _post(url, {"model": NAME, "messages": [{"role": "user", "content": [part, text]}]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["grounding"] == reference


@pytest.mark.parametrize(
    ("value", "status", "code"),
    [
        (base64.b64encode(b"not an image " * 40).decode(), 400, "invalid_image"),
        (_b64(np.zeros((400, 400), dtype=np.uint8)), 413, "image_too_large"),
        ("../outside.png", 400, "local_media_not_allowed"),
        ("http://example.com/scan.png", 400, "remote_media_not_allowed"),
    ],
)
def test_bad_ms_swift_image_parts_get_the_image_url_checks(scripted, value, status, code):
    url, _ = scripted
    response = _post(url, {"model": NAME, "messages": _swift_message(value, "Segment it.")})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "messages.0.content.0.image"


# --- response: raw_response ------------------------------------------------------------------------------------
def test_raw_response_draws_the_grounding_masks_and_maps_boxes_back(scripted, tiny):
    url, client = scripted
    messages = _swift_message(data_url(png_bytes(_scan())), "Please segment the lesion.")
    resp = client.chat.completions.create(model=NAME, messages=messages, temperature=0)
    expected = _grounding_masks(resp.choices[0].message)
    assert len(expected) == 2 and any(m.any() for m in expected)
    drawn = _upstream_masks(resp, (200, 150))
    assert all(np.array_equal(a, b) for a, b in zip(drawn, expected, strict=True))
    raw = resp.model_extra["raw_response"]
    grounding = resp.choices[0].message.model_extra["grounding"]
    assert raw["seg_masks_rle"] == [m["segmentation"] for m in grounding["masks"]]
    # boxes: upstream's client maps the answer's model pixels back through image_grid_thw × 28
    located = client.chat.completions.create(
        model=NAME, messages=_swift_message(_b64(_scan()), "Locate the lesion, output its bbox coordinates.")
    )
    ours = located.choices[0].message.model_extra["grounding"]["boxes"]
    theirs = _upstream_boxes(located, (200, 150))
    assert len(ours) == len(theirs) == 1
    assert np.allclose(ours[0]["bbox_2d"], theirs[0], atol=1.0)  # upstream truncates with int()
    assert BoxScaler.for_processor(tiny[1], 200, 150).model == (
        located.model_extra["raw_response"]["image_grid_thw"][0][2] * 28,
        located.model_extra["raw_response"]["image_grid_thw"][0][1] * 28,
    )
    # a streamed answer carries raw_response with its grounding; a text-only one has empty lists
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True))
    streamed = [c.model_extra["raw_response"] for c in chunks if (c.model_extra or {}).get("raw_response")]
    assert streamed == [raw]
    text_only = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello."}])
    assert text_only.model_extra["raw_response"] == {"seg_masks_rle": [], "image_grid_thw": []}


# --- request fields ----------------------------------------------------------------------------------------------
REFUSED = {
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "required",
    "functions": [{"name": "f"}],
    "function_call": {"name": "f"},
    "response_format": {"type": "json_object"},
    "store": True,
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "reasoning_effort": "high",
    "verbosity": "low",
    "web_search_options": {},
    "moderation": {"enabled": True},
    "num_beams": 4,
    "length_penalty": 2.0,
    "best_of": 3,
    "images": ["scan.png"],
    "audios": ["a.wav"],
    "videos": ["v.mp4"],
    "objects": {"ref": ["lesion"]},
    "logit_bias": {"not-a-token": 5},
    "top_logprobs": 2,
    "not_a_field": 1,
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_a_field_that_cannot_be_honoured_gets_a_400_naming_it(scripted, field):
    url, client = scripted
    response = _post(url, {"model": NAME, "messages": [{"role": "user", "content": "Hello."}], field: REFUSED[field]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert error["code"] in ("unsupported_parameter", "unknown_parameter", "invalid_value")


def test_neutral_values_and_metadata_are_accepted(scripted):
    url, _ = scripted
    ms_swift_defaults = {  # what ms-swift's own client sends for a plain request
        "max_tokens": None,
        "temperature": None,
        "top_k": None,
        "top_p": None,
        "repetition_penalty": None,
        "num_beams": 1,
        "stop": [],
        "seed": None,
        "stream": False,
        "logprobs": False,
        "top_logprobs": None,
        "n": 1,
        "best_of": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "length_penalty": 1.0,
        "images": [],
        "audios": [],
        "videos": [],
        "objects": {},
        "tools": None,
        "tool_choice": "none",
    }
    openai_metadata = {
        "user": "u-1",
        "safety_identifier": "s",
        "metadata": {"k": "v"},
        "prompt_cache_key": "c",
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "store": False,
        "response_format": {"type": "text"},
        "modalities": ["text"],
    }
    for extra in (ms_swift_defaults, openai_metadata):
        response = _post(url, {"model": NAME, "messages": [{"role": "user", "content": "Hello."}], **extra})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "The image shows a round bright lesion."
    too_many = _post(url, {"model": NAME, "messages": [{"role": "user", "content": "Hello."}], "n": 9})
    assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "n"


def test_n_choices_whole_and_streamed(scripted):
    url, client = scripted
    messages = _swift_message(data_url(png_bytes(_scan())), "Please segment the lesion.")
    one = client.chat.completions.create(model=NAME, messages=messages)
    three = client.chat.completions.create(model=NAME, messages=messages, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.model_extra["raw_response"] == one.model_extra["raw_response"]
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(model=NAME, messages=messages, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: one.choices[0].message.content, 1: one.choices[0].message.content}
    assert finishes == {0: "stop", 1: "stop"}


def test_logprobs_are_the_model_log_softmax_of_each_generated_token(predictor):
    image = phantom(1, size=128).image
    job = Job(Request([image], "<image>" + FREE), 6, SamplingParams(logprobs=True, top_logprobs=3))
    (result,) = run_in_batcher(DynamicBatcher(predictor, 1, 0), [job])
    assert len(result.logprobs) == len(result.token_ids) == result.completion_tokens == 6
    # the same tokens, teacher-forced through the model in one forward pass
    processor = predictor.processor
    sample = {"messages": [{"role": "user", "content": "<image>" + FREE}], "images": [image]}
    batch = processor(sample, add_generation_prompt=True, return_labels=False)
    prompt = batch["input_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], torch.tensor([result.token_ids])], dim=1)
    with torch.no_grad():
        logits = predictor.model.mllm(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=(ids == processor.image_token_id).int(),
        ).logits[0]
    expected = torch.log_softmax(logits[prompt - 1 : prompt - 1 + 6].float(), dim=-1)
    for step, (record, row) in enumerate(zip(result.logprobs, expected, strict=True)):
        assert record.token_id == result.token_ids[step] == int(row.argmax())  # greedy
        assert record.logprob == pytest.approx(float(row[record.token_id]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in record.top] == top.indices.tolist()
        assert [v for _, v in record.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_over_http_spell_the_answer(scripted):
    url, client = scripted
    messages = _swift_message(data_url(png_bytes(_scan())), "Please segment the lesion.")
    resp = client.chat.completions.create(model=NAME, messages=messages, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    assert bytes(b for t in content for b in t.bytes).decode() == resp.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    cut = client.chat.completions.create(model=NAME, messages=messages, logprobs=True, stop=["organ"])
    assert "".join(t.token for t in cut.choices[0].logprobs.content).startswith(cut.choices[0].message.content)
    streamed = client.chat.completions.create(model=NAME, messages=messages, logprobs=True, stream=True)
    tokens = [t.token for c in streamed for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert "".join(tokens) == resp.choices[0].message.content
    assert client.chat.completions.create(model=NAME, messages=messages).choices[0].logprobs is None


# --- per-request sampling in one batch --------------------------------------------------------------------------
def test_each_request_keeps_its_own_sampling_in_a_shared_batch(predictor, tiny):
    image = phantom(1, size=128).image
    request = Request([image], "<image>" + FREE)
    token = predictor.processor.tokenizer("lesion", add_special_tokens=False)["input_ids"][0]
    settings = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(temperature=1.5, top_k=1),  # only the most likely token is left: greedy
        SamplingParams(logit_bias={token: 100.0}),
        SamplingParams(frequency_penalty=2.0, presence_penalty=2.0),
    ]
    batcher = DynamicBatcher(predictor, 8, 200)
    together = run_in_batcher(batcher, [Job(request, 8, s) for s in settings])
    assert batcher.batches_run == 1 and {r.batch_size for r in together} == {5}
    alone = [run_in_batcher(DynamicBatcher(predictor, 1, 0), [Job(request, 8, s)])[0] for s in settings]
    texts = [r.prediction.text for r in together]
    assert texts == [r.prediction.text for r in alone]
    greedy, penalised, top_one, biased, frequency = together
    hf = predictor.predict_batch(
        [request], max_new_tokens=8, logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    )[0]
    assert penalised.prediction.text == hf.text != greedy.prediction.text
    assert top_one.prediction.text == greedy.prediction.text
    assert biased.token_ids == [token] * 8
    assert len(set(greedy.token_ids)) < len(set(frequency.token_ids))


def test_top_k_and_top_p_keep_what_transformers_keeps():
    torch.manual_seed(0)
    scores = torch.randn(2, 50)
    ids = torch.randint(0, 50, (2, 7))
    for top_k, top_p in ((5, 1.0), (0, 0.8), (7, 0.5)):
        params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, seed=top_k)
        expected = scores / 0.8
        if top_k:
            expected = TopKLogitsWarper(top_k)(ids, expected)
        expected = TopPLogitsWarper(top_p)(ids, expected) if top_p < 1 else expected
        sampler = RowSampling([params, params])
        for row in range(2):
            draws = {sampler.choose(row, params, scores[row].clone()) for _ in range(400)}
            kept = set(torch.isfinite(expected[row]).nonzero()[:, 0].tolist())
            assert draws <= kept and (draws == kept if len(kept) <= 5 else len(draws) > 5)
    penalised = RowSampling([SamplingParams(repetition_penalty=1.3)], pad_token_id=None)
    reference = RepetitionPenaltyLogitsProcessor(1.3)(ids[:1], scores[:1].clone())[0]
    assert torch.allclose(penalised.adjusted(penalised.params[0], ids[0], scores[0].clone()), reference)


# --- generation_config.json ---------------------------------------------------------------------------------------
def _with_generation_config(tiny_dir, tmp_path, config: dict):
    folder = tmp_path / "with-generation-config"
    shutil.copytree(tiny_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_generation_config_gives_the_defaults_and_a_request_overrides_them(predictor, tiny_dir, tmp_path):
    folder = _with_generation_config(
        tiny_dir,
        tmp_path,
        {"do_sample": True, "temperature": 0.9, "top_k": 1, "repetition_penalty": 1.5, "max_new_tokens": 6},
    )
    defaults = GenerationDefaults.from_folder(folder)
    assert (defaults.temperature, defaults.top_k, defaults.repetition_penalty, defaults.max_tokens) == (0.9, 1, 1.5, 6)
    image = data_url(png_bytes(phantom(1, size=128).image))
    body = {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image", "image": image}]}]}
    body["messages"][0]["content"].append({"type": "text", "text": FREE})
    app = create_app(predictor, ServerSettings(served_model_name=NAME, generation=defaults))
    with running_server(app) as url:
        from_file = _post(url, body).json()
        overridden = _post(url, {**body, "repetition_penalty": 1.0, "temperature": 0, "max_tokens": 3}).json()
    request = Request([phantom(1, size=128).image], "<image>" + FREE)
    penalty = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    expected = predictor.predict_batch([request], max_new_tokens=6, logits_processor=penalty)[0].text
    assert from_file["choices"][0]["message"]["content"] == expected  # top_k 1 samples the most likely token
    assert from_file["usage"]["completion_tokens"] == 6 and from_file["choices"][0]["finish_reason"] == "length"
    plain = predictor.predict_batch([request], max_new_tokens=3)[0].text
    assert overridden["choices"][0]["message"]["content"] == plain != expected[: len(plain)]
    # do_sample false: a request without a temperature is answered greedily, as ms-swift decides
    greedy_file = _with_generation_config(tiny_dir, tmp_path / "g", {"do_sample": False, "temperature": 0.7})
    assert GenerationDefaults.from_folder(greedy_file).temperature == 0.0
    flags = GenerationDefaults.from_folder(folder).with_flags(top_k=None, max_tokens=9)
    assert (flags.top_k, flags.max_tokens, flags.sources["max_tokens"]) == (1, 9, "--max_tokens")
