"""A whole-volume answer as the page uses it: the ``grounding`` object's masks through the volume decoded and
checked against the frames the page reads from the same file, and the masks of any one picture of the slider.

The server answers in ``grounding.volume_masks``, per ``[SEG]``: ``index``, ``label``, ``present``, ``frames``
``[{"frame": k, "rle": COCO RLE}]`` (frames with mask only), ``volume_ml``, ``spacing``, ``bbox3d`` and
``key_frame``; ``video_size`` gives the frames it read and ``notes`` what a reader should know. Frame ``k`` is
frame ``k`` of the stack :func:`citrus_v.media.read_volume` reads from the file (a NIfTI volume along its RAS+
axis 2, as the server reads a volume sent as bytes); on another NIfTI axis the picture's mask is the 3-D mask cut
along that axis, in the picture's display orientation. A target the server found on no frame
(``present: false``) has no mask at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..infer.results import MaskResult
from ..media.nifti import from_display, to_display
from .scan import SERVER_AXIS, Scan, View


@dataclass
class VolumeTarget:
    """One ``[SEG]``'s mask through the volume: ``frames`` maps a frame index to its boolean ``[H, W]`` mask."""

    index: int  # which [SEG] of the answer (0-based)
    label: str | None
    present: bool
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    volume_ml: float | None = None
    spacing: tuple[float, ...] | None = None
    bbox3d: Any = None
    key_frame: int | None = None
    score: float | None = None

    @property
    def frame_numbers(self) -> list[int]:
        """The frames with mask, in order."""
        return sorted(self.frames)


@dataclass
class VolumeAnswer:
    """Every target of one answer, over a stack of ``num_frames`` frames of ``frame_shape`` ``(H, W)``."""

    targets: list[VolumeTarget]
    num_frames: int
    frame_shape: tuple[int, int]
    frameless_boxes: int = 0  # 2-D boxes in the grounding, which name no frame and are not drawn
    notes: list[str] = field(default_factory=list)  # the server's lines about the masks
    _volumes: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # RAS+ masks, made when first cut

    def stack(self, position: int) -> np.ndarray:
        """Target ``position``'s boolean ``[N, H, W]`` mask stack."""
        stack = np.zeros((self.num_frames, *self.frame_shape), dtype=bool)
        for k, mask in self.targets[position].frames.items():
            stack[k] = mask
        return stack

    def stacks(self) -> list[np.ndarray]:
        return [self.stack(k) for k in range(len(self.targets))]

    def frame_masks(self, frame: int) -> list[MaskResult]:
        """Each target's mask on ``frame`` (empty where it has none), in the order the overlay colours them."""
        empty = np.zeros(self.frame_shape, dtype=bool)
        return [_mask_result(t, t.frames.get(frame, empty)) for t in self.targets]

    def plane_masks(self, shape: tuple[int, int, int], axis: int, index: int) -> list[MaskResult]:
        """Each target's mask on NIfTI slice ``index`` along RAS+ ``axis`` of a volume of RAS+ ``shape``, in
        display orientation (the frames are the display slices along :data:`SERVER_AXIS`)."""
        if axis == SERVER_AXIS:
            return self.frame_masks(index)
        return [
            _mask_result(t, to_display(np.take(self._ras_volume(k, shape), index, axis=axis), axis))
            for k, t in enumerate(self.targets)
        ]

    def _ras_volume(self, position: int, shape: tuple[int, int, int]) -> np.ndarray:
        if position not in self._volumes:
            volume = np.zeros(shape, dtype=bool)
            for k, mask in self.targets[position].frames.items():
                np.moveaxis(volume, SERVER_AXIS, 0)[k] = from_display(mask, SERVER_AXIS)
            self._volumes[position] = volume
        return self._volumes[position]


def view_masks(answer: VolumeAnswer, scan: Scan, view: View) -> list[MaskResult]:
    """The masks of the picture ``view`` shows of ``scan``."""
    if scan.kind == "nifti":
        return answer.plane_masks(scan.frames, view.axis, view.index)
    return answer.frame_masks(view.index)


