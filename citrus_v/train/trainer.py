"""``CitrusVTrainer``: transformers' Trainer with Citrus-V's mask-loss bookkeeping and safe checkpoints.

- Mask losses are averaged per mask over the whole accumulated batch (all ranks): the mask count is taken
  with the batch samples, like transformers' ``num_items_in_batch`` for tokens.
- LM loss, mask BCE and Dice are logged separately, with samples/s and tokens/s.
- A checkpoint is written into a hidden staging folder, flushed, and renamed into place only when complete, so
  a kill at any moment leaves the last complete checkpoint for ``--resume_from_checkpoint latest``; that one is
  verified (readable state, weights and archives) and a corrupt newest checkpoint falls back to the one before.
- Every file of a checkpoint gets its size and SHA-256 in ``checkpoint_manifest.json``, written last; resuming
  checks them, so a file changed in place (same size, other bytes) is caught, not loaded.
- A failed save (disk full, whatever the writer raises) removes its partial files and stops every process with
  :class:`CheckpointSaveError`, naming the folder and its free space. The final model is staged the same way
  and moved into ``output_dir`` with its ``config.json`` last, so no config is ever left without its weights.
- A non-finite loss stops the run with the step number and the ids of that batch's samples.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .. import objectives
from ..data.streaming import StreamingJsonlDataset
from .checkpoints import (
    STAGING_PREFIX,
    STREAM_STATE_PREFIX,
    CheckpointSaveError,
    describe_error,
    free_space,
    list_checkpoints,
    move_into_place,
    seal,
)
from .data import BOOKKEEPING_KEYS

# output field -> logged name of each core loss component; the objectives' losses come by log name
CORE_LOSSES = (
    ("lm_loss", "lm_loss"),
    ("mask_bce_loss", "mask_bce"),
    ("mask_dice_loss", "mask_dice"),
    ("mask_iou_loss", "mask_iou"),
    ("video_mask_bce_loss", "video_mask_bce"),
    ("video_mask_dice_loss", "video_mask_dice"),
    ("video_mask_iou_loss", "video_mask_iou"),
    ("presence_loss", "presence"),
)
COMPONENT_NAMES = (*(name for _, name in CORE_LOSSES), *objectives.log_names())


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class CitrusVTrainer(Trainer):
    """Trainer for CitrusV batches (``gt_masks`` lists, ``sample_ids`` carried for error messages)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._num_masks_in_batch: int | torch.Tensor | None = None
        self._num_video_masks_in_batch: int | torch.Tensor | None = None
        self._running: dict[str, float] = {}
        self._last_log_time = time.perf_counter()
        self.skipped_rows: list[str] = []  # "file:line reason" of rows dropped while training
        self._rng_checkpoint: str | None = None  # a streaming resume restores the RNG at its first step

    @property
    def streaming(self) -> bool:
        return isinstance(self.train_dataset, StreamingJsonlDataset)

    def get_train_dataloader(self) -> DataLoader:
        """Streaming shards itself across ranks and workers: its loader must not be re-sharded."""
        if not self.streaming:
            return super().get_train_dataloader()
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    # --- batching -----------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._rng_checkpoint is not None:
            # Trainer restores the RNG only where it skips batches itself, which a streaming run does not;
            # here, right before the first resumed step, the draws (point prompts) continue as they would have
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None
        for batch in batch_samples:
            self.skipped_rows += batch.get("skipped_rows", [])
            if self.streaming and batch.get("stream_positions"):
                self.train_dataset.advance(batch["stream_positions"])
        masks = sum(int(m.shape[0]) for batch in batch_samples for m in batch.get("gt_masks", []))
        # 3-D masks (volume and clip rows) are averaged over their own count
        videos = sum(int(m.shape[0]) for batch in batch_samples for m in batch.get("gt_video_masks") or []
                     if m is not None)  # fmt: skip
        count = torch.tensor([masks, videos], device=device, dtype=torch.float32)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count[None]).sum(dim=0)
        self._num_masks_in_batch, self._num_video_masks_in_batch = count[0], count[1]
        if batch_samples:  # one optimizer step (an epoch's last one may hold fewer micro-batches)
            self._running["_steps"] = self._running.get("_steps", 0.0) + 1
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extras = {key: inputs.pop(key, None) for key in BOOKKEEPING_KEYS}
        sample_ids = extras["sample_ids"]
        if self._num_masks_in_batch is not None:
            inputs["num_masks_in_batch"] = self._num_masks_in_batch
        if self._num_video_masks_in_batch is not None and inputs.get("gt_video_masks") is not None:
            inputs["num_video_masks_in_batch"] = self._num_video_masks_in_batch
        if model.training and inputs.get("labels") is not None:
            # training needs logits only where a label is (evaluation keeps the full logits for its metrics)
            inputs["label_logits_only"] = True
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            ids = ", ".join(map(str, sample_ids)) if sample_ids else "unknown"
            raise NonFiniteLossError(
                f"loss is {float(loss.detach())} at step {self.state.global_step + 1}; samples of this batch: "
                f"{ids}. The last complete checkpoint is kept; lower --learning_rate or check those rows"
            )
        self._accumulate(outputs, inputs, extras)
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, outputs, inputs: dict, extras: dict) -> None:
        running = self._running
        get = outputs.get if hasattr(outputs, "get") else (lambda key: None)
        parts = {name: get(key) for key, name in CORE_LOSSES}
        parts.update(get("aux_losses") or {})
        for name, value in parts.items():
            if value is not None:
                running[name] = running.get(name, 0.0) + float(value.detach())
        samples = extras.get("num_samples")
        running["_samples"] = running.get("_samples", 0.0) + float(
            samples if samples is not None else inputs["input_ids"].shape[0]
        )
        tokens = extras.get("num_real_tokens")
        if tokens is None:
            tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
        running["_tokens"] = running.get("_tokens", 0.0) + float(tokens)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._running:
            running, self._running = self._running, {}
            keys = (*COMPONENT_NAMES, "_steps", "_samples", "_tokens")
            totals = torch.tensor([running.get(k, 0.0) for k in keys], device=self.args.device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            total = dict(zip(keys, totals.tolist(), strict=True))
            # each micro-batch's loss is already divided by the whole accumulated (all-rank) count, so an
            # optimizer step's loss is the sum over its micro-batches on all ranks
            steps = max(total["_steps"] / self.accelerator.num_processes, 1e-9)
            for name in COMPONENT_NAMES:
                if name in running:
                    logs[name] = round(total[name] / steps, 6)
            now = time.perf_counter()
            elapsed = max(now - self._last_log_time, 1e-9)
            self._last_log_time = now
            logs["samples_per_second"] = round(total["_samples"] / elapsed, 3)
            logs["tokens_per_second"] = round(total["_tokens"] / elapsed, 1)
        super().log(logs, start_time)

    # --- checkpoints --------------------------------------------------------------------------------------
    # while a checkpoint is written: the staging folder the parent's save treats as the run folder
    _checkpoint_root: str | None = None

    def _get_output_dir(self, trial) -> str:
        """The run folder; during :meth:`_save_checkpoint`, its staging folder, so that the parent writes
        ``staging/checkpoint-N`` and its own rotation sees that one checkpoint alone (and deletes nothing)."""
        if self._checkpoint_root is not None:
            return self._checkpoint_root
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` into a staging folder, seal it (manifest, flush), then rename it into place
        and rotate the run folder's checkpoints (``save_total_limit``). The training arguments are left as
        they are."""
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        staging = run_dir / f"{STAGING_PREFIX}{step}"
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self._barrier()
        limit = self.args.save_total_limit
        failure: Exception | None = None
        try:
            self._checkpoint_root = str(staging)
            super()._save_checkpoint(model, trial)
            if self.streaming:
                state_file = staging / final.name / f"{STREAM_STATE_PREFIX}{self.args.process_index}.json"
                state_file.write_text(json.dumps(self.train_dataset.state_dict()))
        # a full disk surfaces as whatever the writer raises (OSError, safetensors' SafetensorError, torch's
        # RuntimeError): every rank must learn of it, or the others hang
        except Exception as err:  # noqa: BLE001
            failure = err
        finally:
            self._checkpoint_root = None
        self._finish_staged_save(staging, staging / final.name, run_dir, failure, what=f"saving {final.name}")
        if self.args.should_save:
            # rename the old folder away first: a kill between two renames never leaves a half-deleted checkpoint
            trash = run_dir / f"{STAGING_PREFIX}{step}-old"
            if final.exists():
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
            os.replace(staging / final.name, final)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(trash, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit, use_mtime=False)
        self._barrier()

    def _finish_staged_save(self, staging: Path, sealed: Path, out: Path, failure: Exception | None, what: str) -> None:
        """Once every rank has written its files: the main process seals ``sealed`` (the saved folder inside
        ``staging``); when any rank failed, ``staging`` is removed and every rank raises
        :class:`CheckpointSaveError`."""
        if not self._any_rank(failure is not None) and self.args.should_save:
            try:
                seal(sealed)
            except Exception as err:  # noqa: BLE001 - same as the writers' failures
                failure = err
        if not self._any_rank(failure is not None):
            return
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._barrier()
        # checkpoints are renamed into place only when sealed: the newest one in place is complete
        previous = (list_checkpoints(out) or [None])[-1]
        last = "none"
        if previous is not None:
            size = sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
            last = f"{previous} ({size / 2**20:.1f} MiB)"
        raise CheckpointSaveError(
            f"{what} failed: {describe_error(failure)}. {out} has {free_space(out)}. The partial files were removed; "
            f"the last complete checkpoint is {last}. Free disk space, then continue with "
            "--resume_from_checkpoint latest"
        ) from failure

    def save_final_model(self, output_dir: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Save the trained model and processor (and ``extra_files``: name -> text) into ``output_dir`` through
        a staging folder, sealed with a manifest and moved into place when complete (:func:`move_into_place`).
        A failure leaves no partial model and raises :class:`CheckpointSaveError` on every rank."""
        out = Path(output_dir)
        staging = out / f"{STAGING_PREFIX}final"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self._barrier()
        failure: Exception | None = None
        try:
            self.save_model(str(staging))
            if self.args.should_save:
                for name, text in (extra_files or {}).items():
                    (staging / name).write_text(text)
        except Exception as err:  # noqa: BLE001 - see _save_checkpoint
            failure = err
        self._finish_staged_save(staging, staging, out, failure, what=f"saving the final model into {out}")
        if self.args.should_save:
            move_into_place(staging, out)
        self._barrier()
        return out

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` or-ed over all processes (so that every rank takes the same branch)."""
        if not (dist.is_available() and dist.is_initialized()):
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.args.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.streaming:
            state_file = Path(resume_from_checkpoint) / f"{STREAM_STATE_PREFIX}{self.args.process_index}.json"
            if not state_file.is_file():
                raise FileNotFoundError(f"{state_file} is missing: the checkpoint holds no streaming position")
            self.train_dataset.load_state_dict(json.loads(state_file.read_text()))
            self._rng_checkpoint = resume_from_checkpoint

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
