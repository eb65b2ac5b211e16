"""The ``citrus-v sft`` recipe: load, set up, train, save — one readable script on transformers' Trainer.

Steps:
1. fill in the unset flags as upstream users mean them (the stage from the freeze flags, ms-swift's defaults),
   check them against this machine (fall back or clamp, one line each) and print the stage and every setting;
2. load model and processor from ``--model``; apply the stage preset, the freeze flags and ms-swift's lists of
   names; LoRA if asked;
3. read the datasets (bad rows skipped and counted, or ``--strict``);
4. train with :class:`CitrusVTrainer` (progress bar, per-step logs to console, ``logging.jsonl`` and
   TensorBoard, staged checkpoints, resume);
5. save the final model and processor into ``output_dir`` (staged, checksummed, moved into place when complete)
   and draw the loss curves.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from ..modeling.modeling_citrus_v import CitrusV
from ..processing.processor import CitrusVProcessor
from .arguments import SftArguments, adapt_to_machine
from .callbacks import DdpDigestCallback, JsonlLoggerCallback, LossCurveCallback
from .checkpoints import latest_checkpoint, verify_checkpoint
from .data import build_train_dataset, skipped_summary
from .lora import apply_lora
from .resolve import machine_sources, resolve_arguments, settings_block
from .stages import FreezePlan, parameter_table, read_freeze_names
from .trainer import CitrusVTrainer

logger = logging.getLogger(__name__)
DEEPSPEED_CONFIGS = Path(__file__).with_name("deepspeed")


class SftError(RuntimeError):
    """A run that cannot start; the message says why and what to do."""


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(message: str) -> None:
    if _is_main_process():
        print(message, file=sys.stderr, flush=True)


def prepare_output_dir(args: SftArguments) -> None:
    """Refuse to write over a previous run unless resuming or ``--overwrite_output_dir``."""
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise SftError(
            f"output_dir {out} already holds a run; pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to replace it, or choose another --output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)


def resolve_resume(args: SftArguments) -> str | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = latest_checkpoint(args.output_dir)
        if found is None:
            _say(f"--resume_from_checkpoint latest: no complete checkpoint in {args.output_dir}; starting fresh")
            return None
        _say(f"resuming from {found}")
        return str(found)
    path = Path(args.resume_from_checkpoint)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise SftError(
            f"--resume_from_checkpoint {path}: not a complete, intact checkpoint: {problem}. Resume from another "
            "checkpoint (--resume_from_checkpoint latest takes the newest intact one in --output_dir)"
        )
    return str(path)


def deepspeed_config(value: str | None) -> str | None:
    """``zero2``/``zero3`` name a shipped config; anything else is a path to a JSON file."""
    if not value:
        return None
    shipped = DEEPSPEED_CONFIGS / f"{value}.json"
    if shipped.is_file():
        return str(shipped)
    if not Path(value).is_file():
        raise SftError(f"--deepspeed {value}: neither zero2/zero3 nor an existing JSON file")
    return value


def training_arguments(args: SftArguments) -> TrainingArguments:
    """transformers' TrainingArguments for these flags."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    report_to = [r for r in args.report_to if r != "none"]
    if "tensorboard" in report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to.remove("tensorboard")
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        # transformers reads a warmup below 1 as a ratio of the run
        warmup_steps=args.warmup_steps if args.warmup_steps else args.warmup_ratio,
        lr_scheduler_type=args.lr_scheduler_type,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_num_workers=args.dataloader_num_workers,
        save_strategy=args.save_strategy,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        save_only_model=args.save_only_model,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        ddp_find_unused_parameters=args.ddp_find_unused_parameters,
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        seed=args.seed,
        data_seed=args.seed,
        deepspeed=deepspeed_config(args.deepspeed),
        bf16=args.dtype == torch.bfloat16,
        fp16=args.dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        report_to=report_to,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not _is_main_process(),
        # a streaming dataset restores its own exact position; batches must not be skipped by iteration
        ignore_data_skip=args.streaming,
        accelerator_config={"dispatch_batches": False},
    )


