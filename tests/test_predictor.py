"""CitrusVPredictor: one generation pass, [SEG] masks equal to a two-pass reference, original-size masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LogitsProcessorList

from citrus_v.infer import CitrusVPredictor, Request
from citrus_v.infer.results import Prediction, seg_labels

from .conftest import phantom
from .forcing import ForceAnswer


def _forced(predictor: CitrusVPredictor, requests: list[Request], answer: str) -> LogitsProcessorList:
    samples = [predictor._sample(r, [predictor_image(i) for i in r.images]) for r in requests]
    batch = predictor.processor(samples, add_generation_prompt=True, padding_side="left", return_labels=False)
    ids = predictor.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    return LogitsProcessorList([ForceAnswer(ids, batch["input_ids"].shape[1])])


def predictor_image(image):
    from citrus_v.processing.images import load_image

    return load_image(image)


def _two_pass_masks(predictor: CitrusVPredictor, request: Request, text_ids: list[int]) -> np.ndarray:
    """Reference: re-run the full sequence (prompt + answer) and read the hidden states at [SEG]."""
    model, processor = predictor.model, predictor.processor
    image = predictor_image(request.images[0])
    sample = predictor._sample(request, [image])
    batch = processor(sample, add_generation_prompt=True, return_labels=False)
    ids = torch.cat([batch["input_ids"], torch.tensor([text_ids])], dim=1)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=(ids == processor.image_token_id).int(),
            sam_pixel_values=batch["sam_pixel_values"],
        )
    width, height = image.size
    logits = F.interpolate(out.pred_masks[0][:, None], size=(height, width), mode="bilinear")
    return (logits[:, 0].sigmoid() > 0.5).numpy()


@pytest.fixture(scope="module")
def predictor(tiny):
    model, processor = tiny
    return CitrusVPredictor(model, processor)


@pytest.mark.parametrize("num_seg", [1, 3])
def test_single_pass_masks_equal_the_two_pass_reference(predictor, num_seg):
    p = phantom(5, size=200)
    image = np.pad(p.image, ((0, 0), (0, 40)))  # 200 x 240: masks come back at the original size
    request = Request(images=[image], prompt="<image>Segment every target.")
    answer = "Sure, " + ", ".join(["lesion [SEG]", "organ [SEG]", "kidney [SEG]"][:num_seg]) + ".<|im_end|>"
    result = predictor.predict_batch([request], logits_processor=_forced(predictor, [request], answer))[0]
    assert result.num_seg_tokens == num_seg and len(result.masks) == num_seg
    assert result.image_size == (240, 200)
    text_ids = predictor.processor.tokenizer(answer.replace("<|im_end|>", ""), add_special_tokens=False)["input_ids"]
    reference = _two_pass_masks(predictor, request, text_ids)
    for k, mask in enumerate(result.masks):
        assert mask.mask.shape == (200, 240) and mask.mask.dtype == bool
        agreement = (mask.mask == reference[k]).mean()
        assert agreement > 0.999, f"mask {k} differs from the two-pass reference on {1 - agreement:.4%} of pixels"
        assert mask.index == k and isinstance(mask.score, float) and np.isfinite(mask.score)
    assert [m.label for m in result.masks] == ["lesion", "organ", "kidney"][:num_seg]


def test_batch_rows_get_their_own_masks(predictor):
    a, b = phantom(6), phantom(7)
    requests = [Request([a.image], "<image>Segment."), Request([b.image], "<image>Segment.")]
    answer = "Sure, it is [SEG].<|im_end|>"
    batched = predictor.predict_batch(requests, logits_processor=_forced(predictor, requests, answer))
    alone = [predictor.predict_batch([r], logits_processor=_forced(predictor, [r], answer))[0] for r in requests]
    for together, single in zip(batched, alone, strict=True):
        assert together.text == single.text == "Sure, it is [SEG]."
        assert (together.masks[0].mask == single.masks[0].mask).mean() > 0.999


def test_seg_as_last_token_is_completed(predictor):
    request = Request([phantom(8).image], "<image>Segment.")
    answer = "Sure, it is [SEG]"
    ids = predictor.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    result = predictor.predict_batch(
        [request], logits_processor=_forced(predictor, [request], answer), max_new_tokens=len(ids)
    )[0]
    assert result.text == answer and len(result.masks) == 1


def test_text_only_request_and_reasoning_parts(predictor):
    result = predictor.predict(None, "Hello", max_new_tokens=4)
    assert isinstance(result, Prediction) and result.masks == [] and result.image_size is None
    reasoned = Prediction(text="<think>bright spot on the left</think><answer>yes</answer>")
    assert reasoned.think == "bright spot on the left" and reasoned.answer == "yes"
    assert Prediction(text="plain").answer == "plain" and Prediction(text="plain").think is None


def test_seg_labels():
    assert seg_labels("Sure, the lesion [SEG] and the liver [SEG].", "[SEG]") == ["lesion", "liver"]
    assert seg_labels("Sure, it is [SEG].", "[SEG]") == [None]


def test_a_seed_gives_the_same_sample_and_leaves_the_process_random_state_alone(tiny):
    model, processor = tiny
    predictor = CitrusVPredictor(model, processor)
    image = phantom(3).image
    before = torch.get_rng_state()
    settings = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8}
    first = predictor.predict(image, "<image>Describe the scan.", seed=11, **settings).text
    assert torch.equal(torch.get_rng_state(), before)  # no process-wide reseeding
    torch.manual_seed(123)  # whatever the global state, the seed decides
    assert predictor.predict(image, "<image>Describe the scan.", seed=11, **settings).text == first
    others = {predictor.predict(image, "<image>Describe the scan.", seed=s, **settings).text for s in range(6)}
    assert len(others) > 1  # a random tiny model samples different answers for different seeds


def test_requests_encoded_ahead_answer_as_encoded_in_the_batch(predictor):
    requests = [
        Request(images=[phantom(1).image], prompt="<image>Segment the lesion."),
        Request(images=[phantom(2).image], prompt="<image>Is there a lesion?"),
    ]
    answer = "Sure, lesion [SEG].<|im_end|>"
    together = predictor.predict_batch(requests, logits_processor=_forced(predictor, requests, answer))
    encoded = [predictor.encode(request) for request in requests]
    ahead = predictor.predict_batch(requests, logits_processor=_forced(predictor, requests, answer), encoded=encoded)
    assert [r.text for r in ahead] == [r.text for r in together]
    for first, second in zip(together, ahead, strict=True):
        assert len(first.masks) == len(second.masks) == 1
        assert np.array_equal(first.masks[0].mask, second.masks[0].mask)


def test_sam_input_is_made_only_for_an_answer_with_a_seg_token(predictor, monkeypatch):
    request = Request(images=[phantom(3).image], prompt="<image>Is there a lesion?")
    answers = ("No.<|im_end|>", "Here: lesion [SEG].<|im_end|>")
    answer_no, answer_seg = (_forced(predictor, [request], answer) for answer in answers)
    made = []
    original = predictor.processor.sam_pixel_values
    monkeypatch.setattr(predictor.processor, "sam_pixel_values", lambda image: made.append(1) or original(image))
    no_seg = predictor.predict_batch([request], logits_processor=answer_no)[0]
    assert no_seg.masks == [] and made == []
    with_seg = predictor.predict_batch([request], logits_processor=answer_seg)[0]
    assert len(with_seg.masks) == 1 and made == [1]


def test_the_lm_head_is_column_major_in_float32_on_cpu_with_the_same_values(tiny):
    from citrus_v.infer.inference_layout import column_major_lm_head
    from citrus_v.recipes.presets import build_tiny

    model, _ = build_tiny(seed=0)
    before = model.mllm.lm_head.weight.detach().clone()
    column_major_lm_head(model)
    after = model.mllm.lm_head.weight
    assert not after.is_contiguous() and after.t().is_contiguous()
    assert torch.equal(after, before)
    hidden = torch.randn(3, before.shape[1])
    assert torch.allclose(model.mllm.lm_head(hidden), hidden @ before.t(), atol=1e-5)


def test_the_patch_embedding_runs_as_one_matrix_product_with_the_same_features_and_names(tiny, tiny_dir):
    from citrus_v.infer.inference_layout import LinearPatchEmbed, linear_patch_embed
    from citrus_v.recipes.presets import build_tiny

    model, processor = build_tiny(seed=0, video=False)
    visual = model.mllm.model.visual
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 168, 3), dtype=np.uint8))
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    names = sorted(model.state_dict())
    with torch.no_grad():
        before = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        linear_patch_embed(model)
        assert isinstance(visual.patch_embed, LinearPatchEmbed)
        after = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    assert torch.allclose(after, before, atol=1e-5)
    assert sorted(model.state_dict()) == names
    linear_patch_embed(model)  # applied twice: still one wrapper
    assert isinstance(visual.patch_embed.proj, torch.nn.Conv3d)
    # a predictor does it to a model it loads, and leaves a model it is handed computing as it did
    loaded = CitrusVPredictor.from_pretrained(tiny_dir)
    assert isinstance(loaded.model.mllm.model.visual.patch_embed, LinearPatchEmbed)
    handed = CitrusVPredictor(*tiny)
    assert not isinstance(handed.model.mllm.model.visual.patch_embed, LinearPatchEmbed)
