"""The OpenAI-compatible HTTP server: ``create_app(predictor, settings)`` returns a FastAPI app.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events with ``stream: true``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``. Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input (400 malformed JSON or
unusable image/message, 401 API key, 404 unknown model, 413 body or image too large, 422 fields of the wrong
type or range) and 504 when generation exceeds ``request_timeout``; a bad request never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.predictor import CitrusVPredictor
from .batching import DynamicBatcher, Job, JobResult
from .grounding import to_grounding
from .limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from .media import DEFAULT_MAX_IMAGE_PIXELS, MediaError, MediaPolicy, load_image_url
from .messages import to_request
from .protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Usage,
    error_body,
)

logger = logging.getLogger(__name__)


# A smaller temperature overflows the softmax; it means "deterministic", so it is served greedily.
MIN_TEMPERATURE = 1e-5
# torch.manual_seed takes [-2**63, 2**64); any JSON integer maps into it, so no seed is refused.
SEED_MODULUS = 2**64


@dataclass
class ServerSettings:
    """What ``citrus-v deploy`` configures (flag names as upstream's ``swift deploy`` where it has them)."""

    served_model_name: str
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    request_timeout: float = 300.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_max_tokens: int = 512
    max_tokens_limit: int = 8192


class ApiError(Exception):
    """An error answered as an OpenAI-style body with ``status``."""

    def __init__(
        self, status: int, message: str, code: str, type_: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param


def _error(status: int, message: str, code: str | None, type_: str = "invalid_request_error", param=None):
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


_ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed JSON, an unusable image or message",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "request body or image too large",
        422: "a field of the wrong type or out of range",
        504: "generation took longer than the request timeout",
    }.items()
}


def _validation_error(err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "invalid JSON")
        return _error(400, f"the request body is not valid JSON: {reason}", "invalid_json")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return _error(422, f"{param or 'body'}: {message}{more}", "invalid_value", param=param)


def _context_length(predictor) -> int | None:
    """The language model's context length (``max_position_embeddings``), when the config names one."""
    config = getattr(getattr(predictor, "model", None), "config", None)
    text_config = getattr(config, "text_config", None) or config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def create_app(predictor: CitrusVPredictor, settings: ServerSettings) -> FastAPI:
    """Build the FastAPI app serving ``predictor`` under ``settings.served_model_name``."""
    chat = _ChatService(predictor, settings)
    batcher = chat.batcher

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(
        title="Citrus-V",
        version="1",
        summary="OpenAI-compatible chat completions with boxes and masks in a `grounding` object",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    _add_error_handlers(app)
    _add_model_routes(app, chat)
    _add_chat_route(app, chat)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style body: API errors, invalid requests, HTTP errors and anything unexpected."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.code, err.type, err.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        response = _error(err.status_code, str(err.detail), code)
        response.headers.update(err.headers or {})  # e.g. `Allow` on 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return _error(500, f"internal error: {type(err).__name__}", "internal_error", "server_error")


def _add_model_routes(app: FastAPI, chat: _ChatService) -> None:
    """``GET /health``, ``GET /v1/models`` and ``GET /v1/models/{model_id}``."""
    settings = chat.settings

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=settings.served_model_name, queued=chat.batcher.queued)

    @app.get(
        "/v1/models", response_model=ModelList, dependencies=[Depends(chat.require_key)], responses=_ERROR_RESPONSES
    )
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.served_model_name, created=chat.created)])

    @app.get(
        "/v1/models/{model_id}",
        response_model=ModelCard,
        dependencies=[Depends(chat.require_key)],
        responses=_ERROR_RESPONSES,
    )
    async def get_model(model_id: str) -> ModelCard:
        chat.check_model(model_id)
        return ModelCard(id=settings.served_model_name, created=chat.created)


def _add_chat_route(app: FastAPI, chat: _ChatService) -> None:
    """``POST /v1/chat/completions``: one JSON answer, or server-sent events with ``stream: true``."""

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        dependencies=[Depends(chat.require_key)],
        responses={**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatCompletionRequest):
        with chat.batcher.arriving():  # a batch being gathered waits for this request
            job = await run_in_threadpool(chat.job, body)  # image decoding stays off the event loop
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                chat.stream(job, completion_id, body.model, include_usage), media_type="text/event-stream"
            )
        return await chat.complete(job, completion_id, body.model)


