"""``citrus-v convert``: between our checkpoint layout and the released upstream one.

- ``--to upstream``: our folder -> upstream's layout (``config.json`` upstream-style, SAM 2 in Meta's names,
  sharded safetensors with an index, the tokenizer), so weights trained here load in upstream's tooling.
  Works tensor by tensor: dtypes and values are kept bit for bit.
- ``--to citrus``: an upstream folder -> our layout (every command also reads upstream folders directly;
  converting once saves the renaming at each load).
"""

from __future__ import annotations

import argparse
import sys

from .cli_parser import MODEL_HELP, RawDescriptionDefaultsHelpFormatter

TARGETS = ("upstream", "citrus")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def register_convert(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand to the ``citrus-v`` parser."""
    parser = sub.add_parser(
        "convert",
        help="convert a model folder to the upstream Citrus-V layout (or back)",
        description=__doc__,
        formatter_class=RawDescriptionDefaultsHelpFormatter,
    )
    parser.add_argument("--to", required=True, choices=TARGETS, help="layout to write")
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--max_shard_size",
        default="5GB",
        help="largest safetensors shard for --to upstream (as upstream)",
    )
    parser.add_argument(
        "--torch_dtype",
        default="auto",
        choices=DTYPES,
        help="dtype for --to citrus (default: as stored)",
    )
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Run ``citrus-v convert``; returns the exit code."""
    from .checkpoint_layout import CheckpointError
    from .processing.processor import ProcessorError

    try:
        if args.to == "upstream":
            from .modeling.upstream_checkpoint import write_upstream

            out = write_upstream(args.model, args.out, max_shard_size=args.max_shard_size)
        else:
            out = _to_citrus(args.model, args.out, args.torch_dtype)
    except (CheckpointError, ProcessorError) as err:
        print(f"citrus-v convert: {err}", file=sys.stderr)
        return 1
    print(f"wrote the {args.to} layout to {out}")
    return 0


def _to_citrus(model_dir: str, out: str, dtype: str):
    import torch

    from .modeling.modeling_citrus_v import CitrusV
    from .processing.processor import CitrusVProcessor

    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = CitrusV.from_pretrained(model_dir, **kwargs)
    processor = CitrusVProcessor.from_pretrained(model_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
