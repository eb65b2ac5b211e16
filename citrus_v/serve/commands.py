"""``citrus-v deploy``: serve a model folder over the OpenAI-compatible API.

Upstream's deploy line runs as written with ``citrus-v deploy`` in place of ``swift deploy`` (see
:mod:`citrus_v.serve.deploy_flags`); the server prints what each flag and variable it was given maps to.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..cli_parser import MODEL_HELP
from .deploy_flags import INFER_BACKENDS, TEMPLATES, TORCH_DTYPES

_FILE = "; none given: the checkpoint's generation_config.json, else neutral"


def _flags() -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """The flags of ``deploy`` (names as upstream's ``swift deploy`` where it has them): names and options."""
    from .limits import DEFAULT_BODY_TIMEOUT_S
    from .media import DEFAULT_MAX_IMAGE_PIXELS

    levels = ["critical", "error", "warning", "info", "debug"]
    return [
        (("--model",), {"required": True, "help": MODEL_HELP}),
        (("--port",), {"type": int, "default": 8000, "help": "port to listen on"}),
        (("--host",), {"default": "127.0.0.1", "help": "address to bind (127.0.0.1: this machine only)"}),
        (("--served_model_name",), {"help": "the model name clients send (none given: the folder's name)"}),
        (
            ("--api_key",),
            {
                "default": os.environ.get("CITRUS_V_API_KEY"),
                "help": "require 'Authorization: Bearer KEY' (taken from $CITRUS_V_API_KEY when set; none: anyone who "
                "can reach the port may use the server; an empty key is refused)",
            },
        ),
        (("--allowed_local_media_path",), {"help": "folder whose files requests may name as images"}),
        (
            ("--infer_backend",),
            {"choices": INFER_BACKENDS, "help": "generation backend: only pt (PyTorch, the default) is served"},
        ),
        (
            ("--torch_dtype",),
            {"choices": TORCH_DTYPES, "help": "load the model in this dtype (none given: as the checkpoint loads)"},
        ),
        (("--template",), {"choices": TEMPLATES, "help": "upstream's template name; both mean the model's own"}),
        (("--max_batch_size",), {"type": int, "default": 8, "help": "most requests per generation (1: no batching)"}),
        (
            ("--max_wait_ms",),
            {
                "type": float,
                "default": 10.0,
                "help": "how long a batch waits for more requests when more are expected, past the latest one (ms); "
                "a request that arrives alone starts at once",
            },
        ),
        (("--request_timeout",), {"type": float, "default": 300.0, "help": "seconds before a request gets 504"}),
        (
            ("--body_timeout",),
            {
                "type": float,
                "default": DEFAULT_BODY_TIMEOUT_S,
                "help": "seconds a client may pause while sending a request body before it gets 408 and the "
                "connection is closed (a slow but steady upload is never cut)",
            },
        ),
        (
            ("--max_image_pixels",),
            {"type": int, "default": DEFAULT_MAX_IMAGE_PIXELS, "help": "largest image accepted, width × height"},
        ),
        (("--max_body_mb",), {"type": float, "default": 64.0, "help": "largest request body in MiB"}),
        *_budget_flags(),
        (
            ("--max_tokens", "--max_new_tokens"),
            {
                "type": int,
                "help": "max_tokens of a request that gives none (none given: the checkpoint's "
                "generation_config.json max_new_tokens, else 512)",
            },
        ),
        (("--temperature",), {"type": float, "help": f"temperature of a request that gives none (0: greedy){_FILE}"}),
        (("--top_p",), {"type": float, "help": f"top_p of a request that gives none{_FILE}"}),
        (("--top_k",), {"type": int, "help": f"top_k of a request that gives none (0 or -1: no cut){_FILE}"}),
        (("--repetition_penalty",), {"type": float, "help": f"repetition_penalty of a request that gives none{_FILE}"}),
        (("--device",), {"help": "torch device (none given: cuda when available, else cpu)"}),
        (
            ("--num_threads",),
            {"type": int, "help": "torch intra-op threads (none given, on CPU: all cores but one, kept for HTTP)"},
        ),
        (("--log_level",), {"default": "info", "choices": levels, "help": "server log level"}),
    ]


def _budget_flags() -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """The flags that bound a request as a whole and the memory of all requests in flight."""
    from ..media.errors import DEFAULT_MAX_DECODED_BYTES
    from .admission import default_inflight_memory_mb
    from .request_budget import DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_REQUEST_PIXELS
    from .video_sources import DEFAULT_MAX_VIDEO_FRAMES, DEFAULT_MAX_VIDEO_VOXELS

    return [
        (
            ("--max_decoded_bytes",),
            {
                "type": int,
                "default": DEFAULT_MAX_DECODED_BYTES,
                "help": "largest decoded container of one image, in bytes (a NIfTI volume in all its dimensions, "
                "every frame of a DICOM file), checked from its header (413 image_too_large)",
            },
        ),
        (
            ("--max_images_per_request",),
            {
                "type": int,
                "default": DEFAULT_MAX_IMAGES_PER_REQUEST,
                "help": "most images in one request, all messages together (413 too_many_images)",
            },
        ),
        (
            ("--max_request_pixels",),
            {
                "type": int,
                "default": DEFAULT_MAX_REQUEST_PIXELS,
                "help": "most pixels of all images of one request together, from their headers, before any is "
                "decoded (413 request_pixels_exceeded)",
            },
        ),
        (
            ("--max_video_frames",),
            {
                "type": int,
                "default": DEFAULT_MAX_VIDEO_FRAMES,
                "help": "most frames of all volumes and clips of one request together (slices of a volume, frames "
                "of a clip), from their headers, before any is decoded (413 video_too_large); SAM 2 segments "
                "every frame, the language model sees FPS_MAX_FRAMES of them",
            },
        ),
        (
            ("--max_video_voxels",),
            {
                "type": int,
                "default": DEFAULT_MAX_VIDEO_VOXELS,
                "help": "most voxels (frames × height × width × colour samples) of all volumes and clips of one "
                "request together, from their headers, before any is decoded (413 video_too_large); a local file "
                "or series folder may hold at most 8 bytes a voxel of it",
            },
        ),
        (
            ("--max_inflight_memory_mb",),
            {
                "type": int,
                "default": default_inflight_memory_mb(),
                "help": "MiB of memory that the requests in flight may hold together (decoded images, the "
                "processor's tensors, generation), each estimated from its headers before decoding: a request "
                "that would pass it gets 429 server_busy with Retry-After, one that passes it alone 413 "
                "request_memory_exceeded; the default is a quarter of the memory of this machine or its container",
            },
        ),
    ]


def _budget_note(settings) -> str:
    """The start-up line that says what one request may hold and what all requests in flight may hold."""
    memory = settings.max_inflight_memory_bytes // (1024 * 1024)
    return (
        f"per request: at most {settings.max_images_per_request} images, {settings.max_request_pixels} pixels in all, "
        f"volumes and clips of {settings.max_video_frames} frames and {settings.max_video_voxels} voxels in all, "
        f"image, video and text tokens within the context; requests in flight: {memory} MiB of memory together "
        "(more: 429)"
    )


def _check_budgets(args: argparse.Namespace) -> str | None:
    """Why a request-budget flag cannot be used, or ``None``."""
    names = (
        "max_decoded_bytes",
        "max_images_per_request",
        "max_request_pixels",
        "max_video_frames",
        "max_video_voxels",
        "max_inflight_memory_mb",
    )
    low = [f"--{name}" for name in names if getattr(args, name) < 1]
    return f"{', '.join(low)} must be >= 1" if low else None


def add_parser(sub) -> None:
    """Register ``deploy``."""
    parser = sub.add_parser("deploy", help="serve an OpenAI-compatible API (chat completions with boxes and masks)")
    for names, options in _flags():
        parser.add_argument(*names, **options)
    parser.set_defaults(func=run)


def _check_numbers(args: argparse.Namespace) -> str | None:
    if (
        args.max_batch_size < 1
        or args.max_wait_ms < 0
        or args.request_timeout <= 0
        or args.body_timeout <= 0
        or (args.max_tokens is not None and args.max_tokens < 1)
        or (args.num_threads is not None and args.num_threads < 1)
    ):
        return (
            "--max_batch_size, --max_tokens and --num_threads must be >= 1, --max_wait_ms >= 0, --request_timeout "
            "and --body_timeout > 0"
        )
    return None


def _check_api_key(key: str | None) -> str | None:
    """Why ``key`` cannot protect the server (empty, only spaces, or not printable ASCII), or ``None``."""
    if key is None:
        return None
    if not key.strip():
        return (
            "--api_key (or $CITRUS_V_API_KEY) is empty: an empty key would leave the server open to anyone; give a "
            "key, or leave both out to serve without one"
        )
    if not key.strip().isascii() or not key.strip().isprintable():
        return "--api_key must be printable ASCII: an HTTP Authorization header carries nothing else"
    return None


def _fail(message: str, code: int) -> int:
    print(f"citrus-v deploy: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Check the deploy line, load the model and serve until interrupted."""
    import torch

    from ..checkpoint_layout import CheckpointError, resolve_model
    from ..infer.predictor import CitrusVPredictor
    from .deploy_flags import DeployLineError, check_backend, check_image_factor, read_environment
    from .generation_defaults import GenerationConfigError, GenerationDefaults
    from .threads import configure_threads

    try:
        from .server import ServerSettings, create_app, serve
    except ImportError as err:
        return _fail(f"{err.name} is not installed: pip install 'citrus-v[serve]'", 1)
    try:
        check_backend(args.infer_backend or "pt")
        variables = read_environment(os.environ)
    except DeployLineError as err:
        return _fail(str(err), 2)
    try:
        folder = resolve_model(args.model)
    except CheckpointError as err:
        return _fail(str(err), 1)
    allowed = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    if allowed is not None and not allowed.is_dir():
        return _fail(f"--allowed_local_media_path {allowed} is not a folder", 2)
    problem = _check_numbers(args) or _check_api_key(args.api_key) or _check_budgets(args)
    if problem:
        return _fail(problem, 2)
    try:
        generation = GenerationDefaults.from_folder(folder).with_flags(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            max_tokens=args.max_tokens,
        )
    except GenerationConfigError as err:
        return _fail(str(err), 2)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = configure_threads(device, args.num_threads)  # before the model runs anything
    dtype = getattr(torch, args.torch_dtype) if args.torch_dtype else None
    try:
        predictor = CitrusVPredictor.from_pretrained(folder, device=device, dtype=dtype)
        check_image_factor(variables, predictor.processor)
    except DeployLineError as err:
        return _fail(str(err), 2)
    except (CheckpointError, OSError, ValueError) as err:
        return _fail(f"cannot load {folder}: {err}", 1)
    settings = ServerSettings(
        served_model_name=args.served_model_name or folder.resolve().name,
        api_key=args.api_key.strip() if args.api_key is not None else None,  # a header value has no outer spaces
        allowed_local_media_path=allowed,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        request_timeout=args.request_timeout,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        body_timeout=args.body_timeout,
        max_decoded_bytes=args.max_decoded_bytes,
        max_images_per_request=args.max_images_per_request,
        max_request_pixels=args.max_request_pixels,
        max_video_frames=args.max_video_frames,
        max_video_voxels=args.max_video_voxels,
        max_inflight_memory_bytes=args.max_inflight_memory_mb * 1024 * 1024,
        generation=generation,
    )
    if generation.max_tokens > settings.max_tokens_limit:  # a checkpoint's file may allow more than a request may ask
        settings.generation = replace(generation, max_tokens=settings.max_tokens_limit)
    _announce(args, folder, variables, predictor, settings, threads)
    serve(create_app(predictor, settings), args.host, args.port, args.log_level)
    return 0


def _announce(args: argparse.Namespace, folder: Path, variables: dict[str, str], predictor, settings, threads: int):
    """Print what each given flag and variable maps to, the sampling defaults, and where the server listens."""
    from .deploy_flags import environment_notes, flag_notes

    lines = [*environment_notes(variables, predictor.processor, os.environ), *flag_notes(args, _flags())]
    defaults = settings.generation.describe()
    if defaults:
        lines.append("defaults of requests that leave them out: " + ", ".join(defaults))
    if settings.generation.max_tokens == settings.max_tokens_limit:
        lines.append(f"max_tokens of requests that give none: {settings.max_tokens_limit}, the server's limit")
    if settings.api_key is None:
        lines.append(
            f"no API key: the server is open, anyone who can reach {args.host}:{args.port} may use it "
            "(--api_key or $CITRUS_V_API_KEY requires one)"
        )
    else:
        lines.append("API key required: requests must send 'Authorization: Bearer KEY'")
    lines.append(_budget_note(settings))
    for line in lines:
        print(line, flush=True)
    print(
        f"serving {folder} as {settings.served_model_name!r} on "
        f"http://{args.host}:{args.port}/v1 (max batch {settings.max_batch_size}, wait {settings.max_wait_ms:g} ms, "
        f"{threads} torch thread(s), {predictor.dtype})",
        flush=True,
    )
