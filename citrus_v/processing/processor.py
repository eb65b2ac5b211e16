"""``CitrusVProcessor``: tokenizer + Qwen2-VL image processor + SAM 2 input + mask targets.

Built from transformers' PIL Qwen2-VL image processor and a tokenizer, so it needs no torchvision.
Pixel bounds follow upstream: explicit arguments, else the ``MIN_PIXELS`` / ``MAX_PIXELS`` environment
variables, else the saved values.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .copy_targets import copy_offsets, read_lines
from .images import (
    IGNORE_TARGET,
    ImageInput,
    MaskInput,
    lesion_count_target,
    lesion_map_target,
    load_image,
    load_mask,
    mask_target,
    sam_pixel_values,
    text_map_target,
)
from .template import IGNORE_INDEX, ChatTemplate, TemplateError, place_images
from .tokenizer_builder import add_citrus_tokens
from .tokens import DEFAULT_SYSTEM, SEG_TOKEN

logger = logging.getLogger(__name__)

PROCESSOR_FILE = "citrus_v_processor.json"
DEFAULT_MIN_PIXELS = 200704  # upstream training bounds
DEFAULT_MAX_PIXELS = 1003520


class ProcessorError(ValueError):
    """A processor folder or a sample the processor cannot use, with the fix in the message."""


class Sample(TypedDict, total=False):
    """One conversation: ms-swift rows hold exactly these keys (images and masks may be paths)."""

    messages: list[dict]
    images: list[ImageInput]
    masks: list[MaskInput]
    system: str
    lesion_map: MaskInput  # optional, training-only: lesion pixels of the first image
    lesion_points: list[list[float]]  # optional, training-only: each lesion's centre (x, y) in the first image
    text_map: np.ndarray  # optional, training-only: character classes of the first image's pixels


# per merged image token, training-only
TOKEN_MAP_KEYS = ("lesion_map_targets", "lesion_count_targets", "text_map_targets")


def token_map_batch(encoded: Sequence[dict[str, Any]], merge: int, key: str) -> torch.Tensor | None:
    """Concatenate samples' per-token targets ``key`` (``lesion_map_targets`` or ``lesion_count_targets``
    ``[n]``, ``text_map_targets`` ``[n, merge*merge]``) in ``pixel_values`` order; samples without a map get
    -1 (ignored).

    None when no sample has a map, so batches without maps carry no extra key.
    """
    present = [e[key] for e in encoded if e.get(key) is not None]
    if not present:
        return None
    trailing = tuple(present[0].shape[1:])
    parts = []
    for e in encoded:
        if e.get("pixel_values") is None:
            continue
        if e.get(key) is not None:
            parts.append(e[key])
        else:
            tokens = int(e["image_grid_thw"].prod(dim=-1).sum()) // (merge * merge)
            parts.append(torch.full((tokens, *trailing), IGNORE_TARGET, dtype=present[0].dtype))
    return torch.cat(parts)


def token_map_batches(encoded: Sequence[dict[str, Any]], merge: int) -> dict[str, torch.Tensor]:
    """Every training-only per-token target key that some sample of ``encoded`` carries."""
    batches = {key: token_map_batch(encoded, merge, key) for key in TOKEN_MAP_KEYS}
    return {key: value for key, value in batches.items() if value is not None}


def _pixels_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as err:
        raise ProcessorError(f"environment variable {name}={value!r} is not an integer number of pixels") from err


class CitrusVProcessor:
    """Turns conversations with images and masks into model inputs.

    Args:
        tokenizer: a Qwen2.5 ChatML tokenizer that holds ``[SEG]``.
        image_processor: the Qwen2-VL image processor (smart resize to multiples of patch×merge).
        sam_image_size: side of the square SAM 2 input (1024 for SAM 2 Hiera).
        mask_size: side of the low-res mask targets (``4 × sam_image_size / 16``; 256 for 1024).
        default_system: system prompt used when a sample gives none.
        min_pixels, max_pixels: smart-resize bounds; default ``MIN_PIXELS``/``MAX_PIXELS`` from the
            environment, else the image processor's saved ``size``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Qwen2VLImageProcessorPil,
        sam_image_size: int = 1024,
        mask_size: int = 256,
        default_system: str | None = DEFAULT_SYSTEM,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        if SEG_TOKEN not in tokenizer.get_vocab():
            raise ProcessorError(
                f"the tokenizer has no {SEG_TOKEN} token. Fix: add it with "
                "citrus_v.processing.tokenizer_builder.add_citrus_tokens(tokenizer), or build the model "
                "with `citrus-v build`, which adds it"
            )
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}  # token id -> text, for copy-attention targets
        self.image_processor = image_processor
        self.sam_image_size = int(sam_image_size)
        self.mask_size = int(mask_size)
        self.default_system = default_system
        self.template = ChatTemplate(tokenizer, default_system)
        resolve_pixels(image_processor, min_pixels, max_pixels)

    # --- ids -------------------------------------------------------------------------------------------
    @property
    def seg_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(SEG_TOKEN))

    @property
    def image_token_id(self) -> int:
        return self.template.image_pad_id

    @property
    def min_pixels(self) -> int:
        return int(self.image_processor.size.shortest_edge)

    @property
    def max_pixels(self) -> int:
        return int(self.image_processor.size.longest_edge)

    # --- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer, the image processor and ``citrus_v_processor.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        settings = {
            "processor_class": type(self).__name__,
            "sam_image_size": self.sam_image_size,
            "mask_size": self.mask_size,
            "default_system": self.default_system,
        }
        (directory / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **overrides: Any,
    ) -> CitrusVProcessor:
        """Load from a folder written by :meth:`save_pretrained`, a Qwen2.5-VL folder holding ``[SEG]``, or a
        released upstream Citrus-V folder (its tokenizer gets ``[SEG]``, ``<bbox>``, ``</bbox>`` where missing,
        as upstream's loader does; the SAM sizes come from its SAM 2 configuration)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ProcessorError(f"{directory} is not a folder: give the model folder written by `citrus-v build`")
        if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
            raise ProcessorError(
                f"{directory / 'tokenizer.json'} is missing: the folder has no tokenizer. Fix: copy the "
                "tokenizer files of the base model into it, or rebuild it with `citrus-v build`"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as err:  # transformers raises many types here; name the folder and the fix
            raise ProcessorError(
                f"cannot load the tokenizer in {directory}: {err}. Fix: check tokenizer.json / "
                "tokenizer_config.json, or rebuild the folder with `citrus-v build`"
            ) from err
        settings: dict[str, Any] = _upstream_settings(directory, tokenizer)
        settings_file = directory / PROCESSOR_FILE
        if settings_file.is_file():
            try:
                settings = json.loads(settings_file.read_text())
            except json.JSONDecodeError as err:
                raise ProcessorError(f"{settings_file} line {err.lineno}: invalid JSON ({err.msg})") from err
        settings.pop("processor_class", None)
        settings.update(overrides)
        if (directory / "preprocessor_config.json").is_file():
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
        else:
            image_processor = Qwen2VLImageProcessorPil(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS)
        return cls(tokenizer, image_processor, min_pixels=min_pixels, max_pixels=max_pixels, **settings)

    # --- encoding ---------------------------------------------------------------------------------------
    def __call__(
        self,
        samples: Sample | Sequence[Sample],
        add_generation_prompt: bool = False,
        padding_side: str = "right",
        return_labels: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """Encode one or more samples into a padded batch.

        Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
        ``image_grid_thw`` (when there are images), ``sam_pixel_values`` ``[B, 3, S, S]``,
        ``sam_image_mask`` ``[B]``, and with ``return_labels`` also ``labels`` and ``gt_masks``
        (per sample ``[K_i, h, w]``, one per ``[SEG]`` in the sample's text). A sample longer than
        ``max_length`` raises (samples are dropped, never cut; see :class:`~.template.SampleTooLongError`).
        """
        if isinstance(samples, dict):
            samples = [samples]
        rows = []
        for index, sample in enumerate(samples):
            try:
                rows.append(self._encode_sample(sample, add_generation_prompt, return_labels, max_length))
            except (TemplateError, ProcessorError, FileNotFoundError, ValueError, TypeError) as err:
                raise ProcessorError(f"sample {index}: {err}") from err
        return self.collate(rows, padding_side, return_labels)

    def encode_sample(
        self,
        sample: Sample,
        add_generation_prompt: bool = False,
        return_labels: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """Encode one sample: ``input_ids``/``labels`` lists, ``pixel_values``, ``image_grid_thw``,
        ``sam_pixel_values`` (or None without an image) and ``gt_masks`` ``[K, h, w]``.

        The unit that :meth:`collate` pads and :mod:`citrus_v.data.packing` packs. Raises
        :class:`~.template.SampleTooLongError` past ``max_length`` (the sample is dropped, never cut).
        """
        return self._encode_sample(sample, add_generation_prompt, return_labels, max_length)

    def collate(
        self, rows: Sequence[dict[str, Any]], padding_side: str = "right", return_labels: bool = True
    ) -> dict[str, Any]:
        """Pad samples from :meth:`encode_sample` into one batch (the same keys as :meth:`__call__`)."""
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pixel_values, grids, sam_inputs, sam_flags, gt_masks = [], [], [], [], []
        for encoded in rows:
            if encoded["pixel_values"] is not None:
                pixel_values.append(encoded["pixel_values"])
                grids.append(encoded["image_grid_thw"])
            sam_inputs.append(encoded["sam_pixel_values"])
            sam_flags.append(encoded["sam_pixel_values"] is not None)
            gt_masks.append(encoded["gt_masks"])

        batch = self._pad([r["input_ids"] for r in rows], [r["labels"] for r in rows], padding_side)
        if not return_labels:
            batch.pop("labels")
        if return_labels and any(r.get("copy_offsets") is not None for r in rows):
            # distances, not positions: the same on either padding side
            offsets = [r.get("copy_offsets") for r in rows]
            batch["copy_offsets"] = _pad_rows(offsets, batch["input_ids"].shape[1], 0, padding_side)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).int()
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
            batch["image_grid_thw"] = torch.cat(grids)
        size = self.sam_image_size
        batch["sam_pixel_values"] = torch.stack(
            [s if s is not None else torch.zeros(3, size, size) for s in sam_inputs]
        )
        batch["sam_image_mask"] = torch.tensor(sam_flags, dtype=torch.bool)
        if return_labels:
            batch["gt_masks"] = gt_masks
            batch.update(token_map_batches(rows, int(self.image_processor.merge_size)))
        return batch

    def _encode_sample(
        self, sample: Sample, add_generation_prompt: bool, return_labels: bool, max_length: int | None = None
    ) -> dict[str, Any]:
        if not isinstance(sample, dict) or "messages" not in sample:
            raise ProcessorError("each sample must be a dict with a 'messages' list")
        images = [load_image(image) for image in sample.get("images") or []]
        messages = place_images(sample["messages"], len(images))
        pixel_values = grid = None
        image_tokens: list[int] = []
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
            merge = int(self.image_processor.merge_size) ** 2
            image_tokens = [int(t * h * w) // merge for t, h, w in grid.tolist()]
        encoded = self.template.encode(
            messages,
            image_tokens,
            system=sample.get("system"),
            add_generation_prompt=add_generation_prompt,
            max_length=max_length,
        )
        num_seg = sum(1 for token in encoded.input_ids if token == self.seg_token_id)
        masks = sample.get("masks") or []
        if return_labels and masks and len(masks) != num_seg:
            raise ProcessorError(
                f"{len(masks)} mask(s) for {num_seg} {SEG_TOKEN} token(s): give one mask per {SEG_TOKEN}, in order"
            )
        if num_seg and not images:
            raise ProcessorError(f"{num_seg} {SEG_TOKEN} token(s) but no image: a mask needs an image")
        mask_hw = (self.mask_size, self.mask_size)
        binary = [load_mask(mask) for mask in masks]
        if images:
            width, height = images[0].size
            for k, array in enumerate(binary):
                if array.shape != (height, width):
                    raise ProcessorError(
                        f"mask {k} is {array.shape[1]}x{array.shape[0]} but the first image is "
                        f"{width}x{height}: masks must match their image's size"
                    )
        targets = torch.stack([mask_target(b, mask_hw) for b in binary]) if binary else torch.zeros(0, *mask_hw)
        lesion_targets = count_targets = text_targets = None
        if return_labels and sample.get("lesion_map") is not None and images:
            lesion_targets = self._lesion_map_targets(sample["lesion_map"], images[0].size, grid)
        if return_labels and sample.get("lesion_points") is not None and images:
            count_targets = self._lesion_count_targets(sample["lesion_points"], images[0].size, grid)
        copy = None
        if return_labels and sample.get("text_map") is not None and images:
            text_targets = self._text_map_targets(np.asarray(sample["text_map"]), images[0].size, grid)
            copy = self._copy_offsets(encoded.input_ids, encoded.labels, text_targets, grid)
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
            "sam_pixel_values": sam_pixel_values(images[0], self.sam_image_size) if images else None,
            "gt_masks": targets,
            "lesion_map_targets": lesion_targets,
            "lesion_count_targets": count_targets,
            "text_map_targets": text_targets,
            "copy_offsets": copy,
        }

    def _token_map_targets(self, grid: torch.Tensor, target_of) -> torch.Tensor:
        """Per merged image token of all the sample's images: ``target_of(cells, merge)`` for the first image's
        cells (``[n]`` or ``[n, ...]``), -1 for the other images' tokens."""
        merge = int(self.image_processor.merge_size)
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

    @staticmethod
    def _check_map_size(name: str, array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if array.shape != (size[1], size[0]):
            raise ProcessorError(
                f"{name} is {array.shape[1]}x{array.shape[0]} but the first image is {size[0]}x{size[1]}: "
                "the map must have its image's size"
            )
        return array

    def _lesion_map_targets(self, lesion_map: MaskInput, size: tuple[int, int], grid: torch.Tensor) -> torch.Tensor:
        """``[n]``: 1/0 per cell of the first image (lesion or not), -1 for other images."""
        mask = self._check_map_size("lesion_map", load_mask(lesion_map), size)
        return self._token_map_targets(grid, lambda cells, _: lesion_map_target(mask, cells))

    def _lesion_count_targets(
        self, points: Sequence[Sequence[float]], size: tuple[int, int], grid: torch.Tensor
    ) -> torch.Tensor:
        """``[n]``: lesion centres per cell of the first image, -1 for other images."""
        width, height = size
        outside = [list(p) for p in points if not (0 <= p[0] < width and 0 <= p[1] < height)]
        if outside:
            raise ProcessorError(
                f"lesion_points {outside} lie outside the first image ({width}x{height}): give (x, y) pixels of it"
            )
        return self._token_map_targets(grid, lambda cells, _: lesion_count_target(points, size, cells))

    def _text_map_targets(self, labels: np.ndarray, size: tuple[int, int], grid: torch.Tensor) -> torch.Tensor:
        """``[n, merge*merge]``: the first image's character class per patch, -1 for other images."""
        labels = self._check_map_size("text_map", labels, size)
        return self._token_map_targets(grid, lambda cells, merge: text_map_target(labels, cells, merge))

    def _copy_offsets(
        self, input_ids: list[int], labels: list[int], text_targets: torch.Tensor, grid: torch.Tensor
    ) -> list[int]:
        """Copy-attention targets of one sample (:mod:`citrus_v.processing.copy_targets`), from its first image."""
        merge = int(self.image_processor.merge_size)
        _, h, w = grid[0].tolist()
        rows, cols = h // merge, w // merge
        positions = [p for p, token in enumerate(input_ids) if token == self.image_token_id][: rows * cols]
        lines = read_lines(text_targets, rows, cols)
        return copy_offsets(input_ids, labels, positions, lines, self._token_text)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _pad(self, ids: list[list[int]], labels: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ProcessorError("the tokenizer has no pad token: set tokenizer.pad_token (Qwen uses <|endoftext|>)")
        length = max(len(row) for row in ids)
        return {
            "input_ids": _pad_rows(ids, length, pad_id, side),
            "attention_mask": _pad_rows([[1] * len(row) for row in ids], length, 0, side),
            "labels": _pad_rows(labels, length, IGNORE_INDEX, side),
        }

    def decode(self, token_ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Decode ids to text; ``[SEG]`` stays visible unless ``skip_special_tokens``."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _pad_rows(rows: Sequence[Sequence[int] | None], length: int, fill: int, side: str) -> torch.Tensor:
    """A ``[len(rows), length]`` tensor of ``fill`` with each row written against ``side`` (None: all ``fill``)."""
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        if row is not None:
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            out[index, span] = torch.as_tensor(row, dtype=torch.long)
    return out


_WARNED_UPSTREAM: set[str] = set()


def _upstream_settings(directory: Path, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """For a released upstream folder: add the Citrus-V tokens its files lack (saying so once per folder) and
    return its SAM sizes; for other folders: nothing."""
    from ..modeling.upstream_checkpoint import upstream_sam_sizes  # lazy: only upstream folders need it

    sizes = upstream_sam_sizes(directory)
    if sizes is None:
        return {}
    added = add_citrus_tokens(tokenizer)
    if added and str(directory) not in _WARNED_UPSTREAM:
        _WARNED_UPSTREAM.add(str(directory))
        logger.warning(
            "%s: the tokenizer files lack %s; added them after the last token (ids %s), as upstream's loader does",
            directory,
            ", ".join(added),
            ", ".join(str(tokenizer.convert_tokens_to_ids(t)) for t in added),
        )
    expected = json.loads((directory / "config.json").read_text()).get("seg_token_idx")
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    if expected is not None and int(expected) != seg_id:
        raise ProcessorError(
            f"{directory / 'config.json'}: seg_token_idx is {expected} but the tokenizer gives {SEG_TOKEN} the id "
            f"{seg_id}. Fix: use the tokenizer files released with these weights"
        )
    return {"sam_image_size": sizes[0], "mask_size": sizes[1]}


def resolve_pixels(
    image_processor: Qwen2VLImageProcessorPil, min_pixels: int | None = None, max_pixels: int | None = None
) -> None:
    """Apply the pixel bounds: explicit values, else ``MIN_PIXELS``/``MAX_PIXELS``, else what is saved."""
    min_pixels = min_pixels if min_pixels is not None else _pixels_from_env("MIN_PIXELS")
    max_pixels = max_pixels if max_pixels is not None else _pixels_from_env("MAX_PIXELS")
    lo = int(min_pixels) if min_pixels is not None else int(image_processor.size.shortest_edge)
    hi = int(max_pixels) if max_pixels is not None else int(image_processor.size.longest_edge)
    if lo <= 0 or hi < lo:
        raise ProcessorError(f"pixel bounds must satisfy 0 < MIN_PIXELS <= MAX_PIXELS; got {lo} and {hi}")
    image_processor.size = SizeDict(shortest_edge=lo, longest_edge=hi)
