"""CLI: ``citrus-v sft`` and ``citrus-v export``."""

from __future__ import annotations

import argparse
import logging
import sys


def register_sft(subparsers) -> None:
    from .arguments import add_arguments

    parser = subparsers.add_parser(
        "sft",
        help="train (four-stage recipe; upstream `swift sft` flags)",
        description="Fine-tune Citrus-V. Upstream `swift sft` command lines work with `swift` -> `citrus-v`: "
        "without --stage, the stage follows from the freeze flags, and unset flags take ms-swift's defaults. "
        "NPROC_PER_NODE=N runs N processes under torchrun; NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT "
        "spread them over several machines, as in ms-swift.",
    )
    add_arguments(parser)
    parser.set_defaults(func=_run_sft)


def _run_sft(args: argparse.Namespace) -> int:
    from ..checkpoint_layout import CheckpointError
    from ..processing.processor import ProcessorError
    from .arguments import parse_namespace
    from .data import DatasetError
    from .launch import launch_torchrun, topology, under_torchrun
    from .sft import SftError, run_sft
    from .stages import StageError
    from .trainer import CheckpointSaveError, NonFiniteLossError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        parsed = parse_namespace(args)  # a bad flag is reported once, before any process starts
        if not under_torchrun():
            where = topology()
            if where.distributed:
                return launch_torchrun(sys.argv[1:], where)
        run_sft(parsed)
    except (
        SftError, DatasetError, StageError, CheckpointError, ProcessorError, NonFiniteLossError, CheckpointSaveError,
        ValueError,
    ) as err:
        print(f"citrus-v sft: {err}", file=sys.stderr)
        return 1
    return 0


def register_export(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a trained checkpoint (merge LoRA adapters)")
    parser.add_argument("--merge_lora", required=True, metavar="CKPT", help="LoRA checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder for the merged model")
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .lora import merge_lora

    try:
        out = merge_lora(args.merge_lora, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"citrus-v export: {err}", file=sys.stderr)
        return 1
    print(f"saved the merged model to {out}")
    return 0
