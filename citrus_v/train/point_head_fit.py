"""Fit the ``[SEG]`` point head on cached ``[SEG]`` states: stage 4's point objective, run to convergence.

In stage 4 the language model is frozen, so the hidden state it gives each ``[SEG]`` of a row is fixed; the point
head (:mod:`citrus_v.modeling.point_head`) is a small MLP on those states, and its objective (the point loss
among :mod:`citrus_v.objectives`) needs nothing else but each target's innermost pixel. So the states of the
rows are computed once (teacher-forced, as training computes them) and the head is fitted on them for many
epochs — seconds of work, where a stage-4 step runs the language model and SAM 2 for a few masks, and the head
sees each row a handful of times in a run. The head learns the targets of images and of volumes together.

Targets are the objective's: a 2-D mask's innermost pixel at SAM 2's low resolution
(:func:`~citrus_v.objectives.base.interior_points`); for a volume or clip, the innermost pixel on the frame
where the target is largest, over all its frames (stage 4 sees only the few frames it trains on). The head's
standardisation statistics stay as stage 4 left them; a share of the rows is held out to report how far the
head's points fall from their targets, in SAM 2 input pixels, before and after.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint_layout import resolve_model
from ..data.dataset import RowDataset, SkippedRow
from ..modeling.modeling_citrus_v import CitrusV
from ..objectives.base import interior_points, point_distance_loss
from ..processing.images import mask_target
from ..processing.processor import CitrusVProcessor, batch_to
from ..processing.video_masks import load_mask_stack
from .checkpoints import MANIFEST_FILE, write_manifest
from .data import dataset_files

# what a fit writes next to the checkpoint: its PointFitResult
FIT_RECORD = "point_fit.json"


class PointFitError(ValueError):
    """A point-head fit that cannot run (no point head, no rows with a ``[SEG]`` and a mask), with the fix."""


@dataclass
class PointFitOptions:
    """How the head is fitted: AdamW over shuffled mini-batches of cached states."""

    epochs: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32
    # share of the rows whose states only measure the fit
    held_out: float = 0.1
    # rows through the language model at once while the states are cached
    encode_batch_size: int = 8
    seed: int = 0


@dataclass
class PointFitResult:
    """What a fit did: the rows and ``[SEG]`` states it used, the rows it skipped (by reason), the mean distance
    of the head's points from their targets (SAM 2 input pixels) before and after, on the fitted and the
    held-out states, and its seconds."""

    rows: int
    states: int
    held_out_states: int
    skipped: dict[str, int]
    error_px_before: float | None
    error_px_after: float | None
    held_out_error_px_before: float | None
    held_out_error_px_after: float | None
    seconds: float
    options: PointFitOptions = field(default_factory=PointFitOptions)


@dataclass
class CachedStates:
    """``[N, hidden]`` ``[SEG]`` states, ``[N, 2]`` targets (fractions of the side) and the row of each."""

    states: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor


def seg_point_targets(sample: dict[str, Any], mask_size: int) -> torch.Tensor:
    """``[K, 2]`` (x, y) targets, as fractions of the side, of a row's ``K`` masks: a 2-D mask's innermost pixel;
    for a row whose masks are 3-D (a video and no image), the innermost pixel on the frame where the target is
    largest. NaN for an empty mask."""
    masks = sample.get("masks") or []
    size = (mask_size, mask_size)
    if sample.get("videos") and not sample.get("images"):
        frames = []
        for mask in masks:
            stack = load_mask_stack(mask)
            frames.append(mask_target(stack[int(stack.reshape(stack.shape[0], -1).sum(axis=1).argmax())], size))
    else:
        frames = [mask_target(mask, size) for mask in masks]
    if not frames:
        return torch.zeros(0, 2)
    return (interior_points(torch.stack(frames)) + 0.5) / mask_size


def cache_states(
    model: CitrusV, processor: CitrusVProcessor, dataset: RowDataset, options: PointFitOptions, skipped: Counter
) -> CachedStates:
    """The ``[SEG]`` states and targets of every row of ``dataset`` with a ``[SEG]`` and its mask; rows that do
    not load, and rows without a mask (an absent target's answer has no ``[SEG]``), are counted in ``skipped``."""
    found: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
    pending: list[tuple[int, dict[str, Any], str]] = []
    for index in tqdm(range(len(dataset)), desc="point head: [SEG] states", unit="row"):
        item = dataset[index]
        if isinstance(item, SkippedRow):
            skipped[item.issue.reason] += 1
        elif not item["sample"].get("masks"):
            skipped["no_mask"] += 1
        else:
            pending.append((index, item["sample"], item["where"]))
        if pending and (len(pending) == options.encode_batch_size or index == len(dataset) - 1):
            _encode(model, processor, pending, found)
            pending = []
    if not found[0]:
        return CachedStates(torch.zeros(0, 0), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    return CachedStates(*(torch.cat(parts) for parts in found))


def _encode(
    model: CitrusV,
    processor: CitrusVProcessor,
    items: list[tuple[int, dict[str, Any], str]],
    into: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]],
) -> None:
    """One language-model pass over ``items`` (row index, sample, ``file:line``): their ``[SEG]`` states and
    targets."""
    encoded = [processor.encode_sample(sample, return_labels=False, sam_input=False) for _, sample, _ in items]
    batch = processor.collate(encoded, return_labels=False)
    parameter = next(model.parameters())
    inputs = batch_to({k: v for k, v in batch.items() if torch.is_tensor(v)}, parameter.device, parameter.dtype)
    with torch.no_grad():
        hidden = model.mllm.model(**inputs, use_cache=False).last_hidden_state
    for (index, sample, where), seg in zip(items, model.seg_states(inputs["input_ids"], hidden), strict=True):
        target = seg_point_targets(sample, model.mask_size[0])
        if target.shape[0] != seg.shape[0]:
            raise PointFitError(
                f"{where}: {target.shape[0]} mask(s) for {seg.shape[0]} [SEG] token(s): give one mask per [SEG]"
            )
        into[0].append(seg.float().cpu())
        into[1].append(target)
        into[2].append(torch.full((seg.shape[0],), index, dtype=torch.long))


