"""Packing: several encoded samples per sequence, each with its own positions and no attention across samples.

Each packed row concatenates samples (from :meth:`CitrusVProcessor.encode_sample`) up to ``max_length``.
Positions restart at every sample: ``position_ids`` is ``[4, B, L]`` — row 0 the plain text positions,
rows 1-3 Qwen2.5-VL's 3-D (temporal, height, width) rope positions computed per sample by transformers'
own ``get_rope_index``. With ``attention_mask=None`` transformers reads the sample boundaries from the
text positions: flash attention runs variable-length kernels, and SDPA/eager (CPU) get an exact
block-diagonal causal mask. The tail padding of a row is a separate pseudo-sample with ignored labels.

Masks: ``gt_masks[row]`` holds the row's masks in ``[SEG]`` order. Today's model pairs every ``[SEG]`` of
a row with that row's one SAM image (``sam_pixel_values[row]``), so by default a packed row holds one
sample with ``[SEG]`` and samples without (VQA, reports, boxes) fill the rest. With ``max_seg_samples > 1``
the batch carries one SAM image per ``[SEG]`` sample (``sam_pixel_values [N, 3, S, S]``) and
``seg_image_index`` (per row, the SAM image of each ``[SEG]``) — for a model that accepts that key.

Videos: a sample's ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts`` are concatenated in
pack order, as its images are; its video tokens are typed 2 in ``mm_token_type_ids`` and get their rotary time
positions from ``get_rope_index`` with the model's ``tokens_per_second``. A sample with 3-D masks keeps its own
SAM 2 training frames and targets: the batch lists them per such sample (``sam_video_pixel_values``,
``gt_video_masks``, ``gt_video_present``), and ``seg_video_index`` gives per row the sample of each ``[SEG]``
(-1 for a ``[SEG]`` of an image; those keep ``gt_masks`` and ``seg_image_index`` as above).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from .. import objectives
from ..tokens import IGNORE_INDEX


@dataclass
class PackStats:
    """Real tokens over the tokens of the padded batch (1.0 = no padding)."""

    real_tokens: int
    padded_tokens: int
    sequences: int
    samples: int

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def plan_packs(
    lengths: Sequence[int],
    max_length: int,
    has_seg: Sequence[bool] | None = None,
    max_seg_samples: int = 1,
) -> list[list[int]]:
    """Group sample indices into packs of at most ``max_length`` tokens (first-fit decreasing).

    At most ``max_seg_samples`` samples with ``[SEG]`` share a pack. A sample longer than ``max_length``
    raises ``ValueError`` (drop it before packing: samples are never cut).
    """
    has_seg = list(has_seg) if has_seg is not None else [False] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    segs: list[int] = []
    for index in order:
        length = int(lengths[index])
        if length > max_length:
            raise ValueError(f"sample {index} has {length} tokens > max_length {max_length}: drop it before packing")
        for k in range(len(packs)):
            if room[k] >= length and (not has_seg[index] or segs[k] < max_seg_samples):
                packs[k].append(index)
                room[k] -= length
                segs[k] += int(has_seg[index])
                break
        else:
            packs.append([index])
            room.append(max_length - length)
            segs.append(int(has_seg[index]))
    for pack in packs:
        pack.sort()  # keep the original order inside a pack
    return packs


def padded_stats(lengths: Sequence[int], batch_size: int) -> PackStats:
    """Efficiency of plain padding: consecutive batches of ``batch_size``, each padded to its longest sample."""
    padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        padded += max(chunk) * len(chunk)
    return PackStats(int(sum(lengths)), padded, len(lengths), len(lengths))


def packed_stats(lengths: Sequence[int], packs: list[list[int]], max_length: int | None = None) -> PackStats:
    """Efficiency of packs, each padded to ``max_length`` (or to the longest pack when None)."""
    sizes = [sum(lengths[i] for i in pack) for pack in packs]
    width = max_length if max_length is not None else max(sizes, default=0)
    return PackStats(int(sum(sizes)), width * len(packs), len(packs), sum(len(p) for p in packs))


# what _rope_owner's time scale is when no video asks for the model's: images have no time positions
IMAGE_ONLY_TOKENS_PER_SECOND = 2
# the batch keys of the samples with 3-D masks, listed per such sample in pack order
VIDEO_TARGET_KEYS = ("sam_video_pixel_values", "gt_video_masks", "gt_video_present")


@functools.lru_cache(maxsize=8)
def _rope_owner(spatial_merge_size: int, tokens_per_second: int = IMAGE_ONLY_TOKENS_PER_SECOND) -> SimpleNamespace:
    """The attributes transformers' ``get_rope_index`` reads, so that packing uses its exact code."""
    vision = SimpleNamespace(spatial_merge_size=spatial_merge_size, tokens_per_second=tokens_per_second)
    owner = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    owner.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, owner)
    return owner


