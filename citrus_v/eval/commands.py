"""``citrus-v eval``: score our model (in-process) or any OpenAI-compatible endpoint on the benchmark tasks."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli_parser import MODEL_HELP
from .samples import ALL_TASKS

TASK_HELP = (
    f"{', '.join(ALL_TASKS)} (comma-separated) or all; seg3d scores a mask stack per [SEG] over a volume or clip "
    "(3-D Dice, HD95 in mm, volume error), absent scores rows with meta.absent (false-mask rate)"
)


def add_parser(sub) -> None:
    """Register ``citrus-v eval``."""
    parser = sub.add_parser(
        "eval",
        help=f"evaluate on the benchmark tasks ({', '.join(ALL_TASKS)})",
        description="Evaluate a model folder in-process (--model) or an OpenAI-compatible endpoint (--api) with "
        "the same metrics; writes predictions.jsonl, metrics.json, report.md and seg_dice.png to --out.",
    )
    parser.add_argument("--tasks", required=True, help=TASK_HELP)
    parser.add_argument(
        "--data", required=True, action="append", metavar="[NAME=]PATH",
        help="a data set: the synthetic corpus folder, a rows .jsonl, or NAME=PATH with NAME one of rows, "
        "mecovqa-g, medsegbench, detection, vqa-rad, slake, pathvqa, pmc-vqa, medxpertqa-mm, report "
        "(repeat, or separate with commas)",
    )
    parser.add_argument("--split", default="test", help="split file of a rows folder (default: test)")
    parser.add_argument("--image_root", help="folder the set's image paths are relative to (default: the set's own)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help=MODEL_HELP + ", run in this process")
    source.add_argument("--api", metavar="URL", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--served_model_name", help="the model name the endpoint serves (required with --api)")
    parser.add_argument("--api_key", default=None, help="API key (default: $OPENAI_API_KEY, else none)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight with --api")
    parser.add_argument("--retries", type=int, default=2, help="retries per request with --api")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request with --api")
    parser.add_argument(
        "--box_format", default="pixels", choices=["pixels", "qwen", "norm1000"],
        help="how to read boxes from answer text when the endpoint returns no grounding object (default: pixels)",
    )
    parser.add_argument("--device", help="torch device with --model (default: cuda when available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=1, help="samples per generation pass with --model")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--limit", type=int, help="at most N samples per task (a seeded draw)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit draw and of generation")
    parser.add_argument("--resume", action="store_true", help="keep samples already scored in --out, ask the rest")
    parser.add_argument("--max_new_tokens", type=int, help="answer length limit for every task (default: per task)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _backend(args: argparse.Namespace):
    from .backends import InProcessBackend, OpenAIBackend

    if args.api:
        return OpenAIBackend(
            args.api, args.served_model_name, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
            concurrency=args.concurrency, retries=args.retries, timeout=args.timeout, box_format=args.box_format,
        )
    return InProcessBackend.from_pretrained(args.model, device=args.device, batch_size=args.batch_size)


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; print where the results are and the headline numbers."""
    import importlib.util
    from pathlib import Path

    from ..checkpoint_layout import CheckpointError
    from .runner import EvalConfig, parse_tasks, run_eval
    from .samples import EvalDataError

    missing = [m for m in ("scipy", "nltk") + (("openai",) if args.api else ()) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"citrus-v eval: needs {', '.join(missing)}; install them with: pip install 'citrus-v[eval]'",
              file=sys.stderr)
        return 2
    if args.api and not args.served_model_name:
        print("citrus-v eval: --api needs --served_model_name NAME (the name the endpoint serves)", file=sys.stderr)
        return 2
    for flag in ("limit", "concurrency", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"citrus-v eval: --{flag} must be at least 1", file=sys.stderr)
            return 2
    try:
        config = EvalConfig(
            tasks=parse_tasks(args.tasks), data=list(args.data), out=Path(args.out), split=args.split,
            image_root=Path(args.image_root) if args.image_root else None, limit=args.limit, seed=args.seed,
            resume=args.resume, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
        )
    except EvalDataError as err:
        print(f"citrus-v eval: {err}", file=sys.stderr)
        return 2
    try:
        backend = _backend(args)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"citrus-v eval: cannot load {args.model or args.api}: {err}", file=sys.stderr)
        return 1
    try:
        result = run_eval(config, backend)
    except EvalDataError as err:
        print(f"citrus-v eval: {err}", file=sys.stderr)
        return 1
    for line in result.warnings:
        print(f"citrus-v eval: warning: {line}", file=sys.stderr)
    print(headline(result.tasks))
    print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    return 0


def headline(tasks: dict) -> str:
    """One line per task with its main numbers and counts."""
    main = {
        "seg": ("dice", "iou"),
        "det": ("acc_iou50", "mean_iou", "ap50"),
        "vqa": ("closed_accuracy", "open_recall"),
        "report": ("bleu4", "rouge_l", "cider"),
        "doc": ("cer", "anls", "field_em"),
        "cot": ("accuracy", "format_share"),
        "seg3d": ("dice", "volume_error_median", "hd95_mm_median"),
        "absent": ("false_mask_rate", "seg_emitted_present"),
    }
    lines = []
    for task, summary in tasks.items():
        counts = summary["counts"]
        values = ", ".join(
            f"{key} {summary['overall'][key]:.3f}" for key in main[task] if summary["overall"].get(key) is not None
        )
        lines.append(
            f"{task}: {values or 'no samples'} ({counts['scored']}/{counts['samples']} scored, "
            f"{counts['unparsable']} unparsable, {counts['failed']} failed)"
        )
    return "\n".join(lines)
