"""A streamed chat completion: server-sent events for one or more choices generated side by side.

Each choice's text arrives as it grows (the part that can no longer become a stop string). When a choice ends,
its last content event carries the rest of its text, its ``grounding`` and, when asked, its ``logprobs`` (all
of its tokens in that one event); choice 0's also carries the top-level ``raw_response``. Then comes the
choice's finish reason, and at the end the usage when ``stream_options.include_usage`` asks for it. An error
after the status line has gone out is reported as an error event (an unexpected one with the request id under
which its traceback is logged); ``data: [DONE]`` always ends the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from .batching import Job, JobResult
from .chat import ChatService, usage
from .errors import ApiError
from .protocol import ChatCompletionChunk, ChunkChoice, Delta, RawResponse, Usage, error_body

logger = logging.getLogger(__name__)


class _Events:
    """Formats the events of one stream."""

    def __init__(self, completion_id: str, model: str) -> None:
        self.completion_id, self.model, self.created = completion_id, model, int(time.time())

    def __call__(
        self,
        choices: list[ChunkChoice],
        usage: Usage | None = None,
        raw_response: RawResponse | None = None,
    ) -> str:
        chunk = ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            raw_response=raw_response,
        )
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"


def _error_event(chat: ChatService, err: Exception, request_id: str | None) -> str:
    """The event reporting ``err``: a request the model cannot take as its API error, anything else as a bug
    logged with its traceback under ``request_id``."""
    try:
        chat.raise_for(err)
    except ApiError as api:
        return f"data: {json.dumps(error_body(api.message, api.type, api.code, api.param))}\n\n"
    except Exception:  # noqa: BLE001 - raise_for gives back what it does not map
        pass
    logger.error("request %s: streamed generation failed", request_id, exc_info=err)
    message = (
        f"generation failed ({type(err).__name__}) while serving request {request_id}; this is a bug in the "
        "server: report the request id to the operator, whose log holds the traceback"
    )
    return f"data: {json.dumps(error_body(message, 'server_error', 'internal_error'))}\n\n"


async def _final(chat: ChatService, events: _Events, index: int, job: Job, result: JobResult, sent: str) -> list[str]:
    """The closing events of choice ``index``: the rest of its text with grounding and logprobs, its finish."""
    choice = await run_in_threadpool(chat.choice, index, result)
    text = choice.message.content
    rest = text[len(sent) :] if text.startswith(sent) else ""
    delta = Delta(content=rest, reasoning_content=choice.message.reasoning_content, grounding=choice.message.grounding)
    raw = chat.raw_response(choice, job) if index == 0 else None
    return [
        events([ChunkChoice(index=index, delta=delta, logprobs=choice.logprobs)], raw_response=raw),
        events([ChunkChoice(index=index, delta=Delta(), finish_reason=result.finish_reason)]),
    ]


async def stream_completion(
    chat: ChatService,
    jobs: list[Job],
    completion_id: str,
    model: str,
    include_usage: bool,
    request_id: str | None = None,
) -> AsyncIterator[str]:
    """Run ``jobs`` (one per choice) and answer them as server-sent events (see the module docstring)."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
    futures = []
    for index, job in enumerate(jobs):
        job.on_text = lambda text, i=index: loop.call_soon_threadsafe(updates.put_nowait, (i, text))
        future = chat.batcher.submit(job)
        future.add_done_callback(lambda _, i=index: updates.put_nowait((i, None)))
        futures.append(future)
    events = _Events(completion_id, model)
    timeout = chat.settings.request_timeout
    deadline = loop.time() + timeout
    sent = [""] * len(jobs)
    finished: set[int] = set()
    try:
        for index in range(len(jobs)):
            yield events([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        while len(finished) < len(jobs):
            index, text = await asyncio.wait_for(updates.get(), max(deadline - loop.time(), 0.0))
            if text is None:
                finished.add(index)
                for event in await _final(chat, events, index, jobs[index], futures[index].result(), sent[index]):
                    yield event
            elif text.startswith(sent[index]) and len(text) > len(sent[index]):
                yield events([ChunkChoice(index=index, delta=Delta(content=text[len(sent[index]) :]))])
                sent[index] = text
        if include_usage:
            yield events([], usage=usage([future.result() for future in futures]))
    except TimeoutError:
        message = f"generation took longer than the request timeout of {timeout:g} s"
        yield f"data: {json.dumps(error_body(message, 'timeout_error', 'timeout'))}\n\n"
    except Exception as err:  # noqa: BLE001 - the status line is sent: report in the stream
        yield _error_event(chat, err, request_id)
    finally:
        for job, future in zip(jobs, futures, strict=True):
            if not future.done():
                job.cancelled.set()
    yield "data: [DONE]\n\n"