def mean_error_px(head: torch.nn.Module, cached: CachedStates, image_size: int) -> float | None:
    """Mean distance of the head's points from their targets in SAM 2 input pixels; None without states."""
    known = ~torch.isnan(cached.targets).any(dim=1)
    if not bool(known.any()):
        return None
    dtype = next(head.parameters()).dtype
    with torch.no_grad():
        points = head(cached.states[known].to(dtype)).float().sigmoid()
    return float(((points - cached.targets[known]) * image_size).norm(dim=1).mean())


def fit_head(
    head: torch.nn.Module, cached: CachedStates, options: PointFitOptions, log: list[dict[str, Any]]
) -> None:
    """Fit ``head``'s MLP on ``cached`` by the point objective's L1 loss; its statistics stay fixed. One
    ``{"step": epoch, "point": mean loss}`` record per epoch goes to ``log``."""
    known = ~torch.isnan(cached.targets).any(dim=1)
    parameters = list(head.parameters())
    states, targets = cached.states[known].to(parameters[0].dtype), cached.targets[known]
    head.eval()  # the standardisation statistics (buffers, not parameters) stay as they are
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    for epoch in tqdm(range(1, options.epochs + 1), desc="point head: fit", unit="epoch"):
        order = torch.randperm(states.shape[0], generator=generator)
        total = 0.0
        for start in range(0, states.shape[0], options.batch_size):
            chosen = order[start : start + options.batch_size]
            loss = point_distance_loss(head(states[chosen]).float().sigmoid(), targets[chosen], chosen.numel())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * chosen.numel()
        log.append({"step": epoch, "point": round(total / max(states.shape[0], 1), 6)})


