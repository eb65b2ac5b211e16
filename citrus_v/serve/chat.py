"""The steps of a chat completion: check the key and the model, turn the body into one job per choice, run the
jobs through the batcher, and answer them whole (:meth:`ChatService.complete`) or streamed (``streaming``)."""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..infer.predictor import CitrusVPredictor
from .batching import DynamicBatcher, Job, JobResult
from .errors import ApiError
from .grounding import to_grounding
from .logprobs import TokenTexts, choice_logprobs
from .media import MediaError, MediaPolicy, load_image_url, load_image_value
from .messages import to_request
from .protocol import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, RawResponse, Usage
from .raw_response import to_raw_response
from .request_fields import FieldRefused, check_fields, sampling_params
from .settings import ServerSettings


def _context_length(predictor) -> int | None:
    """The language model's context length (``max_position_embeddings``), when the config names one."""
    config = getattr(getattr(predictor, "model", None), "config", None)
    text_config = getattr(config, "text_config", None) or config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def usage(results: list[JobResult]) -> Usage:
    """One prompt (the choices share it) and the tokens of every choice."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(result.completion_tokens for result in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatService:
    """What the routes share: the settings, the batcher running ``predictor``, the media policy, and the steps
    of a chat completion."""

    def __init__(self, predictor: CitrusVPredictor, settings: ServerSettings) -> None:
        self.predictor = predictor
        self.settings = settings
        self.batcher = DynamicBatcher(predictor, settings.max_batch_size, settings.max_wait_ms)
        self.policy = MediaPolicy(settings.allowed_local_media_path, settings.max_image_pixels)
        self.created = int(time.time())
        self.context_length = _context_length(predictor)
        tokenizer = predictor.processor.tokenizer
        self.texts = TokenTexts(tokenizer)
        self.vocab_size = len(tokenizer)

    def require_key(self, request: Request) -> None:
        """The API-key check every ``/v1`` route depends on (none when the server has no key)."""
        if self.settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", "missing_api_key")
        if not secrets.compare_digest(token.strip().encode(), self.settings.api_key.encode()):
            raise ApiError(401, "incorrect API key", "invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.settings.served_model_name:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.settings.served_model_name!r}",
                "model_not_found",
                param="model",
            )

    def jobs(self, body: ChatCompletionRequest) -> list[Job]:
        """The batcher's jobs for ``body`` (one per choice, sharing its loaded images); raises :class:`ApiError`
        for a request it refuses."""
        settings = self.settings
        self.check_model(body.model)
        try:
            check_fields(body)
            sampling = [sampling_params(body, settings.generation, self.vocab_size, i) for i in range(body.n)]
        except FieldRefused as err:
            raise ApiError(400, str(err), err.code, param=err.field) from err
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.generation.max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                "max_tokens_too_large",
                param="max_tokens",
            )
        try:
            request = to_request(
                body.messages,
                lambda url, param: load_image_url(url, self.policy, param),
                lambda value, param: load_image_value(value, self.policy, param),
            )
        except MediaError as err:
            raise ApiError(err.status, err.message, err.code, param=err.param) from err
        self.check_length(request, max_tokens)
        return [Job(request=request, max_tokens=max_tokens, sampling=s, stop=body.stop_list()) for s in sampling]

    def check_length(self, request, max_tokens: int) -> None:
        context_length = self.context_length
        if context_length is None:
            return
        text = "".join(str(m["content"]) for m in request.history) + request.prompt + (request.system or "")
        tokens = len(self.predictor.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokens + max_tokens > context_length:
            raise ApiError(
                400,
                f"the messages hold {tokens} text tokens and max_tokens is {max_tokens}: more than the model's "
                f"context length of {context_length}; shorten the messages or lower max_tokens",
                "context_length_exceeded",
                param="messages",
            )

    @staticmethod
    def raise_for(err: BaseException) -> None:
        from ..processing.processor import ProcessorError

        if isinstance(err, ProcessorError):
            raise ApiError(400, f"the request cannot be encoded: {err}", "invalid_message") from err
        raise err

    def choice(self, index: int, result: JobResult) -> Choice:
        """Choice ``index`` of the answer: its text, grounding (RLE-encoding takes a while: call off the loop)
        and log-probabilities."""
        prediction = result.prediction
        message = AssistantMessage(
            content=prediction.text, reasoning_content=prediction.think, grounding=to_grounding(prediction)
        )
        logprobs = choice_logprobs(result.logprobs, self.texts, prediction.text)
        return Choice(index=index, message=message, finish_reason=result.finish_reason, logprobs=logprobs)

    def raw_response(self, first: Choice, job: Job) -> RawResponse:
        """Upstream's compatibility object for the first choice."""
        return to_raw_response(first.message.grounding, job.request.images, self.predictor.processor)

    async def complete(self, jobs: list[Job], completion_id: str, model: str) -> ChatCompletion:
        """Run ``jobs`` and answer them whole; 504 past the request timeout (the jobs are then cancelled)."""
        timeout = self.settings.request_timeout
        gathered = asyncio.gather(*[self.batcher.submit(job) for job in jobs])
        try:
            results: list[JobResult] = await asyncio.wait_for(asyncio.shield(gathered), timeout)
        except TimeoutError:
            _cancel(jobs)
            raise ApiError(
                504,
                f"generation took longer than the request timeout of {timeout:g} s and was cancelled",
                "timeout",
                "timeout_error",
            ) from None
        except asyncio.CancelledError:
            _cancel(jobs)
            raise
        except Exception as err:  # noqa: BLE001 - mapped to an API error or re-raised
            _cancel(jobs)
            self.raise_for(err)
        choices = [await run_in_threadpool(self.choice, i, result) for i, result in enumerate(results)]
        return ChatCompletion(
            id=completion_id,
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage(results),
            raw_response=self.raw_response(choices[0], jobs[0]),
        )


def _cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled.set()
