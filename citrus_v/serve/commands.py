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
                "help": "require 'Authorization: Bearer KEY' (taken from $CITRUS_V_API_KEY when set; none: no key)",
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
            ("--max_image_pixels",),
            {"type": int, "default": DEFAULT_MAX_IMAGE_PIXELS, "help": "largest image accepted, width × height"},
        ),
        (("--max_body_mb",), {"type": float, "default": 64.0, "help": "largest request body in MiB"}),
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
        or (args.max_tokens is not None and args.max_tokens < 1)
        or (args.num_threads is not None and args.num_threads < 1)
    ):
        return (
            "--max_batch_size, --max_tokens and --num_threads must be >= 1, --max_wait_ms >= 0, --request_timeout > 0"
        )
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
    problem = _check_numbers(args)
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
        api_key=args.api_key or None,
        allowed_local_media_path=allowed,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        request_timeout=args.request_timeout,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
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
    for line in lines:
        print(line, flush=True)
    print(
        f"serving {folder} as {settings.served_model_name!r} on "
        f"http://{args.host}:{args.port}/v1 (max batch {settings.max_batch_size}, wait {settings.max_wait_ms:g} ms, "
        f"{threads} torch thread(s), {predictor.dtype})",
        flush=True,
    )