def _usage(result: JobResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


class _ChatService:
    """What the routes share: the settings, the batcher running ``predictor``, the media policy, and the steps
    of a chat completion (check the key and the model, turn the body into a job, answer it whole or streamed)."""

    def __init__(self, predictor: CitrusVPredictor, settings: ServerSettings) -> None:
        self.predictor = predictor
        self.settings = settings
        self.batcher = DynamicBatcher(predictor, settings.max_batch_size, settings.max_wait_ms)
        self.policy = MediaPolicy(settings.allowed_local_media_path, settings.max_image_pixels)
        self.created = int(time.time())
        self.context_length = _context_length(predictor)

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

    def job(self, body: ChatCompletionRequest) -> Job:
        """The batcher's job for ``body``, its images loaded; raises :class:`ApiError` for a request it refuses."""
        settings = self.settings
        self.check_model(body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                "max_tokens_too_large",
                param="max_tokens",
            )

        def load(url: str, param: str):
            return load_image_url(url, self.policy, param)

        try:
            request = to_request(body.messages, load)
        except MediaError as err:
            raise ApiError(err.status, err.message, err.code, param=err.param) from err
        self.check_length(request, max_tokens)
        temperature = body.temperature if body.temperature is not None else 0.0
        return Job(
            request=request,
            max_tokens=max_tokens,
            temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            seed=body.seed % SEED_MODULUS if body.seed is not None else None,
            stop=body.stop_list(),
        )

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

    async def complete(self, job: Job, completion_id: str, model: str) -> ChatCompletion:
        """Run ``job`` and answer it whole; 504 past the request timeout (the job is then cancelled)."""
        timeout = self.settings.request_timeout
        future = self.batcher.submit(job)
        try:
            result: JobResult = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            job.cancelled.set()
            raise ApiError(
                504,
                f"generation took longer than the request timeout of {timeout:g} s and was cancelled",
                "timeout",
                "timeout_error",
            ) from None
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        except Exception as err:  # noqa: BLE001 - mapped to an API error or re-raised
            self.raise_for(err)
        prediction = result.prediction
        grounding = await run_in_threadpool(to_grounding, prediction)  # RLE-encoding large masks takes a while
        return ChatCompletion(
            id=completion_id,
            created=int(time.time()),
            model=model,
            choices=[
                Choice(
                    message=AssistantMessage(
                        content=prediction.text, reasoning_content=prediction.think, grounding=grounding
                    ),
                    finish_reason=result.finish_reason,
                )
            ],
            usage=_usage(result),
        )

    async def stream(self, job: Job, completion_id: str, model: str, include_usage: bool) -> AsyncIterator[str]:
        """Run ``job`` and answer it as server-sent events: the text as it grows, then the grounding, the finish
        reason and (when asked) the usage; an error after the status line is sent is reported in the stream."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[str | None] = asyncio.Queue()
        job.on_text = lambda text: loop.call_soon_threadsafe(updates.put_nowait, text)
        future = self.batcher.submit(job)
        future.add_done_callback(lambda _: updates.put_nowait(None))
        created_at = int(time.time())

        def event(delta: Delta, finish: str | None = None, usage: Usage | None = None, choices=True) -> str:
            chunk = ChatCompletionChunk(
                id=completion_id,
                created=created_at,
                model=model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else [],
                usage=usage,
            )
            return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

        deadline = loop.time() + self.settings.request_timeout
        sent = ""
        try:
            yield event(Delta(role="assistant", content=""))
            while True:
                text = await asyncio.wait_for(updates.get(), max(deadline - loop.time(), 0.0))
                if text is None:
                    break
                if text.startswith(sent) and len(text) > len(sent):
                    yield event(Delta(content=text[len(sent) :]))
                    sent = text
            result: JobResult = future.result()
            prediction = result.prediction
            rest = prediction.text[len(sent) :] if prediction.text.startswith(sent) else ""
            grounding = await run_in_threadpool(to_grounding, prediction)
            yield event(Delta(content=rest, reasoning_content=prediction.think, grounding=grounding))
            yield event(Delta(), finish=result.finish_reason)
            if include_usage:
                yield event(Delta(), usage=_usage(result), choices=False)
        except TimeoutError:
            message = f"generation took longer than the request timeout of {self.settings.request_timeout:g} s"
            yield f"data: {json.dumps(error_body(message, 'timeout_error', 'timeout'))}\n\n"
        except Exception as err:  # noqa: BLE001 - the status line is sent: report in the stream
            logger.warning("streamed generation failed: %s", err)
            yield f"data: {json.dumps(error_body(f'generation failed: {err}', 'server_error', 'internal_error'))}\n\n"
        finally:
            if not future.done():
                job.cancelled.set()
        yield "data: [DONE]\n\n"


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=host, port=port, log_level=log_level)
