"""``citrus-v``: one entry point; each subcommand delegates to its package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

# Subcommands that live in their own package: name -> "module:function" that adds the subparser.
# Each function takes the subparsers object, adds its parser and sets ``func`` (returning an exit code);
# heavy imports belong inside ``func`` so that `citrus-v --help` stays fast.
COMMANDS: dict[str, str] = {}

# Subcommands whose implementation has not landed yet, and the issue that brings each.
PENDING = {
    "data": ("validate, inspect and convert datasets", "the data issue (#3)"),
    "sft": ("train with the four-stage recipe", "the training issue (#4)"),
    "infer": ("answer one question about one image", "the inference and serving issue (#5)"),
    "deploy": ("serve an OpenAI-compatible API", "the inference and serving issue (#5)"),
    "app": ("open the web app", "the inference and serving issue (#5)"),
    "eval": ("evaluate on the benchmark tasks", "the evaluation issue (#6)"),
}


def _build(args: argparse.Namespace) -> int:
    from .modeling.checkpoint import CheckpointError

    try:
        if args.preset:
            if args.mllm or args.sam2:
                print("citrus-v build: give either --preset or --mllm/--sam2, not both", file=sys.stderr)
                return 2
            from .presets import build_preset

            out = build_preset(args.preset, args.out, seed=args.seed)
        else:
            if not (args.mllm and args.sam2):
                print("citrus-v build: give --preset NAME, or both --mllm DIR and --sam2 DIR", file=sys.stderr)
                return 2
            from .assembly import build_from_checkpoints

            out = build_from_checkpoints(args.mllm, args.sam2, args.out)
    except CheckpointError as err:
        print(f"citrus-v build: {err}", file=sys.stderr)
        return 1
    print(f"saved model and processor to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, seed=args.seed)
    return 0


def _pending(name: str):
    def run(args: argparse.Namespace) -> int:
        print(
            f"citrus-v {name}: not available in this version; {PENDING[name][1]} brings it.",
            file=sys.stderr,
        )
        return 3

    return run


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``citrus-v`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="citrus-v",
        description="Citrus-V: a medical vision-language model answering in text, boxes and masks.",
    )
    parser.add_argument("--version", action="version", version=f"citrus-v {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    build = sub.add_parser("build", help="build a model: a preset, or Qwen2.5-VL + SAM 2 checkpoints")
    build.add_argument("--preset", choices=["tiny"], help="random-init preset to build")
    build.add_argument("--mllm", help="local Qwen2.5-VL checkpoint folder")
    build.add_argument("--sam2", help="local transformers SAM 2 checkpoint folder")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--seed", type=int, default=0, help="seed for random initialisation")
    build.set_defaults(func=_build)

    demo = sub.add_parser("demo", help="the smallest end-to-end run: build, train a few steps, predict")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    for target in COMMANDS.values():
        module_name, function = target.split(":")
        getattr(importlib.import_module(module_name, __package__), function)(sub)
    for name, (summary, _issue) in PENDING.items():
        if name in COMMANDS:
            continue
        pending = sub.add_parser(name, help=f"{summary} (not yet available)", add_help=True)
        pending.set_defaults(func=_pending(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``citrus-v`` with ``argv`` (default: the command line); return the exit code."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command not in PENDING:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
