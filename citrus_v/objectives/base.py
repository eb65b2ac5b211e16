"""The interface of a training-only auxiliary objective.

An objective is a loss that helps a small model learn on a small budget and that inference never computes
(a CPU-sized model that would otherwise ignore the image, or never learn to read or count). Each objective
lives in one file of this folder and owns everything about it:

- its config key (``weight_key``: 0.0, the default, turns it off and builds no head) and the overrides the
  tiny preset switches it on with (``preset``);
- the row annotations it reads (``reads``, see :mod:`.annotations`) and the target it builds from them for
  one encoded sample (:meth:`Objective.encode`), laid out per merged image token or per text position
  (``layout``) so that padding, packing and the trainer's fallback batch treat it without knowing it;
- its head (:meth:`Objective.build_head`, stored on the model under ``head_attribute`` so that saved tensor
  names stay put) and the model component the head trains with (``trains_with``);
- what it needs to see during the forward pass (:meth:`Objective.capture`, or ``needs_image_tokens``), its
  loss (:meth:`Objective.loss`), and the name its loss is logged under (``log_name``).

The model's forward hands every enabled objective an :class:`ObjectiveInputs`; the processor, collator,
validation, trainer and stage table loop over :mod:`.registry` and name none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_TARGET = -1  # target of image tokens (or patches) that an objective has nothing to say about
Layout = Literal["image_tokens", "positions", "none"]


@dataclass(frozen=True)
class EncodeContext:
    """What :meth:`Objective.encode` may read of one sample being encoded by the processor."""

    image_size: tuple[int, int]  # (width, height) of the sample's first image
    grid: torch.Tensor  # image_grid_thw of all the sample's images, [n_images, 3]
    merge: int  # the vision tower's spatial merge size
    input_ids: Sequence[int]
    labels: Sequence[int]
    image_token_id: int
    token_text: Callable[[int], str]  # token id -> its text


@dataclass
class ObjectiveInputs:
    """What the model's forward hands an objective: its targets and the intermediate tensors it may need."""

    model: nn.Module
    targets: Any  # the objective's collated targets (None when the batch carries none)
    captured: dict[str, Any] = field(default_factory=dict)  # what its capture() recorded
    image_tokens: torch.Tensor | None = None  # merged image tokens of every image, [N, hidden], pixel order
    image_grid_thw: torch.Tensor | None = None
    seg_points: list[torch.Tensor] | None = None  # per sample, the point head's (x, y) of each [SEG]
    gt_masks: list[torch.Tensor] | None = None  # per sample, the [SEG] mask targets [K_i, h, w]
    num_masks_in_batch: int | torch.Tensor | None = None
    # per volume or clip sample (None without [SEG]): the point head's (x, y) of each of its [SEG] [K_v, 2], and
    # their targets on the sample's training frames [K_v, F, h, w]; and the 3-D masks of the accumulated batch
    video_seg_points: list[torch.Tensor | None] | None = None
    video_masks: list[torch.Tensor | None] | None = None
    num_video_masks: int | torch.Tensor | None = None

    def head(self, objective: Objective) -> nn.Module:
        return getattr(self.model, objective.head_attribute)


class Objective:
    """Base class: subclass it in a new file of this folder and the registry finds it."""

    name: ClassVar[str]
    log_name: ClassVar[str]
    weight_key: ClassVar[str]
    layout: ClassVar[Layout] = "none"
    reads: ClassVar[tuple[str, ...]] = ()  # row annotations (see .annotations)
    head_attribute: ClassVar[str | None] = None
    trains_with: ClassVar[str | None] = None  # the stage-table component the head belongs to
    needs_image_tokens: ClassVar[bool] = False
    preset: ClassVar[dict[str, Any]] = {}  # config overrides that switch it on in the tiny preset

    def weight(self, config: Any) -> float:
        return float(getattr(config, self.weight_key, 0.0) or 0.0)

    def enabled(self, config: Any) -> bool:
        return self.weight(config) > 0

    def build_head(self, config: Any) -> nn.Module | None:
        """The head the objective trains (None: it has none)."""
        return None

    def encode(self, annotations: dict[str, Any], context: EncodeContext) -> Any:
        """The target of one sample from its loaded annotations; None when the sample gives none."""
        return None

    def active(self, targets: dict[str, Any]) -> bool:
        """Whether this batch gives the objective something to do (by default: it carries its targets)."""
        return targets.get(self.name) is not None

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, Any]]:
        """While open (around the language model's forward), record what :meth:`loss` needs."""
        yield {}

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        raise NotImplementedError