def rope_positions(
    input_ids: torch.Tensor,
    image_token_id: int,
    image_grid_thw: torch.Tensor | None,
    spatial_merge_size: int,
    video_token_id: int | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    tokens_per_second: int | None = None,
) -> torch.Tensor:
    """Qwen2.5-VL's 3-D rope positions ``[3, L]`` of one sample (text positions when it has no image or video).

    A sample with a video needs ``video_token_id`` and the model's ``tokens_per_second``.
    """
    ids = input_ids.view(1, -1)
    has_images = image_grid_thw is not None and image_grid_thw.numel() > 0
    has_videos = video_grid_thw is not None and video_grid_thw.numel() > 0
    if not has_images and not has_videos:
        return torch.arange(ids.shape[1]).view(1, -1).expand(3, -1).clone()
    token_types = (ids == image_token_id).int()
    if not has_videos:
        positions, _ = Qwen2_5_VLModel.get_rope_index(
            _rope_owner(spatial_merge_size), ids, mm_token_type_ids=token_types, image_grid_thw=image_grid_thw
        )
        return positions[:, 0]
    if video_token_id is None or tokens_per_second is None:
        raise ValueError(
            "packing a sample with a video needs the video token id and the model's vision_config.tokens_per_second "
            "(its rotary time scale). Fix: CitrusVCollator(..., tokens_per_second=model.config.vision_config."
            "tokens_per_second), or train without --packing"
        )
    token_types = token_types + 2 * (ids == video_token_id).int()
    positions, _ = Qwen2_5_VLModel.get_rope_index(
        _rope_owner(spatial_merge_size, int(tokens_per_second)),
        ids,
        mm_token_type_ids=token_types,
        image_grid_thw=image_grid_thw if has_images else None,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
    )
    return positions[:, 0]


@dataclass
class _PackedRow:
    """One packed row before padding: its samples' tokens, positions, masks and SAM images, concatenated."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    rope: torch.Tensor  # [3, L]
    text_positions: torch.Tensor  # [L]
    masks: torch.Tensor  # [K, h, w]
    sam: torch.Tensor | None  # the SAM image of its one [SEG] sample (max_seg_samples == 1)
    seg_image_index: torch.Tensor  # per [SEG] of an image, its image in the batch's per-[SEG]-sample list
    seg_video_index: torch.Tensor  # per [SEG], its sample in the batch's list of samples with 3-D masks (-1: none)


@dataclass
class _PackSettings:
    """What packing needs to know of the tokenizer, the processor and the model."""

    image_token_id: int
    spatial_merge_size: int
    mask_size: int
    max_seg_samples: int
    video_token_id: int | None = None
    tokens_per_second: int | None = None

    def positions(self, sample: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        """The sample's own rope positions (its images' and videos' grids)."""
        if sample.get("video_grid_thw") is None:
            return rope_positions(ids, self.image_token_id, sample.get("image_grid_thw"), self.spatial_merge_size)
        return rope_positions(
            ids,
            self.image_token_id,
            sample.get("image_grid_thw"),
            self.spatial_merge_size,
            video_token_id=self.video_token_id,
            video_grid_thw=sample["video_grid_thw"],
            second_per_grid_ts=sample.get("second_per_grid_ts"),
            tokens_per_second=self.tokens_per_second,
        )


def _pack_row(
    encoded: Sequence[dict[str, Any]],
    pack: list[int],
    settings: _PackSettings,
    per_seg_images: list[torch.Tensor],
    video_samples: list[dict[str, Any]],
) -> _PackedRow:
    """Concatenate the samples of one pack; their SAM images are appended to ``per_seg_images`` and the samples
    with 3-D masks to ``video_samples``."""
    ids, labels, pos, text_pos, masks, image_index, video_index = [], [], [], [], [], [], []
    sam = None
    for index in pack:
        sample = encoded[index]
        sample_ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        ids.append(sample_ids)
        labels.append(torch.as_tensor(sample["labels"], dtype=torch.long))
        pos.append(settings.positions(sample, sample_ids))
        text_pos.append(torch.arange(len(sample_ids)))
        targets = sample.get("gt_masks")
        if targets is not None and targets.shape[0]:
            if sam is not None and settings.max_seg_samples == 1:
                raise ValueError("two samples with [SEG] in one packed row: plan packs with max_seg_samples=1")
            sam = sample["sam_pixel_values"]
            masks.append(targets)
            image_index += [len(per_seg_images)] * int(targets.shape[0])
            video_index += [-1] * int(targets.shape[0])
            per_seg_images.append(sam)
        if sample.get("gt_video_masks") is not None:
            video_index += [len(video_samples)] * int(sample["gt_video_masks"].shape[0])
            video_samples.append(sample)
    return _PackedRow(
        input_ids=torch.cat(ids),
        labels=torch.cat(labels),
        rope=torch.cat(pos, dim=1),
        text_positions=torch.cat(text_pos),
        masks=torch.cat(masks) if masks else torch.zeros(0, settings.mask_size, settings.mask_size),
        sam=sam,
        seg_image_index=torch.tensor(image_index, dtype=torch.long),
        seg_video_index=torch.tensor(video_index, dtype=torch.long),
    )


