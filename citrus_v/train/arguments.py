"""``citrus-v sft`` arguments, named and valued as upstream's ``swift sft`` flags.

Upstream command lines work with ``swift`` replaced by ``citrus-v``: booleans take ``true``/``false``
(or stand alone), and every flag keeps its upstream meaning. Where this machine cannot honour a flag,
:func:`adapt_to_machine` says so in one line and falls back or clamps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_type_hints

from ..cli_parser import MODEL_HELP

if TYPE_CHECKING:
    import torch

TEMPLATES = ("citrus_v",)


def str2bool(value: str | bool) -> bool:
    """Parse upstream-style booleans: true/false, 1/0, yes/no."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _flag(default: Any, text: str) -> Any:
    """A dataclass field with a default and its ``--help`` text."""
    return field(default=default, metadata={"help": text})


@dataclass
class SftArguments:
    """All flags of ``citrus-v sft`` (upstream names), with upstream's defaults where they matter."""

    model: str = field(metadata={"help": MODEL_HELP})
    dataset: list[str] = field(metadata={"help": "JSONL files, FILE#N to sample N rows, or folders of shards"})
    output_dir: str = _flag("output", "where checkpoints and logs go")
    template: str = _flag("citrus_v", "chat template")
    stage: int | None = _flag(
        None, "1-4: a freeze preset (freeze flags given beside it override it); unset: --freeze_vit, "
        "--freeze_aligner and --freeze_llm all false is stage 3, all true is stage 4"
    )
    train_type: str = _flag("full", "full or lora")
    torch_dtype: str | None = _flag(None, "float32, bfloat16 or float16; unset: the checkpoint's config.json dtype")
    attn_impl: str | None = _flag(None, "sdpa, eager or flash_attn")
    max_length: int = _flag(2048, "longest sequence in tokens; longer rows are dropped")
    num_train_epochs: float = _flag(3.0, "passes over the dataset")
    max_steps: int = _flag(-1, "total optimiser steps; -1: from the epochs")
    learning_rate: float | None = _flag(None, "peak learning rate; unset: 1e-5 for full training, 1e-4 for LoRA")
    warmup_ratio: float = _flag(0.0, "share of the steps spent warming up the learning rate")
    warmup_steps: int = _flag(0, "warm-up steps (overrides --warmup_ratio when > 0)")
    lr_scheduler_type: str = _flag("cosine", "learning-rate schedule: cosine, linear, constant, ...")
    adam_beta1: float = _flag(0.9, "AdamW beta1")
    adam_beta2: float = _flag(0.95, "AdamW beta2")
    weight_decay: float = _flag(0.1, "AdamW weight decay")
    max_grad_norm: float = _flag(1.0, "gradient clipping norm")
    per_device_train_batch_size: int = _flag(1, "rows per device per step")
    gradient_accumulation_steps: int = _flag(1, "steps whose gradients are summed before each update")
    dataloader_num_workers: int = _flag(0, "data-loading worker processes")
    dataset_num_proc: int = _flag(1, "processes that check and measure the dataset's rows before training")
    freeze_vit: bool | None = _flag(None, "freeze the vision tower; unset: as --stage says, else true")
    freeze_aligner: bool | None = _flag(None, "freeze the vision-language merger; unset: as --stage says, else true")
    freeze_llm: bool | None = _flag(None, "freeze the language model; unset: as --stage says, else false")
    freeze_parameters: list[str] = field(
        default_factory=list, metadata={"help": "parameter-name prefixes to freeze (after the stage and freeze flags)"}
    )
    freeze_parameters_regex: str | None = _flag(None, "regex of parameter names to freeze")
    freeze_parameters_ratio: float = _flag(0.0, "freeze this share (0-1) of all parameters, first layers first")
    freeze_custom_parameters_json: str | None = _flag(
        None, "JSON file listing exact parameter names to freeze (upstream's stage-4 list)"
    )
    trainable_parameters: list[str] = field(
        default_factory=list, metadata={"help": "parameter-name prefixes to train, whatever froze them"}
    )
    trainable_parameters_regex: str | None = _flag(None, "regex of parameter names to train, whatever froze them")
    hook_grad_factor: float | None = _flag(None, "HookGrad factor (stage 3: 0.001)")
    save_strategy: str = _flag("steps", "when to save: steps, epoch or no")
    save_steps: int = _flag(500, "save every N steps")
    save_total_limit: int | None = _flag(None, "keep at most N checkpoints (default: all)")
    save_only_model: bool = _flag(False, "save the weights without the optimiser state")
    logging_steps: int = _flag(5, "log every N steps")
    gradient_checkpointing: bool = _flag(True, "recompute activations in the backward pass to save memory")
    ddp_find_unused_parameters: bool | None = _flag(None, "DDP find_unused_parameters (default: auto)")
    packing: bool = _flag(False, "pack several rows into one sequence of --max_length")
    streaming: bool = _flag(False, "read the dataset lazily instead of loading it all")
    seed: int = _flag(42, "random seed")
    deepspeed: str | None = _flag(None, "zero2, zero3 or a DeepSpeed JSON file")
    resume_from_checkpoint: str | None = _flag(None, "a checkpoint folder or 'latest'")
    overwrite_output_dir: bool = _flag(False, "write into an --output_dir that already holds a run")
    lora_rank: int = _flag(8, "LoRA rank")
    lora_alpha: int = _flag(32, "LoRA alpha")
    lora_dropout: float = _flag(0.05, "LoRA dropout")
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA targets (all-linear: every linear layer)"}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "logging integrations: tensorboard, none, ..."}
    )
    strict: bool = _flag(False, "stop at the first bad dataset row")
    mask_loss_weight: float | None = _flag(None, "weight of the mask BCE loss (default: the model config's)")
    dice_loss_weight: float | None = _flag(None, "weight of the mask Dice loss (default: the model config's)")
    point_prompt_probability: float | None = field(
        default=None,
        metadata={"help": "share of training masks that also get a positive point inside the target (0-1)"},
    )
    presence_loss_weight: float | None = _flag(
        None, "weight of SAM 2's presence loss (object score vs. whether the target is on the image or frame; "
        "0 turns it off; default: the model config's)"
    )
    sam_train_frames: int = _flag(
        4, "frames of a volume or clip SAM 2 trains on per row with 3-D masks (frames with and without the target)"
    )
    train_propagation: str | None = _flag(
        None, "how a volume's [SEG] meets its training frames: per_frame, or memory (SAM 2's memory modules, which "
        "train in stage 4; needs a model with them); default: the model config's"
    )

    @property
    def dtype(self) -> torch.dtype:
        """``--torch_dtype`` as a torch dtype; unset, the checkpoint's (as ms-swift reads it)."""
        import torch  # here, not at the top: `citrus-v --help` builds this parser without loading torch

        from .resolve import default_torch_dtype

        name = self.torch_dtype if self.torch_dtype is not None else default_torch_dtype(self.model)[0]
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every :class:`SftArguments` field to ``parser`` as ``--name``."""
    hints = get_type_hints(SftArguments)
    for spec in dataclasses.fields(SftArguments):
        hint = hints[spec.name]
        text = str(hint)
        kwargs: dict[str, Any] = {"help": spec.metadata.get("help")}
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if required:
            kwargs["required"] = True
        elif spec.default is not dataclasses.MISSING:
            kwargs["default"] = spec.default
        else:
            kwargs["default"] = spec.default_factory()
        if "bool" in text:
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="true|false")
        elif "list" in text:
            kwargs.update(nargs="+")
        elif "int" in text and "float" not in text:
            kwargs["type"] = int
        elif "float" in text:
            kwargs["type"] = float
        parser.add_argument(f"--{spec.name}", **kwargs)


def parse_namespace(namespace: argparse.Namespace) -> SftArguments:
    """Build :class:`SftArguments` from a parsed namespace, checking the choice-valued flags."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(SftArguments)}
    args = SftArguments(**values)
    if args.template not in TEMPLATES:
        raise ValueError(f"--template {args.template!r} is not available; templates: {', '.join(TEMPLATES)}")
    if args.train_type not in ("full", "lora"):
        raise ValueError(f"--train_type must be full or lora, got {args.train_type!r}")
    if args.torch_dtype not in (None, "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        raise ValueError(f"--torch_dtype must be float32, bfloat16 or float16, got {args.torch_dtype!r}")
    if args.stage is not None and args.stage not in (1, 2, 3, 4):
        raise ValueError(f"--stage must be 1, 2, 3 or 4, got {args.stage}")
    if not 0.0 <= args.freeze_parameters_ratio <= 1.0:
        raise ValueError(f"--freeze_parameters_ratio must be within 0 and 1, got {args.freeze_parameters_ratio}")
    if args.dataset_num_proc < 1:
        raise ValueError(f"--dataset_num_proc must be at least 1, got {args.dataset_num_proc}")
    if args.sam_train_frames < 1:
        raise ValueError(f"--sam_train_frames must be at least 1, got {args.sam_train_frames}")
    if args.train_propagation not in (None, "per_frame", "memory"):
        raise ValueError(f"--train_propagation must be per_frame or memory, got {args.train_propagation!r}")
    if args.save_strategy not in ("steps", "epoch", "no"):
        raise ValueError(f"--save_strategy must be steps, epoch or no, got {args.save_strategy!r}")
    return args


def adapt_to_machine(args: SftArguments) -> list[str]:
    """Fall back or clamp where the machine cannot honour a flag; return the one-line notices."""
    import torch

    notices: list[str] = []
    cuda = torch.cuda.is_available()
    if args.attn_impl in ("flash_attn", "flash_attention_2"):
        try:
            import flash_attn  # noqa: F401

            available = cuda
        except ImportError:
            available = False
        if not available:
            notices.append("--attn_impl flash_attn: flash-attn or a GPU is missing here; using sdpa")
            args.attn_impl = "sdpa"
    if args.torch_dtype in ("bfloat16", "bf16", "float16", "fp16") and not cuda:
        notices.append(f"--torch_dtype {args.torch_dtype}: no GPU here, training in float32 (faster on this CPU)")
        args.torch_dtype = "float32"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible and visible.strip() not in ("", "-1"):
        wanted = [d for d in visible.split(",") if d.strip()]
        have = torch.cuda.device_count()
        if have < len(wanted):
            notices.append(f"CUDA_VISIBLE_DEVICES={visible}: only {have} GPU(s) present; using what there is")
    cores = os.cpu_count() or 1
    if args.dataloader_num_workers > cores:
        notices.append(f"--dataloader_num_workers {args.dataloader_num_workers}: {cores} cores here; using {cores}")
        args.dataloader_num_workers = cores
    if args.dataset_num_proc > cores:
        notices.append(f"--dataset_num_proc {args.dataset_num_proc}: {cores} cores here; using {cores}")
        args.dataset_num_proc = cores
    if args.deepspeed and not cuda:
        notices.append(f"--deepspeed {args.deepspeed}: DeepSpeed needs GPUs; training with plain DDP instead")
        args.deepspeed = None
    return notices
