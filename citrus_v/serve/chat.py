"""The steps of a chat completion: check the key and the model, turn the body into one job per choice, run the
jobs through the batcher, and answer them whole (:meth:`ChatService.complete`) or streamed (``streaming``).

Turning the body into jobs reads every image's and video's header first and checks the whole request — the
number of images, their pixels together, the frames and voxels of its volumes and clips together, image, video
and text tokens against the context, and its memory estimate against the server's budget
(:mod:`~citrus_v.serve.request_budget`, :mod:`~citrus_v.serve.video_budget`, :mod:`~citrus_v.serve.admission`)
— and only then decodes the images and videos, holding the memory reserved for them until the request is
answered.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field, replace

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..infer.predictor import CitrusVPredictor
from .admission import MIB, MemoryAdmission, Reservation, default_inflight_memory_mb
from .batching import DynamicBatcher, Job, JobResult
from .errors import ApiError
from .grounding import to_grounding
from .logprobs import TokenTexts, choice_logprobs
from .media import MediaError, MediaPolicy, load_image_url, load_image_value
from .messages import Conversation, ImageSource, read_messages
from .protocol import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, RawResponse, Usage
from .raw_response import to_raw_response
from .request_budget import (
    MeasuredImage,
    MemoryModel,
    RequestLimits,
    check_context,
    check_image_count,
    check_images,
    count_tokens,
    read_headers,
)
from .request_fields import FieldRefused, check_fields, sampling_params
from .settings import ServerSettings
from .video_budget import MeasuredVideo, footprint, measure_videos, sam_frame_bytes, video_tokens
from .video_sources import VideoPolicy


def _itemsize(predictor) -> int:
    """Bytes per value of the model's weights and activations (4 when the predictor names no dtype)."""
    dtype = getattr(predictor, "dtype", None)
    return int(getattr(dtype, "itemsize", 4) or 4)


def _context_length(predictor) -> int | None:
    """The language model's context length (``max_position_embeddings``), when the config names one."""
    config = getattr(getattr(predictor, "model", None), "config", None)
    text_config = getattr(config, "text_config", None) or config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def _memory_model(predictor, itemsize: int) -> MemoryModel:
    """The memory model of ``predictor``'s checkpoint, with what SAM 2 holds per frame of a video and how many
    frames at once (a chunk per-frame, every frame with memory propagation)."""
    model = getattr(predictor, "model", None)
    base = MemoryModel.for_model(getattr(model, "config", None), itemsize, predictor.processor)
    segmenter = getattr(predictor, "volume_segmenter", None)
    memory = getattr(segmenter, "propagation", None) == "memory"
    return replace(
        base,
        per_sam_frame=sam_frame_bytes(model, predictor.processor, itemsize),
        sam_frames_held=None if memory else int(getattr(segmenter, "frames_per_chunk", base.sam_frames_held)),
        max_sam_frames=int(getattr(predictor, "max_frames", base.max_sam_frames)),
    )


@dataclass
class Measured:
    """A request's messages with every image and video measured from its headers, nothing decoded."""

    conversation: Conversation
    images: list[MeasuredImage]
    videos: list[MeasuredVideo] = field(default_factory=list)


def usage(results: list[JobResult]) -> Usage:
    """One prompt (the choices share it) and the tokens of every choice."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(result.completion_tokens for result in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatService:
    """What the routes share: the settings, the batcher running ``predictor``, the media policy, the request
    limits, the memory admission, and the steps of a chat completion."""

    def __init__(self, predictor: CitrusVPredictor, settings: ServerSettings) -> None:
        self.predictor = predictor
        self.settings = settings
        self.batcher = DynamicBatcher(predictor, settings.max_batch_size, settings.max_wait_ms)
        self.policy = MediaPolicy(
            settings.allowed_local_media_path, settings.max_image_pixels, settings.max_decoded_bytes
        )
        self.limits = RequestLimits(settings.max_images_per_request, settings.max_request_pixels)
        self.video_policy = VideoPolicy(
            settings.allowed_local_media_path, settings.max_video_frames, settings.max_video_voxels
        )
        budget = settings.max_inflight_memory_bytes or default_inflight_memory_mb() * MIB
        self.admission = MemoryAdmission(budget)
        self.memory = _memory_model(predictor, _itemsize(predictor))
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
        """The batcher's jobs for ``body`` (one per choice, sharing its decoded images); raises :class:`ApiError`
        for a request it refuses. Every check runs before the first image is decoded (see the module
        docstring); the request's memory is reserved while it is decoded and until its jobs are done."""
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
        measured = self.measure(body)
        reservation = self.admit(measured, body.n, max_tokens)
        request = self.decode(measured, reservation)
        encoded = self.encode(request, reservation)
        jobs = [
            Job(request=request, encoded=encoded, max_tokens=max_tokens, sampling=s, stop=body.stop_list())
            for s in sampling
        ]
        for job in jobs:
            job.when_done.append(reservation.done_one)
        return jobs

    def _load(self, source: ImageSource):
        return source.load(
            lambda url, param: load_image_url(url, self.policy, param),
            lambda value, param: load_image_value(value, self.policy, param),
        )

    def measure(self, body: ChatCompletionRequest) -> Measured:
        """The first pass: the messages checked and every image and video measured from its headers, nothing
        decoded; the request-wide image limits, and the video limits as each video is measured."""
        try:
            conversation = read_messages(body.messages)
            check_image_count(len(conversation.sources), self.limits)  # before a single header is read
            images = read_headers(conversation.sources, self.policy, self._load)
            check_images(images, self.limits)
            videos = measure_videos(conversation.videos, self.video_policy)
        except MediaError as err:
            raise ApiError(err.status, err.message, err.code, param=err.param) from err
        return Measured(conversation, images, videos)

    def admit(self, measured: Measured, choices: int, max_tokens: int):
        """Image, video and text tokens against the context, then the memory estimate reserved from the server's
        budget (413 when it alone passes the budget, 429 while requests in flight hold too much of it)."""
        conversation, processor = measured.conversation, self.predictor.processor
        headers = [image.header for image in measured.images]
        try:
            pads = [video_tokens(processor, video.header, video.source.param) for video in measured.videos]
        except MediaError as err:
            raise ApiError(err.status, err.message, err.code, param=err.param) from err
        tokens = count_tokens(processor, conversation.messages(), conversation.system, headers, pads)
        check_context(tokens, max_tokens, self.context_length, len(headers), len(pads))
        footprints = [footprint(processor, video) for video in measured.videos]
        # the body's image and video text, as sent and parsed
        held = sum(len(item.source.reference) for item in [*measured.images, *measured.videos])
        estimate = self.memory.estimate(headers, tokens, choices, max_tokens, held, footprints)
        return self.admission.reserve(estimate, holders=choices)

    def decode(self, measured: Measured, reservation: Reservation):
        """The second pass: every image and video decoded, in order; the reservation is given back if this
        fails, and at the latest when the request and its images are freed."""
        try:
            images = [image.load(self._load) for image in measured.images]
            videos = [video.decode() for video in measured.videos]
            request = measured.conversation.request(images, videos)
        except MediaError as err:
            reservation.release()
            raise ApiError(err.status, err.message, err.code, param=err.param) from err
        except BaseException:
            reservation.release()
            raise
        reservation.release_with(request)
        return request

    def encode(self, request, reservation: Reservation):
        """The prompt encoded now, in the request's own thread, so that the generation thread only pads the batch
        (a request the processor refuses is a 400, and gives its reservation back)."""
        try:
            return self.predictor.encode(request)
        except BaseException as err:
            reservation.release()
            self.raise_for(err)

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
