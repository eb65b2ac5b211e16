"""The collator: items from :class:`RowDataset` / :class:`StreamingJsonlDataset` -> one CitrusV batch.

Padded (one sample per row, like :meth:`CitrusVProcessor.__call__`) or packed (several samples per row,
see :mod:`citrus_v.data.packing`). Items that cannot be used — rows that failed to load, samples longer
than ``max_length`` — are dropped, logged and counted; the batch lists them in ``batch.skipped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..media import MedicalImageError
from ..processing.processor import CitrusVProcessor, ProcessorError
from ..processing.template import SampleTooLongError, TemplateError
from .dataset import SkippedRow
from .packing import PackStats, pack_encoded, plan_packs
from .rows import RowIssue, SkipCounter


class Batch(dict):
    """Model inputs (pass as ``model(**batch)``) plus bookkeeping attributes that are not model inputs.

    Attributes:
        skipped: the items dropped from this batch, with ``file:line`` and reason.
        num_samples: samples in the batch (packed rows hold several).
        stats: real vs padded tokens of this batch.
        stream_positions: for streaming datasets, what to pass to ``dataset.advance`` once trained on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: list[RowIssue] = []
        self.num_samples = 0
        self.stats: PackStats | None = None
        self.stream_positions: list[tuple[int, int, int]] = []


class CitrusVCollator:
    """Turn a list of dataset items into a :class:`Batch`.

    Args:
        processor: the :class:`CitrusVProcessor` that encodes each sample.
        packing: pack samples into rows of at most ``max_length`` tokens instead of padding.
        max_length: samples with more tokens are dropped and counted (``too_long``); required for packing.
        padding_side: for padded batches ("right" for training).
        pad_to_max_length: pad packed rows to ``max_length`` (fixed shapes) instead of to the longest row.
        max_seg_samples: samples with ``[SEG]`` allowed in one packed row. 1 (default) suits today's model,
            which gives each row one SAM image; more needs a model that reads ``seg_image_index``.
        skips: where dropped items are counted (default: a new counter, ``collator.skips``).
        sam_train_frames: frames of a volume or clip SAM 2 trains on per sample with 3-D masks (default: the
            processor's ``sam_train_frames``); ``seed`` seeds which (with each row's ``frame_draw``).
        tokens_per_second: the model's ``vision_config.tokens_per_second``, which Qwen2.5-VL's rotary time
            positions of a video scale by; packing a video row needs it.
    """

    def __init__(
        self,
        processor: CitrusVProcessor,
        packing: bool = False,
        max_length: int | None = None,
        padding_side: str = "right",
        pad_to_max_length: bool = False,
        max_seg_samples: int = 1,
        skips: SkipCounter | None = None,
        sam_train_frames: int | None = None,
        seed: int = 0,
        tokens_per_second: int | None = None,
    ) -> None:
        if packing and max_length is None:
            raise ValueError("packing needs max_length (the length of a packed row)")
        self.processor = processor
        self.packing = packing
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_to_max_length = pad_to_max_length
        self.max_seg_samples = max_seg_samples
        self.skips = skips if skips is not None else SkipCounter()
        if sam_train_frames is not None and sam_train_frames < 1:
            raise ValueError(f"sam_train_frames must be at least 1, got {sam_train_frames}")
        self.sam_train_frames = sam_train_frames
        self.seed = seed
        self.tokens_per_second = tokens_per_second

    def _skip(self, batch: Batch, issue: RowIssue) -> None:
        batch.skipped.append(issue)
        self.skips.record(issue)

    def __call__(self, items: Sequence[Any]) -> Batch | None:
        """Encode and pad or pack ``items``; ``None`` when every item was dropped."""
        batch = Batch()
        encoded: list[dict[str, Any]] = []
        for position, item in enumerate(items):
            if isinstance(item, dict) and "stream" in item:
                batch.stream_positions.append(tuple(item["stream"]))  # consumed even when skipped
                item = item.get("skipped", item)
            if isinstance(item, SkippedRow):
                self._skip(batch, item.issue)
                continue
            sample = item["sample"] if isinstance(item, dict) and "sample" in item else item
            where = item.get("where", f"batch item {position}") if isinstance(item, dict) else f"item {position}"
            try:
                encoded.append(
                    self.processor.encode_sample(
                        sample, max_length=self.max_length, sam_frames=self.sam_train_frames, seed=self.seed
                    )
                )
            except SampleTooLongError as err:
                self._skip(batch, _issue(where, "too_long", str(err)))
            except MedicalImageError as err:
                self._skip(batch, _issue(where, err.reason, str(err)))
            except (TemplateError, ProcessorError, FileNotFoundError, ValueError, TypeError) as err:
                self._skip(batch, _issue(where, "unusable_sample", str(err)))
        if not encoded:
            return None  # every item was dropped; the loop skips this step (positions are in the skips log)
        lengths = [len(e["input_ids"]) for e in encoded]
        if self.packing:
            has_seg = [e["gt_masks"] is not None and e["gt_masks"].shape[0] > 0 for e in encoded]
            packs = plan_packs(lengths, self.max_length, has_seg, self.max_seg_samples)
            batch.update(
                pack_encoded(
                    encoded,
                    packs,
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                    image_token_id=self.processor.image_token_id,
                    spatial_merge_size=int(self.processor.image_processor.merge_size),
                    sam_image_size=self.processor.sam_image_size,
                    mask_size=self.processor.mask_size,
                    pad_to=self.max_length if self.pad_to_max_length else None,
                    max_seg_samples=self.max_seg_samples,
                    video_token_id=self.processor.video_token_id,
                    tokens_per_second=self.tokens_per_second,
                )
            )
            width = batch["input_ids"].shape[1]
            batch.stats = PackStats(sum(lengths), width * len(packs), len(packs), len(encoded))
        else:
            batch.update(self.processor.collate(encoded, self.padding_side))
            batch.stats = PackStats(sum(lengths), batch["input_ids"].numel(), len(encoded), len(encoded))
        batch.num_samples = len(encoded)
        return batch


def _issue(where: str, reason: str, message: str) -> RowIssue:
    file, _, line = where.rpartition(":")
    if file and line.isdigit():
        return RowIssue(file, int(line), reason, message)
    return RowIssue(where, 0, reason, message)
