"""LoRA through peft on the language model's linear layers; seg projector and SAM 2 train in full."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..modeling.modeling_citrus_v import CitrusV

# Linear layers of the Qwen2.5-VL decoder that "all-linear" means here (the vision tower stays full/frozen).
LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_MODULES = ("seg_projector", "grounding_encoder")


def lora_target_regex(target_modules: list[str]) -> str:
    names = LLM_LINEAR if target_modules in (["all-linear"], ["all"]) else tuple(target_modules)
    return rf"^mllm\.model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})$"


def apply_lora(model: CitrusV, args) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on the LLM; keep the seg modules fully trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_regex(list(args.target_modules)),
        modules_to_save=list(FULL_MODULES),
        bias="none",
    )
    return get_peft_model(model, config)


def merge_lora(checkpoint: str | Path, out: str | Path) -> Path:
    """Merge a LoRA checkpoint into its base model and save a plain CitrusV folder."""
    import json

    from peft import PeftModel

    from ..processing.processor import CitrusVProcessor

    checkpoint = Path(checkpoint)
    adapter_config = checkpoint / "adapter_config.json"
    if not adapter_config.is_file():
        raise FileNotFoundError(f"{adapter_config} is missing: {checkpoint} is not a LoRA checkpoint")
    base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(CitrusV.from_pretrained(base), checkpoint).merge_and_unload()
    out = Path(out)
    model.save_pretrained(out)
    processor_dir = checkpoint if (checkpoint / "tokenizer.json").is_file() else Path(base)
    CitrusVProcessor.from_pretrained(processor_dir).save_pretrained(out)
    return out
