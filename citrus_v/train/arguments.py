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


@dataclass
class SftArguments:
    """All flags of ``citrus-v sft`` (upstream names), with upstream's defaults where they matter."""

    model: str = field(metadata={"help": "model folder (citrus-v build output or a checkpoint)"})
    dataset: list[str] = field(metadata={"help": "JSONL files, FILE#N to sample N rows, or folders of shards"})
    output_dir: str = field(default="output", metadata={"help": "where checkpoints and logs go"})
    template: str = field(default="citrus_v", metadata={"help": "chat template"})
    stage: int | None = field(default=None, metadata={"help": "1-4: freeze preset (explicit flags override)"})
    train_type: str = field(default="full", metadata={"help": "full or lora"})
    torch_dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    attn_impl: str | None = field(default=None, metadata={"help": "sdpa, eager or flash_attn"})
    max_length: int = field(default=2048, metadata={"help": "longest sequence in tokens; longer rows are dropped"})
    num_train_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 1e-5
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    dataloader_num_workers: int = 0
    dataset_num_proc: int = 1
    freeze_vit: bool | None = None
    freeze_aligner: bool | None = None
    freeze_llm: bool | None = None
    trainable_parameters: str | None = field(default=None, metadata={"help": "regex of parameters to train"})
    freeze_parameters: str | None = field(default=None, metadata={"help": "regex of parameters to freeze"})
    hook_grad_factor: float | None = field(default=None, metadata={"help": "HookGrad factor (stage 3: 0.001)"})
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    logging_steps: int = 5
    gradient_checkpointing: bool = False
    ddp_find_unused_parameters: bool | None = None
    packing: bool = False
    streaming: bool = False
    seed: int = 42
    deepspeed: str | None = field(default=None, metadata={"help": "zero2, zero3 or a DeepSpeed JSON file"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder or 'latest'"})
    overwrite_output_dir: bool = False
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    strict: bool = field(default=False, metadata={"help": "stop at the first bad dataset row"})
    mask_loss_weight: float | None = None
    dice_loss_weight: float | None = None
    point_prompt_probability: float | None = field(
        default=None,
        metadata={"help": "share of training masks that also get a positive point inside the target (0-1)"},
    )

    @property
    def dtype(self) -> torch.dtype:
        import torch  # here, not at the top: `citrus-v --help` builds this parser without loading torch

        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[self.torch_dtype]


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
    if args.torch_dtype not in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        raise ValueError(f"--torch_dtype must be float32, bfloat16 or float16, got {args.torch_dtype!r}")
    if args.stage is not None and args.stage not in (1, 2, 3, 4):
        raise ValueError(f"--stage must be 1, 2, 3 or 4, got {args.stage}")
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
