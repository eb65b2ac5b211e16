"""Dynamic batching: concurrent requests wait briefly in an asyncio queue and run as one ``predict_batch``.

One worker thread owns the model. The batching loop takes the first waiting job and every waiting job that may
share its generation, up to ``max_batch_size`` (1 turns batching off). It then waits for more only when more are
expected (:meth:`DynamicBatcher.company_expected`): a request the server has accepted but is still preparing
(decoding its images, marked with :meth:`DynamicBatcher.arriving`), clients just answered together by the
previous batch (they tend to come back together), or requests arriving closer together than ``max_wait_ms``.
A request that arrives alone starts generating at once. Once open, the window stays open ``max_wait_ms`` past
the latest joiner, and while requests are still being prepared, up to ``max_arrival_wait_ms`` after the first:
clients answered by one batch come back spread over a few tens of milliseconds, and a window that closes among
them splits them into smaller batches that then stay split.

Per-row settings that ``generate`` does not know about are handled by two logits processors: each request's
own sampling (temperature, ``top_p``, ``top_k``, penalties, ``logit_bias``, seed, log-probabilities) by
:class:`~citrus_v.serve.row_sampling.RowSampling`, and its ``max_tokens`` and ``stop`` strings, cancellation
after a timeout and streaming by :class:`RowControl`, which watches every step and ends a row by forcing its
end-of-turn token. So requests with different settings share one generation, and one request's settings
never reach another. Only a seeded sample runs alone: its answer then depends on its seed, not on the
requests it happened to share a batch with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..infer.predictor import CitrusVPredictor, EncodedRequest, Request
from ..infer.results import Prediction, cut_at_stop
from .row_sampling import RowSampling, SamplingParams, StepLogprobs

logger = logging.getLogger(__name__)

TextCallback = Callable[[str], None]


@dataclass(eq=False)  # jobs compare by identity (their requests hold arrays)
class Job:
    """One request waiting for generation, with its own limits."""

    request: Request
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    encoded: EncodedRequest | None = None  # the prompt encoded on arrival, off the generation thread
    on_text: TextCallback | None = None  # called from the worker thread with the text that is safe to show
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None
    enqueued: float = field(default_factory=time.monotonic)
    # called with the job's future once it is answered, failed or cancelled (e.g. to give back its memory)
    when_done: list[Callable[[asyncio.Future], None]] = field(default_factory=list)

    def group(self) -> tuple:
        """Jobs of one group may share a generation: all of them, except that a seeded sample runs alone."""
        if not self.sampling.greedy and self.sampling.seed is not None:
            return ("seeded", id(self))
        return ("shared",)


@dataclass
class JobResult:
    """A finished job: the prediction (text cut at a stop string), the OpenAI finish reason and usage, the
    generated token ids (before any stop-string cut) and, when the job asked, each token's log-probabilities."""

    prediction: Prediction
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    batch_size: int = 1
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[StepLogprobs] | None = None


