"""``citrus-v data``: validate, stats, convert, synth."""

from __future__ import annotations

import argparse
import sys


def _add_bounds(parser: argparse.ArgumentParser) -> None:
    from ..media import DEFAULT_MAX_VOLUME_VOXELS
    from ..media.errors import DEFAULT_MAX_DECODED_BYTES

    parser.add_argument("--processor", help="model or processor folder whose image bounds and tokenizer to use")
    parser.add_argument("--min_pixels", type=int,
                        help="smart-resize lower bound (when not given: the processor's, else 200704)")
    parser.add_argument("--max_pixels", type=int,
                        help="smart-resize upper bound (when not given: the processor's, else 1003520)")
    parser.add_argument("--max_voxels", type=int, default=DEFAULT_MAX_VOLUME_VOXELS,
                        help="reject videos (volumes, clips) and 3-D masks of more voxels, frames x pixels x samples "
                        "(0: no limit)")
    parser.add_argument("--max_decoded_bytes", type=int, default=DEFAULT_MAX_DECODED_BYTES,
                        help="reject NIfTI videos and masks whose voxels decode to more bytes (0: no limit)")


def _options(args: argparse.Namespace, decode: bool):
    from .validate import ValidationOptions

    overrides = {"max_image_pixels": args.max_image_pixels or None, "decode": decode,
                 "max_volume_voxels": args.max_voxels or None, "max_decoded_bytes": args.max_decoded_bytes or None}
    if args.min_pixels:
        overrides["min_pixels"] = args.min_pixels
    if args.max_pixels:
        overrides["max_pixels"] = args.max_pixels
    if args.processor:
        return ValidationOptions.for_processor(_processor(args.processor), **overrides)
    return ValidationOptions(**overrides)


def _processor(path: str):
    from ..processing.processor import CitrusVProcessor

    return CitrusVProcessor.from_pretrained(path)


def _validate(args: argparse.Namespace) -> int:
    from .rows import DataError
    from .validate import validate_files

    try:
        report = validate_files(args.files, _options(args, decode=not args.headers_only), strict=args.strict)
    except DataError as err:
        print(f"citrus-v data validate: {err}", file=sys.stderr)
        return 1
    print(report.format(limit=args.show))
    return 0 if report.rejected == 0 else 1