def first_image_targets(
    grid: torch.Tensor, merge: int, target_of: Callable[[tuple[int, int], int], torch.Tensor]
) -> torch.Tensor:
    """Per merged image token of all of a sample's images: ``target_of(cells, merge)`` for the first image's
    cells (``[n]`` or ``[n, ...]``, repeated over its frames), :data:`IGNORE_TARGET` for the other images."""
    parts = []
    for k, (t, h, w) in enumerate(grid.tolist()):
        cells = (h // merge, w // merge)
        first = target_of(cells, merge)
        if k == 0:
            parts.append(first.repeat(t, *[1] * (first.dim() - 1)))
        else:
            shape = (t * cells[0] * cells[1], *first.shape[1:])
            parts.append(torch.full(shape, IGNORE_TARGET, dtype=first.dtype))
    return torch.cat(parts)


def collate_image_tokens(
    targets: Sequence[torch.Tensor | None], grids: Sequence[torch.Tensor | None], merge: int
) -> torch.Tensor | None:
    """Concatenate samples' per-image-token targets in ``pixel_values`` order; samples with images but no
    targets get :data:`IGNORE_TARGET`. None when no sample has targets, so such batches carry no key."""
    present = [t for t in targets if t is not None]
    if not present:
        return None
    trailing, dtype = tuple(present[0].shape[1:]), present[0].dtype
    parts = []
    for target, grid in zip(targets, grids, strict=True):
        if grid is None:
            continue
        if target is not None:
            parts.append(target)
        else:
            tokens = int(grid.prod(dim=-1).sum()) // (merge * merge)
            parts.append(torch.full((tokens, *trailing), IGNORE_TARGET, dtype=dtype))
    return torch.cat(parts)


def collate_positions(
    rows: Sequence[Sequence[tuple[Sequence[int] | None, int]]], width: int, side: str = "right"
) -> torch.Tensor | None:
    """``[len(rows), width]`` per-position targets (0: none). Each row lists its samples in order as
    ``(targets or None, length)``; the row is written against ``side``. None when no sample has targets."""
    if not any(t is not None for row in rows for t, _ in row):
        return None
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        pieces = [torch.zeros(n, dtype=torch.long) if t is None else torch.as_tensor(t, dtype=torch.long)
                  for t, n in row]
        values = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        span = slice(width - len(values), width) if side == "left" else slice(0, len(values))
        out[index, span] = values
    return out


def blank_targets(layout: Layout, targets: Any) -> Any:
    """The same targets with nothing to learn from: what a batch of skipped rows stands in with."""
    if layout == "image_tokens":
        return targets.clone().fill_(IGNORE_TARGET)
    if layout == "positions":
        return targets.clone().zero_()
    return targets


# --- where a [SEG]'s target is: the point objective's targets and loss, which the point-head fit
# (citrus_v.train.point_head_fit) shares
def interior_points(masks: torch.Tensor) -> torch.Tensor:
    """The innermost pixel of each binary mask ``[K, h, w]`` as ``[K, 2]`` (x, y) pixel indices; NaN for an
    empty mask.

    Innermost: the pixels left after the most 3×3 erosions, the one nearest to their centroid (a centroid
    alone can fall outside a crescent such as a lung).
    """
    points = torch.full((masks.shape[0], 2), float("nan"), device=masks.device)
    for k, mask in enumerate(masks):
        core = (mask > 0.5).float()[None, None]
        if not bool(core.any()):
            continue
        while True:
            eroded = -F.max_pool2d(-core, 3, stride=1, padding=1)
            # the image edge does not erode (the pooling pads with -inf): a mask filling the image would
            # erode to itself for ever, and all its pixels are equally inner
            if not bool(eroded.any()) or torch.equal(eroded, core):
                break
            core = eroded
        ys, xs = torch.nonzero(core[0, 0], as_tuple=True)
        centre_y, centre_x = ys.float().mean(), xs.float().mean()
        nearest = ((ys - centre_y) ** 2 + (xs - centre_x) ** 2).argmin()
        points[k] = torch.stack([xs[nearest], ys[nearest]]).to(points.dtype)
    return points


def point_distance_loss(predicted: torch.Tensor, target: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """L1 distance per point (mean over x and y, both as fractions of the image side), summed over the
    points with a target (rows of ``target`` that are not NaN) and divided by ``count``."""
    known = ~torch.isnan(target).any(dim=-1)
    distance = (predicted[known].float() - target[known].float()).abs().mean(dim=-1)
    count = torch.as_tensor(count, dtype=torch.float32, device=predicted.device).clamp(min=1)
    return distance.sum() / count