def _pad_rows(rows: list[_PackedRow], width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token ids, labels and the ``[4, B, L]`` positions of the packed rows, padded to ``width``."""
    batch_size = len(rows)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    label_ids = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((4, batch_size, width), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row.input_ids)
        input_ids[index, :length] = row.input_ids
        label_ids[index, :length] = row.labels
        position_ids[0, index, :length] = row.text_positions
        position_ids[1:, index, :length] = row.rope
        # padding is its own pseudo-sample: positions restart, so it attends only to itself
        position_ids[:, index, length:] = torch.arange(width - length)
    return {"input_ids": input_ids, "labels": label_ids, "position_ids": position_ids}


def _token_types(input_ids: torch.Tensor, settings: _PackSettings) -> torch.Tensor:
    """``mm_token_type_ids``: 0 text, 1 image token, 2 video token (as the processor's ``mm_token_type_ids``)."""
    types = (input_ids == settings.image_token_id).int()
    if settings.video_token_id is not None:
        types = types + 2 * (input_ids == settings.video_token_id).int()
    return types


def pack_encoded(
    encoded: Sequence[dict[str, Any]],
    packs: list[list[int]],
    pad_token_id: int,
    image_token_id: int,
    spatial_merge_size: int,
    sam_image_size: int,
    mask_size: int,
    pad_to: int | None = None,
    return_labels: bool = True,
    max_seg_samples: int = 1,
    video_token_id: int | None = None,
    tokens_per_second: int | None = None,
) -> dict[str, Any]:
    """Build a packed CitrusV batch from encoded samples and a pack plan (see the module docstring).

    ``video_token_id`` and the model's ``tokens_per_second`` are needed once a sample has a video.
    """
    settings = _PackSettings(
        image_token_id, spatial_merge_size, mask_size, max_seg_samples, video_token_id, tokens_per_second
    )
    per_seg_images: list[torch.Tensor] = []
    video_samples: list[dict[str, Any]] = []
    rows = [_pack_row(encoded, pack, settings, per_seg_images, video_samples) for pack in packs]
    width = max(len(row.input_ids) for row in rows)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"a packed row has {width} tokens > pad_to {pad_to}")
        width = pad_to
    padded = _pad_rows(rows, width, pad_token_id)
    labels = padded.pop("labels")
    batch: dict[str, Any] = {**padded, "mm_token_type_ids": _token_types(padded["input_ids"], settings)}
    # pixel_values are gathered pack by pack, sample by sample: every per-image target follows that order
    in_order = [encoded[i] for pack in packs for i in pack]
    with_pixels = [sample for sample in in_order if sample.get("pixel_values") is not None]
    if with_pixels:
        batch["pixel_values"] = torch.cat([sample["pixel_values"] for sample in with_pixels])
        batch["image_grid_thw"] = torch.cat([sample["image_grid_thw"] for sample in with_pixels])
    with_videos = [sample for sample in in_order if sample.get("pixel_values_videos") is not None]
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if with_videos else ():
        batch[key] = torch.cat([sample[key] for sample in with_videos])
    empty = torch.zeros(3, sam_image_size, sam_image_size)
    if max_seg_samples == 1:
        batch["sam_pixel_values"] = torch.stack([row.sam if row.sam is not None else empty for row in rows])
        batch["sam_image_mask"] = torch.tensor([row.sam is not None for row in rows], dtype=torch.bool)
    else:
        batch["sam_pixel_values"] = torch.stack(per_seg_images) if per_seg_images else empty[None][:0]
        batch["seg_image_index"] = [row.seg_image_index for row in rows]
    if return_labels:
        batch["labels"] = labels
        batch["gt_masks"] = [row.masks for row in rows]
        if video_samples:
            batch.update({key: [sample[key] for sample in video_samples] for key in VIDEO_TARGET_KEYS})
            batch["seg_video_index"] = [row.seg_video_index for row in rows]
        starts = [0, *itertools.accumulate(len(pack) for pack in packs)]
        layout = [list(range(start, start + len(pack))) for start, pack in zip(starts, packs, strict=False)]
        targets = objectives.collate_targets(in_order, spatial_merge_size, layout, width)
        if targets:
            batch["objective_targets"] = targets
    return batch