def _stats(args: argparse.Namespace) -> int:
    from ..processing.template import ChatTemplate
    from ..processing.tokenizer_builder import build_tokenizer
    from .stats import dataset_stats

    options = _options(args, decode=False)
    tokenizer = _processor(args.processor).tokenizer if args.processor else build_tokenizer()
    if not args.processor:
        print("token lengths use the tiny preset's tokenizer (give --processor DIR for another)")
    print(dataset_stats(args.files, ChatTemplate(tokenizer), options).format())
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .converters import convert_file
    from .rows import DataError

    try:
        report = convert_file(
            args.format, args.input, args.out, args.image_root, args.mask_root, args.strict, args.lang,
            args.image_suffix,
        )
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"citrus-v data convert: {err}", file=sys.stderr)
        return 1
    print(report.format())
    if not report.ok:
        return 1
    print("next: citrus-v data stats " + " ".join(str(path) for path, _ in report.outputs.values()))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .corpus import CorpusOptions, write_corpus

    options = CorpusOptions(
        n=args.n, seed=args.seed, size=args.size, test_images=args.test_images,
        train_documents=args.train_documents, absent_share=args.absent_share,
        volume_absent_share=args.volume_absent_share, absent_detection=args.absent_detection, volumes=args.volumes,
        test_volumes=args.test_volumes,
        volume_slices=tuple(args.volume_slices), volume_size=tuple(args.volume_size), clips=args.clips,
        clip_frames=tuple(args.clip_frames), clip_size=args.clip_size,
    )
    print(write_corpus(args.out, options).format())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``citrus-v data`` and its subcommands."""
    from ..media import DEFAULT_MAX_IMAGE_PIXELS

    data = sub.add_parser("data", help="validate, inspect, convert and synthesise datasets")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    validate = commands.add_parser("validate", help="check every row; print ok / rejected by reason with file:line")
    validate.add_argument("files", nargs="+", help="JSONL files")
    validate.add_argument("--strict", action="store_true", help="stop at the first bad row")
    validate.add_argument("--headers_only", action="store_true",
                          help="read image headers only (faster)")
    validate.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                          help="reject larger images (decompression bombs)")
    validate.add_argument("--show", type=int, default=50, help="rejections listed")
    _add_bounds(validate)
    validate.set_defaults(func=_validate)

    stats = commands.add_parser(
        "stats", help="rows per task and modality, image references and distinct files, token-length percentiles"
    )
    stats.add_argument("files", nargs="+", help="JSONL files")
    stats.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help="reject larger images (decompression bombs)")
    _add_bounds(stats)
    stats.set_defaults(func=_stats)

    convert = commands.add_parser("convert", help="convert a public dataset layout to Citrus-V rows")
    convert.add_argument("--from", dest="format", required=True, metavar="FORMAT",
                         help="source layout: mecovqa-g, medsegbench, detection, vqa-rad, slake, pathvqa")
    convert.add_argument("input", help="the release's folder as published (VQA_RAD, Slake1.0, pvqa) or one "
                         "source JSON / JSONL / pickle file")
    convert.add_argument("--out", required=True,
                         help="output folder (DIR/<split>.jsonl) or JSONL file (FILE_<split>.jsonl when the source "
                         "has several splits)")
    convert.add_argument("--image_root",
                         help="folder the source image paths are relative to (when not given: the release's own "
                         "image folder, e.g. 'VQA_RAD Image Folder', imgs, images/<split>, SAMed2Dv1)")
    convert.add_argument("--mask_root",
                         help="folder the source mask paths are relative to (when not given: the image folder)")
    convert.add_argument("--lang", default="en", help="SLAKE question language to keep, or 'all'")
    convert.add_argument("--image_suffix", default=".jpg",
                         help="added to image names without one (PathVQA)")
    convert.add_argument("--strict", action="store_true", help="stop at the first item that cannot be converted")
    convert.set_defaults(func=_convert)

    synth = commands.add_parser("synth", help="write the synthetic medical corpus (train/val/test)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--n", type=int, default=200, help="number of source images")
    synth.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same corpus)")
    synth.add_argument("--size", type=int, default=224, help="image side in pixels")
    synth.add_argument(
        "--test_images",
        type=int,
        default=0,
        help="extra images in the test split only (the N images keep their splits)",
    )
    synth.add_argument(
        "--train_documents",
        type=int,
        default=0,
        help="extra lab reports in the train split only, after the test images (every held-out image stays)",
    )
    synth.add_argument("--absent_share", type=float, default=0.15,
                       help="share of absent-target rows (the answer says the target is not there, no [SEG], no "
                       "box) among the segmentation and detection rows, in each split")
    synth.add_argument("--volume_absent_share", type=float, default=None,
                       help="the same share for the volumes' and clips' rows (default: --absent_share)")
    synth.add_argument("--absent_detection", action="store_true",
                       help="also ask detection questions about absent targets (answers without a box)")
    synth.add_argument("--volumes", type=int, default=0,
                       help="CT/MR volumes (NIfTI, with a NIfTI label volume) asked about through \"videos\"")
    synth.add_argument("--test_volumes", type=int, default=0, help="extra volumes in the test split only")
    synth.add_argument("--volume_slices", type=int, nargs=2, default=[24, 48], metavar=("LOW", "HIGH"),
                       help="slices per volume, drawn in this range")
    synth.add_argument("--volume_size", type=int, nargs=2, default=[128, 224], metavar=("LOW", "HIGH"),
                       help="pixels per slice side, drawn in this range")
    synth.add_argument("--clips", type=int, default=0,
                       help="ultrasound cine loops (multi-frame DICOM, with a NIfTI label stack)")
    synth.add_argument("--clip_frames", type=int, nargs=2, default=[16, 32], metavar=("LOW", "HIGH"),
                       help="frames per clip, drawn in this range")
    synth.add_argument("--clip_size", type=int, default=160, help="pixels per clip frame side")
    synth.set_defaults(func=_synth)
