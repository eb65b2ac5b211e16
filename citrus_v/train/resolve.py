"""How a ``citrus-v sft`` command line resolves, as upstream users mean it.

Upstream's stage-3 and stage-4 command lines give no stage: they set ms-swift's freeze flags, and the stage
follows from them. Flags left out take ms-swift's defaults. :func:`resolve_arguments` fills in what the user
left unset, and :func:`settings_block` prints every setting, marking where each filled-in value came from.

- ``--stage N`` given: the freeze flags left unset follow the stage's preset.
- No ``--stage``: the freeze flags left unset take ms-swift's defaults (``freeze_vit`` and ``freeze_aligner``
  true, ``freeze_llm`` false); then all three false is stage 3 (everything trains, HookGrad 0.001), all three
  true is stage 4 (seg projector and SAM 2 train), and any other mix has no preset: the flags decide alone.
- ``--torch_dtype`` unset: the checkpoint's ``config.json`` dtype; without one, bfloat16 (float16 where the
  GPU lacks it) on a GPU and float32 on a CPU, as ms-swift chooses.
- ``--learning_rate`` unset: 1e-5 for full training, 1e-4 for LoRA, as ms-swift.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..checkpoint_layout import read_config_dict, resolve_model

if TYPE_CHECKING:
    from .arguments import SftArguments

# ms-swift's defaults for the freeze flags (its TunerArguments)
SWIFT_FREEZE_DEFAULTS = {"freeze_vit": True, "freeze_aligner": True, "freeze_llm": False}
# ms-swift's learning rate when none is given, by --train_type
SWIFT_LEARNING_RATES = {"full": 1e-5, "lora": 1e-4}
DTYPE_NAMES = ("float32", "bfloat16", "float16")
BLOCK_WIDTH = 110


@dataclass
class Resolution:
    """What was filled in: the stage line (which stage and why) and, per setting, where its value came from."""

    stage_line: str
    sources: dict[str, str] = field(default_factory=dict)


def checkpoint_dtype(model: str) -> str | None:
    """The dtype a checkpoint's ``config.json`` names (``torch_dtype``, or ``dtype`` as transformers 5 writes
    it; top level first, then the language model's), or ``None``."""
    config = read_config_dict(resolve_model(model))
    for holder in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            value = holder.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in DTYPE_NAMES:
                return value.removeprefix("torch.")
    return None


def default_torch_dtype(model: str) -> tuple[str, str]:
    """``--torch_dtype`` when unset, and where it came from."""
    found = checkpoint_dtype(model)
    if found is not None:
        return found, "config.json"
    import torch

    if torch.cuda.is_available():
        return ("bfloat16" if torch.cuda.is_bf16_supported() else "float16"), "no dtype in config.json; GPU"
    return "float32", "no dtype in config.json; CPU"


def resolve_arguments(args: SftArguments) -> Resolution:
    """Fill in the unset settings of ``args`` (in place): dtype, learning rate, the freeze flags and the stage."""
    sources: dict[str, str] = {}
    if args.torch_dtype is None:
        args.torch_dtype, sources["torch_dtype"] = default_torch_dtype(args.model)
    if args.learning_rate is None:
        args.learning_rate = SWIFT_LEARNING_RATES[args.train_type]
        sources["learning_rate"] = f"ms-swift's for --train_type {args.train_type}"
    stage_line = _resolve_stage(args, sources)
    return Resolution(stage_line, sources)


def _resolve_stage(args: SftArguments, sources: dict[str, str]) -> str:
    from .stages import FREEZE_FLAGS, STAGES, FreezePlan, describe_components

    if args.stage is not None:
        preset = STAGES[args.stage][0]
        for flag, component in FREEZE_FLAGS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, component not in preset)
                sources[flag] = f"stage {args.stage}"
        why = f"given by --stage {args.stage}"
        title = f"stage {args.stage}"
    else:
        for flag, default in SWIFT_FREEZE_DEFAULTS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, default)
                sources[flag] = "ms-swift default"
        values = [getattr(args, flag) for flag in FREEZE_FLAGS]
        named = ", ".join(
            f"--{flag} {str(getattr(args, flag)).lower()}" + (" (ms-swift default)" if flag in sources else "")
            for flag in FREEZE_FLAGS
        )
        if all(values) or not any(values):
            args.stage = 4 if all(values) else 3
            sources["stage"] = "inferred"
            title = f"stage {args.stage}, inferred"
            why = f"{named}: all {'true' if all(values) else 'false'}"
        else:
            title = "no stage preset"
            why = f"{named}: neither all false (stage 3) nor all true (stage 4), so the flags alone decide"
    plan = FreezePlan(stage=args.stage, **{flag: getattr(args, flag) for flag in FREEZE_FLAGS})
    factor = args.hook_grad_factor
    if factor is None and args.stage is not None:
        factor = args.hook_grad_factor = STAGES[args.stage][1]
        sources["hook_grad_factor"] = f"stage {args.stage}"
    if factor is None:
        hook = "HookGrad as the checkpoint's config.json says"
    else:
        hook = "no HookGrad" if factor == 1.0 else f"HookGrad {factor:g}"
    trains = describe_components(plan.trainable_components())
    return f"{title} — {why}; trains {trains}; {hook}"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) if value else "[]"
    return "none" if value is None else str(value)


def settings_block(args: SftArguments, sources: dict[str, str]) -> str:
    """Every setting of ``args`` as ``name=value``, wrapped into one block; a value that was filled in or
    changed for this machine carries its origin in brackets."""
    lines: list[str] = []
    line = ""
    for spec in fields(args):
        origin = f" [{sources[spec.name]}]" if spec.name in sources else ""
        word = f"{spec.name}={_shown(getattr(args, spec.name))}{origin}"
        if line and len(line) + 1 + len(word) > BLOCK_WIDTH:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "settings:\n" + "\n".join(f"  {text}" for text in lines)


def machine_sources(before: dict[str, Any], args: SftArguments, sources: dict[str, str]) -> None:
    """Mark in ``sources`` each setting the machine changed (``before``: the values before the change)."""
    for name, old in before.items():
        new = getattr(args, name)
        if new != old:
            origin = sources.get(name)
            sources[name] = f"{_shown(old)}{f' from {origin}' if origin else ''}, changed for this machine"
