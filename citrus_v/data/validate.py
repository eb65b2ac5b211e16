"""Row validation: every check a row must pass before training, and the ok / rejected summary.

Checks: the ms-swift shape; images exist, are readable (fully decoded unless ``decode=False``) and under
the pixel limit; one mask per ``[SEG]`` and each the size of the first image; ``objects`` boxes inside the
first image; boxes in answers inside the model's (smart-resized) image.

Videos (volumes and clips) are checked from their headers (:func:`~citrus_v.media.volumes.probe_volume`: frames
and frame size) against the readers' budgets, ``max_volume_voxels`` (frames x pixels x samples) and, for NIfTI,
``max_decoded_bytes``, before anything is decoded (and decoded whole with ``decode``). In a row with videos and
no image each mask is a label volume whose frames must match the first video's ``[frames, H, W]``; with
``decode`` it is read and must select at least one voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_VOLUME_VOXELS,
    FrameSample,
    MedicalImageError,
    VideoSampling,
    VolumeHeader,
    image_size,
    parse_ref,
    probe_volume,
    read_image,
    read_mask,
    read_nifti,
    read_volume,
    sample_frames,
)
from ..media.errors import DEFAULT_MAX_DECODED_BYTES
from ..media.nifti import nifti_display_size
from ..media.volumes import parse_volume_ref
from ..objectives import annotations
from ..objectives.annotations import AnnotationError
from ..processing.boxes import BoxScaler, model_size, parse_boxes
from ..tokens import SEG_TOKEN
from .absent_rows import is_absent
from .rows import (
    DataError,
    RowIssue,
    RowProblem,
    RowRecord,
    SkipCounter,
    count_seg,
    iter_rows,
    object_boxes,
    render_objects,
    row_modality,
    row_task,
)

# Upstream training bounds, as in the processor.
DEFAULT_MIN_PIXELS = 200704
DEFAULT_MAX_PIXELS = 1003520


@dataclass
class ValidationOptions:
    """How thoroughly to check rows.

    Args:
        max_image_pixels: images with more pixels are rejected (decompression bombs).
        decode: decode every image and mask (finds truncated files); ``False`` reads headers only.
        min_pixels, max_pixels: the model's smart-resize bounds, for boxes written in answers.
        patch_size, merge_size: the vision tower's patch and merge sizes (Qwen2.5-VL: 14 and 2).
        max_volume_voxels: videos (and 3-D masks) of more voxels (frames x pixels x samples) are rejected.
        max_decoded_bytes: NIfTI videos and masks whose voxels decode to more bytes are rejected.
        video_sampling: how the model samples and sizes a video's frames, for token counts (ms-swift's
            ``FPS_MAX_FRAMES``, ``VIDEO_MAX_PIXELS``, ...).
        temporal_patch_size: frames per temporal patch of the vision tower (Qwen2.5-VL: 2).
    """

    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    decode: bool = True
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    merge_size: int = 2
    max_volume_voxels: int | None = DEFAULT_MAX_VOLUME_VOXELS
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES
    video_sampling: VideoSampling = field(default_factory=VideoSampling)
    temporal_patch_size: int = 2

    @classmethod
    def for_processor(cls, processor, **overrides) -> ValidationOptions:
        """Options matching a processor's image bounds."""
        image_processor = processor.image_processor
        values = dict(
            min_pixels=processor.min_pixels,
            max_pixels=processor.max_pixels,
            patch_size=int(image_processor.patch_size),
            merge_size=int(image_processor.merge_size),
            video_sampling=getattr(processor, "video_sampling", None) or VideoSampling(),
            temporal_patch_size=int(getattr(image_processor, "temporal_patch_size", 2)),
        )
        values.update(overrides)
        return cls(**values)

    def scaler(self, width: int, height: int) -> BoxScaler:
        return BoxScaler.for_image(width, height, self.min_pixels, self.max_pixels, self.patch_size, self.merge_size)


