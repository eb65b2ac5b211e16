"""``citrus-v app``: open the web page for a running ``citrus-v deploy`` server."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub) -> None:
    """Register ``app``."""
    parser = sub.add_parser("app", help="open the web app for a running `citrus-v deploy` server")
    parser.add_argument("--api", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    parser.add_argument("--port", type=int, default=7860, help="port the page is served on")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 all"
    )
    # the key is read from the environment when the app runs, never shown as a default in --help
    parser.add_argument("--api_key", default=None, help="the server's API key; $CITRUS_V_API_KEY when not given")
    parser.add_argument("--model", default=None, help="model name; the server's first model when not given")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # this process is the app: no telemetry on import
    from .page import ApiSettings, build_page, launch

    try:
        page = build_page(ApiSettings(args.api, args.api_key or os.environ.get("CITRUS_V_API_KEY"), args.model))
    except ImportError as err:
        print(f"citrus-v app: {err.name} is not installed: pip install 'citrus-v[app]'", file=sys.stderr)
        return 1
    print(f"Citrus-V app on http://{args.host}:{args.port} (API {args.api})", flush=True)
    launch(page, args.host, args.port, block=True)
    return 0
