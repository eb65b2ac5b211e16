"""Dynamic batching: one generation for concurrent jobs, each with its own limits; bad jobs fail alone; a lone
request is not held for company; greedy rows are left to ``generate``'s own choice."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from citrus_v.infer import Request
from citrus_v.serve.batching import DynamicBatcher, Job, JobResult, run_in_batcher
from citrus_v.serve.row_sampling import RowSampling, SamplingParams

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


# --- the window opens only when there is someone to wait for ------------------------------------------------------
LONG_WAIT_MS = 20_000.0  # a window far longer than any generation here, even on a loaded machine


class CountingPredictor(ScriptedPredictor):
    """Records each generation: its batch size and ``max_new_tokens``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, int]] = []

    def predict_batch(self, requests, logits_processor=None, **generation):
        self.calls.append((len(requests), generation.get("max_new_tokens")))
        return super().predict_batch(requests, logits_processor=logits_processor, **generation)


@pytest.fixture()
def counting(tiny):
    model, processor = tiny
    return CountingPredictor(model, processor)


def test_a_lone_request_is_not_held_by_the_window(counting):
    """One client at a time (concurrency 1): each request starts at once, far inside a 20 s window."""
    batcher = DynamicBatcher(counting, 8, max_wait_ms=LONG_WAIT_MS, max_arrival_wait_ms=2 * LONG_WAIT_MS)

    async def main() -> list[float]:
        await batcher.start()
        latencies = []
        try:
            for seed in range(3):  # one after the other, as a lone client sends them
                start = time.monotonic()
                # a request held for the window would take 20 s: give up long before that
                await asyncio.wait_for(batcher.submit(Job(_segment(seed), 4)), LONG_WAIT_MS / 2000)
                latencies.append(time.monotonic() - start)
        finally:
            await batcher.close()
        return latencies

    latencies = asyncio.run(main())
    assert max(latencies) < LONG_WAIT_MS / 2000 and [size for size, _ in counting.calls] == [1, 1, 1]


def test_requests_that_come_together_still_share_a_batch(counting):
    """A burst shares one generation; its clients, answered together, come back a little apart and are waited
    for (the previous batch was shared), so they share the next one too."""
    batcher = DynamicBatcher(counting, 8, max_wait_ms=1000, max_arrival_wait_ms=10_000)

    async def main() -> tuple[list, list]:
        await batcher.start()
        try:
            burst = await asyncio.gather(*[batcher.submit(Job(_segment(s), 4)) for s in range(4)])
            returning = []
            for seed in range(4):  # each within the window of the one before
                returning.append(batcher.submit(Job(_segment(seed), 4)))
                await asyncio.sleep(0.05)
            return burst, await asyncio.gather(*returning)
        finally:
            await batcher.close()

    burst, returning = asyncio.run(main())
    assert [size for size, _ in counting.calls] == [4, 4]
    assert {r.batch_size for r in burst + returning} == {4} and batcher.batch_sizes == {4: 2}


def test_the_longest_row_takes_no_step_past_its_limit(counting):
    """``max_new_tokens`` is the largest ``max_tokens``: no forward pass runs only to force an end token."""
    tokenizer = counting.processor.tokenizer
    free = Request([], "Free answer please.")
    jobs = [Job(free, 5), Job(free, 5, SamplingParams(logprobs=True)), Job(_segment(1), 3), Job(_segment(2), 64)]
    plain, recorded, short, ended = run_in_batcher(DynamicBatcher(counting, 8, 200), jobs)
    assert counting.calls == [(4, 64)]
    # the free rows run to their limit: five tokens each, the fifth taken at the batch's last step or before
    assert plain.finish_reason == recorded.finish_reason == "length"
    assert plain.completion_tokens == len(plain.token_ids) == 5 == len(recorded.logprobs)
    assert plain.token_ids == recorded.token_ids  # generate's greedy choice = the sampler's own greedy choice
    assert plain.prediction.text == tokenizer.decode(plain.token_ids)
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert ended.finish_reason == "stop" and ended.prediction.text == "Sure, the lesion [SEG] and the organ [SEG]."

    # one row alone at its limit: the limit is the generation's last step
    (alone,) = run_in_batcher(DynamicBatcher(counting, 8, 0), [Job(free, 5)])
    assert counting.calls[-1] == (1, 5) and alone.token_ids == plain.token_ids and alone.finish_reason == "length"
    (at_end,) = run_in_batcher(DynamicBatcher(counting, 8, 0), [Job(_segment(3), len(ended.token_ids) + 1)])
    assert at_end.finish_reason == "stop" and at_end.completion_tokens == len(ended.token_ids)


def test_greedy_rows_are_left_to_generate_and_read_back():
    """A plain greedy row's logits pass through untouched; its token is read back from ``input_ids`` (or taken
    from the scores at the last step); a sampled row's logits become its one chosen token."""
    torch.manual_seed(0)
    scores = torch.randn(2, 50)
    sampler = RowSampling([SamplingParams(), SamplingParams(temperature=0.7, seed=3)], steps=2)
    ids = torch.zeros(2, 4, dtype=torch.long)
    out = sampler(ids, scores.clone())
    assert torch.equal(out[0], scores[0])
    sampled = int(out[1].argmax())
    assert torch.isfinite(out[1]).sum() == 1 and sampler.chosen[1] == [sampled] and sampler.chosen[0] == []
    taken = torch.tensor([[int(scores[0].argmax())], [sampled]])
    sampler(torch.cat([ids, taken], dim=1), scores.clone())  # the last of two steps
    assert sampler.chosen[0] == [int(scores[0].argmax())] * 2 and len(sampler.chosen[1]) == 2
