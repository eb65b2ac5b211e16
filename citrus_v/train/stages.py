"""Training stages as freeze presets, explicit flags on top, and a table of what trains.

| stage | trains                                   | frozen                |
|-------|------------------------------------------|-----------------------|
| 1     | vision encoder + aligner                 | LLM, seg modules      |
| 2     | whole MLLM                               | seg projector, SAM 2  |
| 3     | everything (HookGrad 0.001)              | —                     |
| 4     | seg projector + all of SAM 2             | MLLM                  |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .. import objectives

# Components by parameter-name prefix, in the order the table prints them.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "vision encoder": ("mllm.model.visual.patch_embed", "mllm.model.visual.blocks", "mllm.model.visual.rotary"),
    # training-only objectives' heads on the merger's output train with the aligner
    "aligner": ("mllm.model.visual.merger", *objectives.head_prefixes("aligner")),
    "llm": ("mllm.model.language_model", "mllm.lm_head"),
    "seg projector": ("seg_projector", "seg_point_head"),
    "sam image encoder": ("grounding_encoder.vision_encoder", "grounding_encoder.mask_decoder.conv_s"),
    "sam prompt encoder": ("grounding_encoder.prompt_encoder", "grounding_encoder.shared_image_embedding"),
    "sam mask decoder": ("grounding_encoder.mask_decoder", "grounding_encoder.no_memory_embedding"),
}

# Which components each stage trains; HookGrad factor per stage.
STAGES: dict[int, tuple[set[str], float]] = {
    1: ({"vision encoder", "aligner"}, 1.0),
    2: ({"vision encoder", "aligner", "llm"}, 1.0),
    3: (set(COMPONENTS), 0.001),
    4: ({"seg projector", "sam image encoder", "sam prompt encoder", "sam mask decoder"}, 1.0),
}


class StageError(ValueError):
    """A stage or freeze request that does not fit the model."""


def component_of(name: str) -> str:
    """The component a parameter belongs to (``other`` when none matches)."""
    # strip wrappers (peft, DDP) so names match
    for prefix in ("base_model.model.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    name = name.replace(".original_module.", ".")
    for component, prefixes in COMPONENTS.items():
        if any(name.startswith(p) for p in prefixes):
            return component
    return "other"


@dataclass
class FreezePlan:
    """What trains: a stage preset, then the upstream freeze flags, then regexes (in that order)."""

    stage: int | None = None
    freeze_vit: bool | None = None
    freeze_aligner: bool | None = None
    freeze_llm: bool | None = None
    trainable_parameters: str | None = None
    freeze_parameters: str | None = None

    def trainable_components(self) -> set[str]:
        if self.stage is not None and self.stage not in STAGES:
            raise StageError(f"--stage must be 1, 2, 3 or 4; got {self.stage}")
        trained = set(STAGES[self.stage][0]) if self.stage is not None else set(COMPONENTS)
        for flag, components in (
            (self.freeze_vit, {"vision encoder"}),
            (self.freeze_aligner, {"aligner"}),
            (self.freeze_llm, {"llm"}),
        ):
            if flag is True:
                trained -= components
            elif flag is False:
                trained |= components
        return trained

    def hook_grad_factor(self) -> float | None:
        return STAGES[self.stage][1] if self.stage is not None else None

    def apply(self, model: nn.Module) -> None:
        """Set ``requires_grad`` on every parameter of ``model``."""
        trained = self.trainable_components()
        if self.stage == 4 and not any(n.startswith("seg_projector") for n, _ in model.named_parameters()):
            raise StageError("stage 4 trains the seg projector and SAM 2, but this model has no seg modules")
        train_re = re.compile(self.trainable_parameters) if self.trainable_parameters else None
        freeze_re = re.compile(self.freeze_parameters) if self.freeze_parameters else None
        for name, param in model.named_parameters():
            trainable = component_of(name) in trained
            if train_re is not None and train_re.search(name):
                trainable = True
            if freeze_re is not None and freeze_re.search(name):
                trainable = False
            param.requires_grad_(trainable)


def parameter_table(model: nn.Module) -> str:
    """Trainable / frozen parameter counts per component, as a printable table."""
    counts: dict[str, list[int]] = {c: [0, 0] for c in [*COMPONENTS, "other"]}
    for name, param in model.named_parameters():
        counts[component_of(name)][0 if param.requires_grad else 1] += param.numel()
    rows = [(c, t, f) for c, (t, f) in counts.items() if t or f]
    total_t = sum(t for _, t, _ in rows)
    total_f = sum(f for _, _, f in rows)
    width = max(len(c) for c, _, _ in rows + [("component", 0, 0)])
    lines = [f"{'component':<{width}}  {'trainable':>14}  {'frozen':>14}"]
    lines += [f"{c:<{width}}  {t:>14,}  {f:>14,}" for c, t, f in rows]
    lines.append(f"{'total':<{width}}  {total_t:>14,}  {total_f:>14,}")
    return "\n".join(lines)