@dataclass
class RowInfo:
    """What validation learned about a good row (used by stats and the datasets)."""

    image_sizes: list[tuple[int, int]]
    num_seg: int
    task: str
    modality: str
    videos: list[VolumeHeader] = field(default_factory=list)  # each video's header: frames, size, rate
    absent: bool = False  # an absent-target row (``meta.absent``)

    def video_plans(self, options: ValidationOptions) -> list[FrameSample]:
        """The frames the model samples of each video, and their size (``options.video_sampling``)."""
        return [sample_frames(h.num_frames, h.height, h.width, h.fps, options.video_sampling) for h in self.videos]

    def sampled_frames(self, options: ValidationOptions) -> list[int]:
        """How many frames of each video the model sees."""
        return [len(plan.indices) for plan in self.video_plans(options)]

    def video_tokens(self, options: ValidationOptions) -> list[int]:
        """Video tokens per video: the frames the model sees (in temporal patches) times the merged patches of
        one resized frame, as the processor counts them."""
        side = options.patch_size * options.merge_size
        return [
            -(-len(plan.indices) // options.temporal_patch_size) * (plan.height // side) * (plan.width // side)
            for plan in self.video_plans(options)
        ]

    def image_tokens(self, options: ValidationOptions) -> list[int]:
        """Image tokens per image after smart resize (one per merged patch)."""
        side = options.patch_size * options.merge_size
        tokens = []
        for width, height in self.image_sizes:
            w, h = model_size(width, height, options.min_pixels, options.max_pixels, options.patch_size,
                              options.merge_size)
            tokens.append((w // side) * (h // side))
        return tokens


def inspect_row(record: RowRecord, options: ValidationOptions) -> RowInfo:
    """Check one schema-valid row; raise :class:`RowProblem` with the first thing wrong."""
    row, base = record.row, record.base_dir
    sizes = _image_sizes(row, base, options)
    videos = _video_headers(row, base, options)
    num_seg = count_seg(row)
    masks = row.get("masks") or []
    _check_seg_masks(num_seg, len(masks), bool(sizes or videos))
    volume_masks = videos and not sizes  # masks of the first video, not of an image
    named = [] if volume_masks else [(f"masks[{k}]", ref) for k, ref in enumerate(masks)]
    try:
        named += list(annotations.check_against_image(row, sizes[0] if sizes else None))
    except AnnotationError as err:
        raise RowProblem(err.reason, str(err)) from err
    _check_mask_sizes(named, base, sizes, options)
    if volume_masks:
        _check_volume_masks(masks, base, videos[0], options)
    _check_object_boxes(row, sizes)
    _check_answer_boxes(row, sizes, options)
    return RowInfo(sizes, num_seg, row_task(row), row_modality(row), videos, is_absent(row))


def _image_sizes(row: dict, base: Path, options: ValidationOptions) -> list[tuple[int, int]]:
    """(width, height) of each of the row's images, each read (or its header only, without ``decode``)."""
    sizes: list[tuple[int, int]] = []
    for k, ref in enumerate(row.get("images") or []):
        try:
            if options.decode:
                sizes.append(read_image(ref, base, max_pixels=options.max_image_pixels).size)
            else:
                sizes.append(image_size(ref, base, max_pixels=options.max_image_pixels))
        except (MedicalImageError, OSError, ValueError) as err:
            raise media_problem(f"images[{k}]", err) from err
    return sizes


def _video_headers(row: dict, base: Path, options: ValidationOptions) -> list[VolumeHeader]:
    """The header of each of the row's videos, within the budgets (each decoded whole with ``decode``)."""
    headers = []
    for k, ref in enumerate(row.get("videos") or []):
        try:
            headers.append(_stack_header(ref, base, options))
            if options.decode:
                _decoded(ref, base, options)
        except (MedicalImageError, OSError, ValueError) as err:
            raise media_problem(f"videos[{k}]", err) from err
    return headers


def _stack_header(ref, base: Path, options: ValidationOptions) -> VolumeHeader:
    """A volume or clip reference's header, refused over ``max_volume_voxels`` (and, for NIfTI, over
    ``max_decoded_bytes`` of voxels as the file declares them) before any voxel is decoded."""
    header = probe_volume(ref, base)
    header.check(options.max_volume_voxels)
    parsed = parse_volume_ref(ref, base)
    if parsed.format == "nifti":
        nifti_display_size(parsed.path, parsed.axis, None, options.max_decoded_bytes)
    return header


def _check_volume_masks(masks: list, base: Path, video: VolumeHeader, options: ValidationOptions) -> None:
    """Each mask of a video row a label volume with the first video's ``[frames, H, W]`` (from headers), and with
    ``decode`` one that selects at least one voxel."""
    shape = (video.num_frames, video.height, video.width)
    for k, ref in enumerate(masks):
        what = f"masks[{k}]"
        if not isinstance(ref, str):
            raise RowProblem(
                "bad_mask", f"{what}: a video's mask must be a label volume reference such as 'labels.nii.gz#label=3' "
                "(one slice per frame), not an inline 2-D mask"
            )
        try:
            header = _stack_header(ref, base, options)
            selected = _selected_voxels(ref, base, options) if options.decode else None
        except (MedicalImageError, OSError, ValueError) as err:
            raise media_problem(what, err) from err
        found = (header.num_frames, header.height, header.width)
        if found != shape:
            raise RowProblem(
                "mask_size",
                f"{what} is {found[0]} frame(s) of {found[2]}x{found[1]} but videos[0] is {shape[0]} frame(s) of "
                f"{shape[2]}x{shape[1]}: a video's mask must have one frame per frame of the video, each its size "
                "(same axis: give the mask the video's axis=)",
            )
        if selected == 0:
            raise RowProblem(
                "empty_mask",
                f"{what} selects no voxel: the label value(s) are not in the label volume. Fix: name the target's "
                "label values (label=...), or make the row an absent-target answer without [SEG]",
            )


def _decoded(ref, base: Path, options: ValidationOptions) -> np.ndarray:
    """Every voxel of a volume or clip reference, decoded (in the source's order: what proves the file whole;
    a NIfTI file through the reader's volume cache, so rows naming one volume decode it once)."""
    parsed = parse_volume_ref(ref, base)
    if parsed.format == "nifti":
        return read_nifti(parsed.path, parsed.t, None, options.max_decoded_bytes).data
    return read_volume(ref, base, max_voxels=options.max_volume_voxels).values


def _selected_voxels(ref: str, base: Path, options: ValidationOptions) -> int:
    """How many voxels a label volume reference selects (its ``label=`` values, else any non-zero)."""
    label = parse_ref(ref, base).label
    values = _decoded(ref, base, options)
    return int((np.isin(values, label) if label is not None else values != 0).sum())


def media_problem(what: str, err: Exception) -> RowProblem:
    """The :class:`RowProblem` for an image or mask field ``what`` that could not be read: a media error keeps
    its reason; an OS error on the path (a name too long, a NUL byte, a symbolic-link loop) is ``unreadable_image``."""
    if isinstance(err, MedicalImageError):
        return RowProblem(err.reason, f"{what}: {err}")
    name = getattr(err, "filename", None)
    detail = f"{name}: {err.strerror}" if name is not None and getattr(err, "strerror", None) else str(err)
    return RowProblem(
        "unreadable_image",
        f"{what}: the file cannot be opened ({detail}). Fix: check the path (each name at most 255 bytes, no NUL "
        "byte, no symbolic-link loop)",
    )


def internal_issue(record: RowRecord, err: Exception) -> RowIssue:
    """An unexpected exception while checking or loading a row, as a counted ``internal`` issue at its
    ``file:line``: the run goes on, and the message keeps the exception for a bug report."""
    return RowIssue(
        str(record.file), record.line, "internal",
        f"unexpected {type(err).__name__} while checking the row: {err}. This is a bug in Citrus-V's checks; "
        "please report it with this row",
    )  # fmt: skip


def _check_seg_masks(num_seg: int, num_masks: int, has_media: bool) -> None:
    """One mask per ``[SEG]``, and an image or a video for them."""
    if num_seg and not has_media:
        raise RowProblem(
            "seg_without_image", f"{num_seg} {SEG_TOKEN} token(s) but no image or video: a mask needs an image"
        )
    if num_seg != num_masks:
        more = "more" if num_seg > num_masks else "fewer"
        raise RowProblem(
            "seg_mask_count",
            f"{num_seg} {SEG_TOKEN} token(s) but {num_masks} mask(s) ({more} {SEG_TOKEN} than masks): give exactly "
            f"one mask per {SEG_TOKEN}, in order",
        )


def _check_mask_sizes(named: list, base: Path, sizes: list[tuple[int, int]], options: ValidationOptions) -> None:
    """Each of ``named`` ((field, mask reference) pairs) readable and the size of the first image."""
    for what, ref in named:
        try:
            if options.decode or isinstance(ref, dict):
                height, width = read_mask(ref, base, size=sizes[0], max_pixels=options.max_image_pixels).shape
            else:
                width, height = image_size(ref, base, max_pixels=options.max_image_pixels)
        except (MedicalImageError, OSError, ValueError) as err:
            raise media_problem(what, err) from err
        if (width, height) != sizes[0]:
            raise RowProblem(
                "mask_size",
                f"{what} is {width}x{height} but images[0] is {sizes[0][0]}x{sizes[0][1]}: a mask must have its "
                "image's size",
            )


def _check_object_boxes(row: dict, sizes: list[tuple[int, int]]) -> None:
    """``objects`` boxes inside the first image, corners in order."""
    boxes = object_boxes(row)
    if not boxes:
        return
    if not sizes:
        raise RowProblem("bbox_outside", "objects.bbox given but the row has no image")
    width, height = sizes[0]
    for k, box in enumerate(boxes):
        if not box.inside(width, height):
            raise RowProblem(
                "bbox_outside",
                f"objects.bbox[{k}] {box.xyxy} is not inside images[0] ({width}x{height}) or has x1>x2 / y1>y2",
            )


def _check_answer_boxes(row: dict, sizes: list[tuple[int, int]], options: ValidationOptions) -> None:
    """Boxes written in the answers (after ``objects`` are rendered) inside the model's smart-resized image."""
    scaler = options.scaler(*sizes[0]) if sizes else None
    messages = render_objects(row, scaler)
    if scaler is None:
        return
    mw, mh = scaler.model
    for message in messages:
        if message["role"] != "assistant":
            continue
        for box in parse_boxes(message["content"]):
            if not box.inside(mw, mh):
                raise RowProblem(
                    "bbox_outside",
                    f"answer box {box.xyxy} is not inside the model's {mw}x{mh} image: answer boxes are absolute "
                    "pixels of the smart-resized image",
                )


@dataclass
class ValidationReport:
    """Rows ok / rejected, by reason, with ``file:line`` for each rejection."""

    files: list[str]
    ok: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)
    infos: list[tuple[RowRecord, RowInfo]] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return self.skips.total

    def format(self, limit: int = 50) -> str:
        """The human summary: totals, counts by reason, and the first ``limit`` rejections."""
        lines = [f"{self.ok} row(s) ok, {self.rejected} rejected ({len(self.files)} file(s))"]
        for reason, count in sorted(self.skips.counts.items()):
            lines.append(f"  {reason}: {count}")
        for issue in self.skips.issues[:limit]:
            lines.append(f"  {issue}")
        if self.rejected > min(limit, len(self.skips.issues)):
            lines.append(f"  ... {self.rejected - min(limit, len(self.skips.issues))} more")
        return "\n".join(lines)


def validate_files(
    paths: Sequence[str | Path],
    options: ValidationOptions | None = None,
    strict: bool = False,
    keep_infos: bool = False,
) -> ValidationReport:
    """Validate every row of the JSONL files; in ``strict`` mode stop at the first bad row (:class:`DataError`).

    Nothing but strict mode stops it: an unexpected exception on a row is counted as an ``internal`` issue at
    that row's ``file:line``, one while reading a file as an ``internal`` issue of that file, and the next row
    or file follows.
    """
    options = options or ValidationOptions()
    report = ValidationReport([str(p) for p in paths], skips=SkipCounter(strict=strict))
    for path in paths:
        _validate_file(path, options, report, keep_infos)
    return report


def _validate_file(path: str | Path, options: ValidationOptions, report: ValidationReport, keep_infos: bool) -> None:
    """Validate the rows of one file into ``report``."""
    line = 0
    try:
        for record in iter_rows([path], report.skips):
            line = record.line
            try:
                info = inspect_row(record, options)
            except RowProblem as problem:
                report.skips.record(RowIssue(str(record.file), record.line, problem.reason, str(problem)))
                continue
            except Exception as err:  # a bug in a check must not hide the other rows' results
                report.skips.record(internal_issue(record, err))
                continue
            report.ok += 1
            if keep_infos:
                report.infos.append((record, info))
    except DataError:
        raise
    except Exception as err:  # reading the file itself failed part-way: count it, go on with the next file
        report.skips.record(
            RowIssue(
                str(path), line + 1, "internal",
                f"reading the file stopped after line {line}: {type(err).__name__}: {err}",
            )  # fmt: skip
        )
