"""Dynamic batching: one generation for concurrent jobs, each with its own limits; bad jobs fail alone."""

from __future__ import annotations

import pytest

from citrus_v.infer import Request
from citrus_v.serve.batching import DynamicBatcher, Job, JobResult, run_in_batcher
from citrus_v.serve.row_sampling import SamplingParams

from .conftest import phantom
from .test_serve_support import PLAIN_ANSWER, SEGMENT_ANSWER, ScriptedPredictor


@pytest.fixture(scope="module")
def predictor(tiny):
    model, processor = tiny
    return ScriptedPredictor(model, processor)


def _segment(seed: int = 0) -> Request:
    return Request([phantom(seed, size=128).image], "<image>Please segment the lesion.")


def test_jobs_share_one_generation_but_keep_their_own_limits(predictor):
    batcher = DynamicBatcher(predictor, max_batch_size=8, max_wait_ms=200)
    tokenizer = predictor.processor.tokenizer
    jobs = [
        Job(_segment(1), max_tokens=3),
        Job(_segment(2), max_tokens=64, stop=["organ"]),
        Job(Request([], "Describe a normal film."), max_tokens=64),
    ]
    short, stopped, plain = run_in_batcher(batcher, jobs)
    assert batcher.batches_run == 1 and batcher.largest_batch == 3
    assert all(isinstance(r, JobResult) and r.batch_size == 3 for r in (short, stopped, plain))

    first_three = tokenizer.decode(tokenizer(SEGMENT_ANSWER, add_special_tokens=False)["input_ids"][:3])
    assert short.prediction.text == first_three
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert stopped.prediction.text == "Sure, the lesion [SEG] and the " and stopped.finish_reason == "stop"
    assert [m.label for m in stopped.prediction.masks] == ["lesion"]
    assert plain.prediction.text == PLAIN_ANSWER.replace("<|im_end|>", "") and plain.finish_reason == "stop"
    assert plain.prediction.masks == [] and plain.prompt_tokens < stopped.prompt_tokens  # no image tokens


def test_batched_masks_equal_masks_computed_alone(predictor):
    together = run_in_batcher(DynamicBatcher(predictor, 8, 200), [Job(_segment(s), 64) for s in (3, 4)])
    alone = [run_in_batcher(DynamicBatcher(predictor, 1, 0), [Job(_segment(s), 64)])[0] for s in (3, 4)]
    for a, b in zip(together, alone, strict=True):
        assert a.prediction.text == b.prediction.text == "Sure, the lesion [SEG] and the organ [SEG]."
        for x, y in zip(a.prediction.masks, b.prediction.masks, strict=True):
            assert (x.mask == y.mask).mean() > 0.999


def test_different_sampling_settings_share_a_batch_and_seeded_samples_run_alone(predictor):
    batcher = DynamicBatcher(predictor, max_batch_size=8, max_wait_ms=200)
    jobs = [
        Job(_segment(1), 8),
        Job(_segment(2), 8, SamplingParams(temperature=0.7, top_p=0.9)),
        Job(_segment(3), 8, SamplingParams(repetition_penalty=1.3, top_k=5)),
        Job(_segment(4), 8, SamplingParams(temperature=0.7, seed=1)),
        Job(_segment(5), 8, SamplingParams(temperature=0.7, seed=1)),
    ]
    results = run_in_batcher(batcher, jobs)
    assert all(isinstance(r, JobResult) for r in results)
    # each row samples with its own settings, so the unseeded ones share one generation; a seeded one runs alone
    assert batcher.batches_run == 3 and [r.batch_size for r in results] == [3, 3, 3, 1, 1]


def test_max_batch_size_one_turns_batching_off(predictor):
    batcher = DynamicBatcher(predictor, max_batch_size=1, max_wait_ms=200)
    results = run_in_batcher(batcher, [Job(_segment(s), 4) for s in range(3)])
    assert batcher.batches_run == 3 and {r.batch_size for r in results} == {1}


def test_a_bad_job_fails_alone(predictor):
    batcher = DynamicBatcher(predictor, max_batch_size=8, max_wait_ms=200)
    bad = Request([phantom(0, size=64).image], "Two placeholders: <image> <image>")
    results = run_in_batcher(batcher, [Job(_segment(1), 16), Job(bad, 16), Job(_segment(2), 16)])
    assert isinstance(results[1], ValueError) and "placeholder" in str(results[1])
    assert [r.prediction.text for r in (results[0], results[2])] == ["Sure, the lesion [SEG] and the organ [SEG]."] * 2


def test_bad_settings_are_refused(predictor):
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(predictor, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        DynamicBatcher(predictor, max_wait_ms=-1)


def test_an_exception_that_futures_cannot_carry_still_fails_cleanly(predictor):
    class Broken:
        processor = predictor.processor
        eos_token_ids = predictor.eos_token_ids

        def predict_batch(self, requests, logits_processor=None, **generation):
            raise StopIteration  # what a model raises when its inputs do not line up

    (result,) = run_in_batcher(DynamicBatcher(Broken(), 4, 0), [Job(_segment(1), 4)])
    assert isinstance(result, RuntimeError) and "StopIteration" in str(result)
