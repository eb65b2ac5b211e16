"""``citrus-v deploy``: serve a model folder over the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..cli_parser import MODEL_HELP


def add_parser(sub) -> None:
    """Register ``deploy`` (flag names as upstream's ``swift deploy``)."""
    from .media import DEFAULT_MAX_IMAGE_PIXELS

    parser = sub.add_parser("deploy", help="serve an OpenAI-compatible API (chat completions with boxes and masks)")
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    parser.add_argument("--served_model_name", help="the model name clients send (default: the folder's name)")
    parser.add_argument(
        "--api_key",
        default=os.environ.get("CITRUS_V_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $CITRUS_V_API_KEY; none: no key needed)",
    )
    parser.add_argument("--allowed_local_media_path", help="folder whose files requests may name as images")
    parser.add_argument("--max_batch_size", type=int, default=8, help="most requests per generation (1: no batching)")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="how long a batch waits to fill (ms)")
    parser.add_argument("--request_timeout", type=float, default=300.0, help="seconds before a request gets 504")
    parser.add_argument(
        "--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="largest image accepted, width × height"
    )
    parser.add_argument("--max_body_mb", type=float, default=64.0, help="largest request body in MiB")
    parser.add_argument("--max_tokens", type=int, default=512, help="default max_tokens when a request gives none")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch intra-op threads (default on CPU: all cores but one, which the HTTP side keeps)",
    )
    levels = ["critical", "error", "warning", "info", "debug"]
    parser.add_argument("--log_level", default="info", choices=levels, help="server log level")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    import torch

    from ..checkpoint_layout import CheckpointError
    from ..infer.predictor import CitrusVPredictor
    from .threads import configure_threads

    try:
        from .server import ServerSettings, create_app, serve
    except ImportError as err:
        print(f"citrus-v deploy: {err.name} is not installed: pip install 'citrus-v[serve]'", file=sys.stderr)
        return 1

    from ..checkpoint_layout import resolve_model

    try:
        folder = resolve_model(args.model)
    except CheckpointError as err:
        print(f"citrus-v deploy: {err}", file=sys.stderr)
        return 1
    allowed = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    if allowed is not None and not allowed.is_dir():
        print(f"citrus-v deploy: --allowed_local_media_path {allowed} is not a folder", file=sys.stderr)
        return 2
    if (
        args.max_batch_size < 1
        or args.max_wait_ms < 0
        or args.request_timeout <= 0
        or args.max_tokens < 1
        or (args.num_threads is not None and args.num_threads < 1)
    ):
        print(
            "citrus-v deploy: --max_batch_size, --max_tokens and --num_threads must be >= 1, --max_wait_ms >= 0, "
            "--request_timeout > 0",
            file=sys.stderr,
        )
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = configure_threads(device, args.num_threads)  # before the model runs anything
    try:
        predictor = CitrusVPredictor.from_pretrained(folder, device=device)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"citrus-v deploy: cannot load {folder}: {err}", file=sys.stderr)
        return 1
    settings = ServerSettings(
        served_model_name=args.served_model_name or folder.resolve().name,
        api_key=args.api_key or None,
        allowed_local_media_path=allowed,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        request_timeout=args.request_timeout,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        default_max_tokens=args.max_tokens,
    )
    print(
        f"serving {folder} as {settings.served_model_name!r} on http://{args.host}:{args.port}/v1 "
        f"(max batch {settings.max_batch_size}, wait {settings.max_wait_ms:g} ms, {threads} torch thread(s))",
        flush=True,
    )
    serve(create_app(predictor, settings), args.host, args.port, args.log_level)
    return 0