def split_rows(cached: CachedStates, share: float, seed: int) -> tuple[CachedStates, CachedStates]:
    """``cached`` split by row into the fitted and the held-out states (``share`` of the rows held out)."""
    rows = torch.unique(cached.rows)
    generator = torch.Generator().manual_seed(seed)
    held = rows[torch.randperm(rows.numel(), generator=generator)[: int(round(rows.numel() * share))]]
    out = torch.isin(cached.rows, held)

    def take(keep: torch.Tensor) -> CachedStates:
        return CachedStates(cached.states[keep], cached.targets[keep], cached.rows[keep])

    return take(~out), take(out)


def run_point_fit(
    model_dir: str | Path, dataset: list[str], out: str | Path, options: PointFitOptions | None = None
) -> PointFitResult:
    """Fit the point head of the checkpoint ``model_dir`` (a folder or a shipped model's name) on the ``[SEG]``
    rows of ``dataset`` (files or folders of shards; every row once) and write the checkpoint, with the fitted
    head, to ``out``: its other files as they were (a training run's records left behind),
    ``logging.jsonl`` (the loss per epoch), ``point_fit.json`` (:class:`PointFitResult`) and a checksum
    manifest."""
    options = options or PointFitOptions()
    started = time.monotonic()
    model_dir = resolve_model(model_dir)
    counted = [entry for entry in dataset if "#" in entry]
    if counted:
        raise PointFitError(f"{counted[0]}: the fit takes every row of a file once; give the file without '#N'")
    model = CitrusV.from_pretrained(model_dir).eval()
    if model.seg_point_head is None:
        raise PointFitError(f"{model_dir} has no point head (config.seg_point_head is false): nothing to fit")
    processor = CitrusVProcessor.from_pretrained(model_dir)
    files = [str(path) for path, _ in dataset_files(dataset)]
    rows = RowDataset.from_jsonl(files, processor=processor)
    skipped: Counter = Counter(rows.skips.counts)
    cached = cache_states(model, processor, rows, options, skipped)
    if cached.states.shape[0] == 0:
        raise PointFitError(f"no row of {', '.join(files)} has a [SEG] with its mask: nothing to fit the head on")
    fitted, held = split_rows(cached, options.held_out, options.seed)
    head, size = model.seg_point_head, model.grounding_encoder.image_size
    before = (mean_error_px(head, fitted, size), mean_error_px(head, held, size))
    log: list[dict[str, Any]] = []
    fit_head(head, fitted, options, log)
    result = PointFitResult(
        rows=int(torch.unique(cached.rows).numel()), states=int(fitted.states.shape[0]),
        held_out_states=int(held.states.shape[0]), skipped=dict(skipped),
        error_px_before=_rounded(before[0]), error_px_after=_rounded(mean_error_px(head, fitted, size)),
        held_out_error_px_before=_rounded(before[1]),
        held_out_error_px_after=_rounded(mean_error_px(head, held, size)),
        seconds=round(time.monotonic() - started, 1), options=options,
    )
    _write(model, Path(model_dir), Path(out), log, result)
    return result


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


# files of a run's folder that are its records, not the checkpoint: a fit leaves them behind, as a base does
RUN_RECORDS = ("training_args.bin", "sft_args.json", "logging.jsonl", "loss_curves.png", MANIFEST_FILE, FIT_RECORD)


def _write(model: CitrusV, source: Path, out: Path, log: list[dict[str, Any]], result: PointFitResult) -> None:
    """``source``'s checkpoint files with ``model``'s weights (its config as it was: the fit changes weights
    only), the fit's log and result, and a fresh checksum manifest into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name not in RUN_RECORDS:
            shutil.copy2(item, out / item.name)
    model.save_pretrained(out)
    shutil.copy2(source / "config.json", out / "config.json")
    (out / "logging.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))
    (out / FIT_RECORD).write_text(json.dumps(asdict(result), indent=2) + "\n")
    write_manifest(out)