def decode_volume_grounding(
    grounding: Mapping[str, Any] | None, num_frames: int, frame_shape: tuple[int, int]
) -> VolumeAnswer:
    """The targets of ``grounding`` over a stack of ``num_frames`` frames of ``frame_shape`` ``(H, W)``, ordered by
    their ``[SEG]``; a mask that does not fit the stack raises ``ValueError`` naming the mask and the field."""
    grounding = grounding or {}
    _check_video_size(grounding.get("video_size"), num_frames, frame_shape)
    items = grounding.get("volume_masks") or []
    flat = [m for m in grounding.get("masks") or [] if not (isinstance(m, Mapping) and "frames" in m)]
    if flat and not items:
        raise ValueError(
            f"the server answered with {len(flat)} mask(s) of one picture in 'grounding.masks', none through the "
            "volume sent. Fix: serve with a citrus-v deploy that takes volumes (video_url parts), or untick 'Ask "
            "about the whole volume'"
        )
    field_name = "grounding.volume_masks"
    if not items:  # the per-mask form with 'frames' inside 'masks'
        items, field_name = grounding.get("masks") or [], "grounding.masks"
    targets = [
        _decode_target(item, f"the server's mask {k} in '{field_name}'", k, num_frames, frame_shape)
        for k, item in enumerate(items)
    ]
    targets.sort(key=lambda t: t.index)
    notes = [str(line) for line in grounding.get("notes") or []]
    return VolumeAnswer(targets, num_frames, tuple(frame_shape), len(grounding.get("boxes") or []), notes)


def _check_video_size(size: Any, num_frames: int, frame_shape: tuple[int, int]) -> None:
    """The frames the server says it read fit the page's (it may name fewer: the last frame of an even sample of
    a long source can be left out)."""
    if not isinstance(size, Mapping):
        return
    theirs = (size.get("frames"), size.get("height"), size.get("width"))
    fits = (
        theirs[0] is None or int(theirs[0]) <= num_frames,
        theirs[1] is None or int(theirs[1]) == frame_shape[0],
        theirs[2] is None or int(theirs[2]) == frame_shape[1],
    )
    if not all(fits):
        raise ValueError(
            f"the server read {theirs[0]} frames of {theirs[2]}x{theirs[1]} pixels ('grounding.video_size') but the "
            f"page reads {num_frames} frames of {frame_shape[1]}x{frame_shape[0]} from the same file: the masks "
            "would land on the wrong frames"
        )


def _decode_target(
    item: Any, name: str, position: int, num_frames: int, frame_shape: tuple[int, int]
) -> VolumeTarget:
    """One target, every frame checked against the stack."""
    if not isinstance(item, Mapping) or not isinstance(item.get("frames"), list):
        raise ValueError(f"{name} has no 'frames' list of {{'frame': k, 'rle': COCO RLE}}")
    frames = {}
    for entry in item["frames"]:
        frame, mask = _decode_frame(entry, name, num_frames, frame_shape)
        if frame in frames:
            raise ValueError(f"{name} gives frame {frame} twice")
        frames[frame] = mask
    present = bool(item.get("present", bool(frames)))
    if not present and frames:
        raise ValueError(f"{name} says 'present': false but carries {len(frames)} frame(s) with mask")
    spacing = item.get("spacing")
    return VolumeTarget(
        index=int(item.get("index", position)),
        label=item.get("label"),
        present=present,
        frames=frames,
        volume_ml=None if item.get("volume_ml") is None else float(item["volume_ml"]),
        spacing=None if spacing is None else tuple(float(s) for s in spacing),
        bbox3d=item.get("bbox3d"),
        key_frame=None if item.get("key_frame") is None else int(item["key_frame"]),
        score=None if item.get("score") is None else float(item["score"]),
    )


def _decode_frame(
    entry: Any, name: str, num_frames: int, frame_shape: tuple[int, int]
) -> tuple[int, np.ndarray]:
    """One ``{"frame": k, "rle": ...}`` entry: the frame index (within the stack) and its mask (of the frame's size)."""
    from ..media import MedicalImageError, rle_to_mask

    try:
        frame = int(entry["frame"])
        mask = rle_to_mask(entry["rle"])
    except (KeyError, TypeError, ValueError, MedicalImageError) as err:
        raise ValueError(f"{name} has a frame entry that is not {{'frame': k, 'rle': COCO RLE}}: {err}") from err
    if not 0 <= frame < num_frames:
        raise ValueError(
            f"{name} names frame {frame}, but the volume sent has {num_frames} frames (0..{num_frames - 1}): the "
            "server answered about another volume"
        )
    if mask.shape != tuple(frame_shape):
        raise ValueError(
            f"{name}'s frame {frame} is {mask.shape[1]}x{mask.shape[0]} pixels but the volume's frames are "
            f"{frame_shape[1]}x{frame_shape[0]}: the server answered about another volume"
        )
    return frame, mask.astype(bool)


def _mask_result(target: VolumeTarget, mask: np.ndarray) -> MaskResult:
    return MaskResult(mask=mask, score=target.score or 0.0, label=target.label, index=target.index)
