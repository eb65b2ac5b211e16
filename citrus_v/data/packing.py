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
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from ..processing.processor import token_map_batches
from ..processing.template import IGNORE_INDEX


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


@functools.lru_cache(maxsize=8)
def _rope_owner(spatial_merge_size: int) -> SimpleNamespace:
    """The attributes transformers' ``get_rope_index`` reads, so that packing uses its exact code."""
    vision = SimpleNamespace(spatial_merge_size=spatial_merge_size, tokens_per_second=2)
    owner = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    owner.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, owner)
    return owner


def rope_positions(
    input_ids: torch.Tensor, image_token_id: int, image_grid_thw: torch.Tensor | None, spatial_merge_size: int
) -> torch.Tensor:
    """Qwen2.5-VL's 3-D rope positions ``[3, L]`` of one sample (text positions when it has no image)."""
    ids = input_ids.view(1, -1)
    if image_grid_thw is None or image_grid_thw.numel() == 0:
        return torch.arange(ids.shape[1]).view(1, -1).expand(3, -1).clone()
    token_types = (ids == image_token_id).int()
    positions, _ = Qwen2_5_VLModel.get_rope_index(
        _rope_owner(spatial_merge_size), ids, mm_token_type_ids=token_types, image_grid_thw=image_grid_thw
    )
    return positions[:, 0]


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
) -> dict[str, Any]:
    """Build a packed CitrusV batch from encoded samples and a pack plan (see the module docstring)."""
    rows_ids, rows_labels, rows_pos, rows_text_pos, rows_copy = [], [], [], [], []
    pixel_values, grids, sam_inputs, sam_flags, gt_masks = [], [], [], [], []
    per_seg_images: list[torch.Tensor] = []
    seg_image_index: list[torch.Tensor] = []
    for pack in packs:
        ids, labels, pos, text_pos, masks, image_index, copy = [], [], [], [], [], [], []
        sam = None
        for index in pack:
            sample = encoded[index]
            sample_ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            ids.append(sample_ids)
            labels.append(torch.as_tensor(sample["labels"], dtype=torch.long))
            offsets = sample.get("copy_offsets")  # distances back: unchanged by packing
            copy.append(torch.zeros_like(sample_ids) if offsets is None else torch.as_tensor(offsets, dtype=torch.long))
            grid = sample.get("image_grid_thw")
            pos.append(rope_positions(sample_ids, image_token_id, grid, spatial_merge_size))
            text_pos.append(torch.arange(len(sample_ids)))
            if sample.get("pixel_values") is not None:
                pixel_values.append(sample["pixel_values"])
                grids.append(grid)
            targets = sample.get("gt_masks")
            if targets is not None and targets.shape[0]:
                if sam is not None and max_seg_samples == 1:
                    raise ValueError("two samples with [SEG] in one packed row: plan packs with max_seg_samples=1")
                sam = sample["sam_pixel_values"]
                masks.append(targets)
                image_index += [len(per_seg_images)] * int(targets.shape[0])
                per_seg_images.append(sam)
        rows_ids.append(torch.cat(ids))
        rows_labels.append(torch.cat(labels))
        rows_copy.append(torch.cat(copy))
        rows_pos.append(torch.cat(pos, dim=1))
        rows_text_pos.append(torch.cat(text_pos))
        sam_flags.append(sam is not None)
        sam_inputs.append(sam if sam is not None else torch.zeros(3, sam_image_size, sam_image_size))
        gt_masks.append(torch.cat(masks) if masks else torch.zeros(0, mask_size, mask_size))
        seg_image_index.append(torch.tensor(image_index, dtype=torch.long))
    width = max(len(r) for r in rows_ids)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"a packed row has {width} tokens > pad_to {pad_to}")
        width = pad_to
    batch_size = len(rows_ids)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    label_ids = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((4, batch_size, width), dtype=torch.long)
    copy_offsets = torch.zeros((batch_size, width), dtype=torch.long)
    for row in range(batch_size):
        length = len(rows_ids[row])
        input_ids[row, :length] = rows_ids[row]
        label_ids[row, :length] = rows_labels[row]
        copy_offsets[row, :length] = rows_copy[row]
        position_ids[0, row, :length] = rows_text_pos[row]
        position_ids[1:, row, :length] = rows_pos[row]
        # padding is its own pseudo-sample: positions restart, so it attends only to itself
        tail = torch.arange(width - length)
        position_ids[:, row, length:] = tail
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "mm_token_type_ids": (input_ids == image_token_id).int(),
    }
    if return_labels:
        batch["labels"] = label_ids
        if any(encoded[i].get("copy_offsets") is not None for pack in packs for i in pack):
            batch["copy_offsets"] = copy_offsets
    if pixel_values:
        batch["pixel_values"] = torch.cat(pixel_values)
        batch["image_grid_thw"] = torch.cat(grids)
    if max_seg_samples == 1:
        batch["sam_pixel_values"] = torch.stack(sam_inputs)
        batch["sam_image_mask"] = torch.tensor(sam_flags, dtype=torch.bool)
    else:
        empty = torch.zeros(0, 3, sam_image_size, sam_image_size)
        batch["sam_pixel_values"] = torch.stack(per_seg_images) if per_seg_images else empty
        batch["seg_image_index"] = seg_image_index
    if return_labels:
        batch["gt_masks"] = gt_masks
        # pixel_values were gathered pack by pack, sample by sample: gather the token maps in that order
        batch.update(token_map_batches([encoded[i] for pack in packs for i in pack], spatial_merge_size))
    return batch
