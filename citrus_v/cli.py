"""``citrus-v``: one entry point; each subcommand delegates to its package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .cli_parser import CitrusArgumentParser

# Subcommands that live in their own package: name -> "module:function" that adds the subparser.
# Each function takes the subparsers object, adds its parser and sets ``func`` (returning an exit code);
# heavy imports belong inside ``func`` so that `citrus-v --help` stays fast.
COMMANDS: dict[str, str] = {
    "data": ".data.commands:add_parser",
    "sft": ".train.commands:register_sft",
    "export": ".train.commands:register_export",
    "convert": ".convert_cli:register_convert",
    "infer": ".infer.commands:add_parser",
    "deploy": ".serve.commands:add_parser",
    "app": ".app.commands:add_parser",
    "eval": ".eval.commands:add_parser",
}

def _build(args: argparse.Namespace) -> int:
    from .checkpoint_layout import CheckpointError

    try:
        if args.preset:
            if args.mllm or args.sam2:
                print("citrus-v build: give either --preset or --mllm/--sam2, not both", file=sys.stderr)
                return 2
            from .recipes.presets import build_preset

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
    from .recipes.output import OutputFolderError
    from .recipes.tiny_base import BaseRecipeError

    try:
        if args.make_base:
            from .recipes.tiny_base import make_base

            make_base(args.make_base, overwrite=args.overwrite, base_from=args.base_from)
            return 0
        from .recipes.demo import run_demo

        run_demo(
            args.out,
            fast=args.fast,
            seed=args.seed,
            steps=args.steps,
            from_scratch=args.from_scratch,
            overwrite=args.overwrite,
        )
    except (OutputFolderError, BaseRecipeError) as err:
        print(f"citrus-v demo: {err}", file=sys.stderr)
        return 1
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``citrus-v`` and its subcommands."""
    parser = CitrusArgumentParser(
        prog="citrus-v",
        description="Citrus-V: a medical vision-language model answering in text, boxes and masks. "
        "Flags are spelled as ms-swift spells them (--max_new_tokens); the hyphenated spelling works too.",
    )
    parser.add_argument("--version", action="version", version=f"citrus-v {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    build = sub.add_parser("build", help="build a model: a preset, or Qwen2.5-VL + SAM 2 checkpoints")
    build.add_argument("--preset", choices=["tiny"], help="random-init preset to build")
    build.add_argument("--mllm", help="local Qwen2.5-VL checkpoint folder")
    build.add_argument("--sam2", help="local SAM 2 checkpoint: a transformers folder or Meta's .pt file")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--seed", type=int, default=0, help="seed for random initialisation")
    build.set_defaults(func=_build)

    demo = sub.add_parser("demo", help="data -> stage 3 -> stage 4 -> evaluation -> report, on a CPU")
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--fast", action="store_true", help="a smoke run of about a minute (no quality bar)")
    demo.add_argument("--steps", type=int, default=None, help="override the steps of both training stages")
    demo.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training")
    demo.add_argument(
        "--from_scratch", action="store_true", help="start from the random-init tiny preset, not the shipped base"
    )
    demo.add_argument(
        "--make_base",
        metavar="DIR",
        help="instead of the demo, train the tiny stage-1/2 base checkpoint into DIR (about 100 minutes on 2 cores)",
    )
    demo.add_argument(
        "--base_from",
        metavar="DIR",
        help="with --make_base: continue from a base the recipe wrote before it had its later parts (e.g. "
        "tiny-base), running only the parts that base did not go through",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output folder (--out, or --make_base DIR and DIR-work) when it already holds files",
    )
    demo.set_defaults(func=_demo)

    for target in COMMANDS.values():
        module_name, function = target.split(":")
        getattr(importlib.import_module(module_name, __package__), function)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``citrus-v`` with ``argv`` (default: the command line); return the exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