class RowControl(LogitsProcessor):
    """Per-row limits inside one batched ``generate``: max tokens, stop strings, cancellation, streaming.

    ``steps`` is the generation's ``max_new_tokens``, the largest row limit: a row allowed that many tokens takes
    its last one at the last step, with no step after it to force an end-of-turn token, so that step records
    whether the token it takes (the greedy choice: ``generate`` runs greedy) ends the row or reaches its limit.
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        tokenizer,
        end_token_ids: Sequence[int],
        pad_token_id: int | None,
        steps: int | None = None,
    ):
        self.jobs = list(jobs)
        self.tokenizer = tokenizer
        self.end_token_ids = list(end_token_ids)
        self.pad_token_id = pad_token_id
        self.steps = steps if steps is not None else max((job.max_tokens for job in self.jobs), default=0) + 1
        self.prompt_length: int | None = None
        self.prompt_tokens = [0] * len(self.jobs)
        self.finished = [False] * len(self.jobs)
        self.stopped = [False] * len(self.jobs)
        self.at_limit = [False] * len(self.jobs)
        self.lengths: list[int | None] = [None] * len(self.jobs)
        self.calls = 0
        # text that could still become a stop string is held back from streaming
        self.holdback = [max((len(s) for s in job.stop), default=1) - 1 for job in self.jobs]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
            if self.pad_token_id is not None:
                self.prompt_tokens = (input_ids != self.pad_token_id).sum(dim=1).tolist()
            else:
                self.prompt_tokens = [input_ids.shape[1]] * len(self.jobs)
        self.calls += 1
        generated = input_ids[:, self.prompt_length :]
        last_step = generated.shape[1] + 1 >= self.steps
        for row, job in enumerate(self.jobs):
            if self.finished[row]:
                continue
            tokens = generated[row].tolist()
            if tokens and tokens[-1] in self.end_token_ids:
                self.finished[row] = True
                self.lengths[row] = len(tokens) - 1
                continue
            if len(tokens) >= job.max_tokens:
                self.at_limit[row] = True
            end = job.cancelled.is_set() or self.at_limit[row]
            if tokens and (job.stop or job.on_text is not None):
                text = self.tokenizer.decode(tokens, skip_special_tokens=False)
                if job.stop and any(s in text for s in job.stop):
                    self.stopped[row] = end = True
                elif job.on_text is not None:
                    safe = text[: len(text) - self.holdback[row]] if self.holdback[row] else text
                    job.on_text(safe.rstrip("\ufffd"))  # never show half of a multi-byte character
            if end:
                scores[row] = float("-inf")
                scores[row, self.end_token_ids[0]] = 0.0
            elif last_step:  # this row's token now is its last: it ends the row or reaches the row's limit
                self.finished[row] = True
                ends = int(scores[row].argmax()) in self.end_token_ids
                self.lengths[row] = len(tokens) + (0 if ends else 1)
                self.at_limit[row] = not ends
        return scores

    def completion_tokens(self, row: int) -> int:
        """Tokens generated for ``row`` before its end-of-turn token.

        A row ends with an end-of-turn token seen at a later step, at the last step (recorded there), or at the
        step where every row ended (``generate`` stops): then its tokens are those before that step.
        """
        length = self.lengths[row]
        return max(self.calls - 1, 0) if length is None else length


class DynamicBatcher:
    """Queue requests and run them through ``predictor.predict_batch`` in batches, one batch at a time.

    Args:
        predictor: the model; only ``predict_batch`` and ``processor`` are used.
        max_batch_size: most requests in one generation (1 = no batching).
        max_wait_ms: how long a batch waits for others to join, past the latest joiner, when others are
            expected (:meth:`company_expected`); a request that arrives alone does not wait.
        max_arrival_wait_ms: the longest a batch waits, from its first request, while requests keep joining or
            are still being prepared (with ``max_wait_ms = 0`` the batcher never waits).
    """

    def __init__(
        self,
        predictor: CitrusVPredictor,
        max_batch_size: int = 8,
        max_wait_ms: float = 10.0,
        max_arrival_wait_ms: float = 100.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}")
        if max_arrival_wait_ms < 0:
            raise ValueError(f"max_arrival_wait_ms must be 0 or more, got {max_arrival_wait_ms}")
        self.predictor = predictor
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_arrival_wait = float(max_arrival_wait_ms) / 1000.0 if max_wait_ms > 0 else 0.0
        self._arriving = 0  # requests being prepared; touched on the event loop only
        self._queue: asyncio.Queue[Job] | None = None
        self._pending: deque[Job] = deque()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: list[Job] = []
        self.batches_run = 0
        self.largest_batch = 0
        self.batch_sizes: Counter[int] = Counter()  # how many batches ran with each size
        # what the window's decision reads (event loop only): jobs not answered yet, the last arrival of a
        # request and its gap to the one before (when that one was still unanswered), the last batch
        self._unanswered = 0
        self._last_request: Request | None = None
        self._last_arrival: float | None = None
        self._arrival_gap: float | None = None
        self._last_batch_size = 0
        self._last_batch_end: float | None = None

    # --- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="citrus-v-generate")
        self._task = asyncio.create_task(self._loop(), name="citrus-v-batcher")

    async def close(self) -> None:
        """Stop taking jobs; jobs still waiting fail with ``CancelledError``."""
        running = list(self._running)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            self._pending.append(self._queue.get_nowait())
        for job in [*self._pending, *running]:
            job.cancelled.set()  # a generation in flight ends at its next step
            if job.future is not None and not job.future.done():
                job.future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        return len(self._pending) + (self._queue.qsize() if self._queue is not None else 0)

    @contextlib.contextmanager
    def arriving(self):
        """Mark a request being prepared (on the event loop) for the time of the ``with`` block.

        A batch being gathered waits for it (up to ``max_arrival_wait_ms``); submit its job right after the block.
        """
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; the returned future resolves to a :class:`JobResult` (or the error)."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started: call `await batcher.start()` first")
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        # a job abandoned after a timeout may still fail later: mark its error as seen
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        for callback in job.when_done:
            job.future.add_done_callback(callback)
        if job.request is not self._last_request:  # the choices of one request are one arrival
            now = loop.time()
            # a gap counts only between requests outstanding together: a lone client's next request comes
            # after its answer, however short the gap
            together = self._unanswered > 0 and self._last_arrival is not None
            self._arrival_gap = now - self._last_arrival if together else None
            self._last_arrival, self._last_request = now, job.request
        self._unanswered += 1
        job.future.add_done_callback(self._answered)
        self._queue.put_nowait(job)
        return job.future

    def _answered(self, _future: asyncio.Future) -> None:
        self._unanswered -= 1

    def company_expected(self, now: float) -> bool:
        """Whether a batch being formed at ``now`` should wait for more requests.

        Yes while a request is being prepared; when the last batch answered several clients and ended within
        ``max_arrival_wait_ms`` (they tend to come back together); and when the last request arrived less than
        ``max_wait_ms`` after another one that was still unanswered (requests come in faster than the window).
        Otherwise the request is alone, and waiting would only delay it.
        """
        if self.max_wait <= 0:
            return False
        if self._arriving:
            return True
        if self._last_batch_size > 1 and self._last_batch_end is not None:
            if now - self._last_batch_end <= max(self.max_wait, self.max_arrival_wait):
                return True
        return self._arrival_gap is not None and self._arrival_gap <= self.max_wait

    # --- the loop ---------------------------------------------------------------------------------------
    async def _next_batch(self) -> list[Job]:
        assert self._queue is not None
        first = self._pending.popleft() if self._pending else await self._queue.get()
        batch = [first]
        key = first.group()
        for job in list(self._pending):
            if len(batch) >= self.max_batch_size:
                break
            if job.group() == key:
                self._pending.remove(job)
                batch.append(job)
        self._take_queued(batch, key)
        loop = asyncio.get_running_loop()
        if len(batch) >= self.max_batch_size or not self.company_expected(loop.time()):
            return batch  # full, or nobody to wait for: start at once
        deadline = loop.time() + self.max_wait
        latest = loop.time() + max(self.max_wait, self.max_arrival_wait)
        while len(batch) < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                now = loop.time()
                if now >= deadline and self._arriving:
                    # a request is still being prepared: wait one more window, then look again
                    deadline = min(now + max(self.max_wait, 0.005), latest)
                remaining = deadline - now
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    continue  # the window is over unless requests are still being prepared
            if job.group() == key:
                batch.append(job)
            else:
                self._pending.append(job)
            deadline = max(deadline, min(loop.time() + self.max_wait, latest))  # more may follow this one
        return batch

    def _take_queued(self, batch: list[Job], key: tuple) -> None:
        """Move the jobs already queued into ``batch`` (those of its group, while there is room) or pending."""
        assert self._queue is not None
        while len(batch) < self.max_batch_size and not self._queue.empty():
            job = self._queue.get_nowait()
            (batch if job.group() == key else self._pending).append(job)

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._serve(batch)
            except Exception as err:  # the loop must outlive any one batch: fail that batch, go on
                logger.exception("batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)

    async def _serve(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.cancelled.is_set() and not job.future.done()]
        for job in batch:
            if job.cancelled.is_set() and not job.future.done():
                job.future.cancel()
        if not live:
            return
        self._running = live
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, live)
        finally:
            self._running = []
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(live))
        self.batch_sizes[len(live)] += 1
        self._last_batch_size, self._last_batch_end = len(live), asyncio.get_running_loop().time()
        for job, outcome in zip(live, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    # --- the worker thread --------------------------------------------------------------------------------
    def _run(self, jobs: list[Job]) -> list[JobResult | Exception]:
        try:
            return self._generate(jobs)
        except Exception as err:  # one bad request must not fail the others: retry them one by one
            if len(jobs) == 1:
                logger.warning("generation failed: %r", err)
                # StopIteration cannot travel through an asyncio future
                return [RuntimeError(f"generation failed: {err!r}") if isinstance(err, StopIteration) else err]
            logger.warning("a batch of %d failed (%s); running its requests one at a time", len(jobs), err)
            return [self._run([job])[0] for job in jobs]

    def _generate(self, jobs: list[Job]) -> list[JobResult]:
        predictor = self.predictor
        tokenizer = predictor.processor.tokenizer
        steps = max(job.max_tokens for job in jobs)  # the longest row's last token needs no step after it
        sampler = RowSampling([job.sampling for job in jobs], tokenizer.pad_token_id, steps)
        control = RowControl(jobs, tokenizer, predictor.eos_token_ids, tokenizer.pad_token_id, steps)
        # the sampler chooses each row's token, then the control may end the row instead; generate runs
        # greedy and takes what is left
        encoded = [job.encoded for job in jobs]
        predictions = predictor.predict_batch(
            [job.request for job in jobs],
            logits_processor=LogitsProcessorList([sampler, control]),
            encoded=encoded if all(item is not None for item in encoded) else None,
            max_new_tokens=steps,
            temperature=0.0,
        )
        results = []
        for row, (job, prediction) in enumerate(zip(jobs, predictions, strict=True)):
            prediction, stopped = cut_at_stop(prediction, job.stop)
            stopped = stopped or control.stopped[row]
            finish = "length" if control.at_limit[row] and not stopped else "stop"
            generated = control.completion_tokens(row)  # the tokens before the row's end: the sampler's choices
            record = sampler.logprobs[row]
            results.append(
                JobResult(
                    prediction=prediction,
                    finish_reason=finish,
                    prompt_tokens=int(control.prompt_tokens[row]),
                    completion_tokens=generated,
                    batch_size=len(jobs),
                    token_ids=sampler.chosen[row][:generated],
                    logprobs=None if record is None else record[:generated],
                )
            )
        return results


def run_in_batcher(batcher: DynamicBatcher, jobs: Sequence[Job]) -> list[Any]:
    """Run jobs through a batcher from synchronous code (tests and benchmarks): start, submit, close."""

    async def main() -> list[Any]:
        await batcher.start()
        try:
            futures = [batcher.submit(job) for job in jobs]
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await batcher.close()

    return asyncio.run(main())