def load_model(args: SftArguments) -> tuple[CitrusV, CitrusVProcessor]:
    """Model and processor from ``--model``, with the loss weights and dtype the flags ask for."""
    kwargs = {"dtype": args.dtype}
    if args.attn_impl:
        kwargs["attn_implementation"] = "flash_attention_2" if args.attn_impl == "flash_attn" else args.attn_impl
    model = CitrusV.from_pretrained(args.model, **kwargs)
    processor = CitrusVProcessor.from_pretrained(args.model)
    if args.mask_loss_weight is not None:
        model.config.loss_mask_config = {**(model.config.loss_mask_config or {}), "loss_weight": args.mask_loss_weight}
    if args.dice_loss_weight is not None:
        model.config.loss_dice_config = {**(model.config.loss_dice_config or {}), "loss_weight": args.dice_loss_weight}
    if args.point_prompt_probability is not None:
        if not 0.0 <= args.point_prompt_probability <= 1.0:
            raise ValueError(f"--point_prompt_probability must be within 0 and 1, got {args.point_prompt_probability}")
        model.config.point_prompt_probability = args.point_prompt_probability
    if args.presence_loss_weight is not None:
        if args.presence_loss_weight < 0:
            raise ValueError(f"--presence_loss_weight must be 0 or more, got {args.presence_loss_weight}")
        model.config.presence_loss_weight = args.presence_loss_weight
    if args.train_propagation is not None:
        model.config.train_propagation = args.train_propagation
    return model, processor


def check_propagation(model: CitrusV) -> None:
    """``memory`` training needs SAM 2's memory modules, in the model and trainable (stage 4)."""
    if model.config.train_propagation != "memory":
        return
    if model.propagator is None:
        raise SftError(
            "--train_propagation memory needs SAM 2's memory modules, and this model has none (config.json has no "
            "sam2_memory_config). Fix: --train_propagation per_frame, or a model with the memory modules"
        )
    if not any(p.requires_grad for p in model.propagator.parameters()):
        raise SftError(
            "--train_propagation memory trains SAM 2's memory modules, which this run freezes (stage 4 alone trains "
            "them). Fix: --stage 4, --trainable_parameters propagator, or --train_propagation per_frame"
        )


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer in the backward pass (``--gradient_checkpointing true``), non-reentrant: a
    training-only objective may read an attention input captured in the forward, which a reentrant recompute
    would cut from the graph."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def resolve_and_report(args: SftArguments) -> None:
    """Fill in the unset flags as upstream users mean them, fit the machine, and print the stage (and why) and
    every resolved setting in one block."""
    resolution = resolve_arguments(args)
    before = {f.name: getattr(args, f.name) for f in fields(args)}
    for notice in adapt_to_machine(args):
        _say(notice)
    machine_sources(before, args, resolution.sources)
    _say(resolution.stage_line)
    _say(settings_block(args, resolution.sources))


def freeze_plan(args: SftArguments) -> FreezePlan:
    """The freeze plan the (resolved) flags describe."""
    names = read_freeze_names(args.freeze_custom_parameters_json) if args.freeze_custom_parameters_json else []
    return FreezePlan(
        stage=args.stage,
        freeze_vit=args.freeze_vit,
        freeze_aligner=args.freeze_aligner,
        freeze_llm=args.freeze_llm,
        freeze_parameters=list(args.freeze_parameters),
        freeze_parameters_regex=args.freeze_parameters_regex,
        freeze_parameters_ratio=args.freeze_parameters_ratio,
        freeze_names=names,
        trainable_parameters=list(args.trainable_parameters),
        trainable_parameters_regex=args.trainable_parameters_regex,
    )


def run_sft(args: SftArguments) -> Path:
    """Train; return the folder of the final model."""
    resolve_and_report(args)
    if args.streaming and args.max_steps <= 0:
        raise SftError("--streaming needs --max_steps: a stream of shards has no length to count epochs by")
    prepare_output_dir(args)
    resume = resolve_resume(args)
    set_seed(args.seed)

    model, processor = load_model(args)
    freeze_plan(args).apply(model)
    check_propagation(model)
    if args.hook_grad_factor is not None:
        model.config.hook_grad_factor = args.hook_grad_factor
    if args.train_type == "lora":
        model = apply_lora(model, args)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    _say(parameter_table(model))
    _say(f"HookGrad factor: {model.config.hook_grad_factor}")

    dataset, collator, summary = build_train_dataset(
        args, processor, tokens_per_second=model.config.vision_config.tokens_per_second
    )
    _say(summary)

    trainer = CitrusVTrainer(
        model=model,
        args=training_arguments(args),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[
            JsonlLoggerCallback(args.output_dir),
            LossCurveCallback(args.output_dir),
            DdpDigestCallback(args.output_dir),
        ],
    )
    trainer.train(resume_from_checkpoint=resume)
    _say(skipped_summary(trainer.skipped_rows))
    final = trainer.save_final_model(
        args.output_dir, {"sft_args.json": json.dumps(vars(args), indent=2, default=str) + "\n"}
    )
    _say(f"saved the trained model to {final}")
    return final
