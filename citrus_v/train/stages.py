"""Training stages as freeze presets, ms-swift's freeze flags and name lists on top, and a table of what trains.

| stage | trains                                          | frozen                    |
|-------|-------------------------------------------------|---------------------------|
| 1     | vision encoder + aligner                        | LLM, seg modules          |
| 2     | whole MLLM                                      | seg projector, SAM 2      |
| 3     | everything but SAM 2's memory (HookGrad 0.001)  | SAM 2's memory modules    |
| 4     | seg projector + all of SAM 2, memory included   | MLLM                      |

SAM 2's memory modules (``propagator.*``: memory attention, memory encoder, object pointers; only in a model
with ``sam2_memory_config``) carry a mask through a volume's frames. They train in stage 4 alone, on volume and
clip rows with ``--train_propagation memory``, and are frozen in every other stage and without a stage preset
(``--trainable_parameters propagator`` trains them anyway). SAM 2's object-score head
(``grounding_encoder.mask_decoder.pred_obj_score_head``, with its ``obj_score_token``), which says on which
frames the target is, is part of the mask decoder and trains with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
    "sam memory": ("propagator.",),
}
# SAM 2's memory modules: trained by stage 4 alone (see the module docstring)
MEMORY_COMPONENT = "sam memory"

# Which components each stage trains; HookGrad factor per stage.
STAGES: dict[int, tuple[set[str], float]] = {
    1: ({"vision encoder", "aligner"}, 1.0),
    2: ({"vision encoder", "aligner", "llm"}, 1.0),
    3: (set(COMPONENTS) - {MEMORY_COMPONENT}, 0.001),
    4: ({"seg projector", "sam image encoder", "sam prompt encoder", "sam mask decoder", MEMORY_COMPONENT}, 1.0),
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


# characters that mark a regex given where a name prefix is expected (a dot is common to both)
REGEX_SIGNS = "*+?[](){}|^$\\"
# ms-swift's freeze flags and the component each one freezes
FREEZE_FLAGS: dict[str, str] = {"freeze_vit": "vision encoder", "freeze_aligner": "aligner", "freeze_llm": "llm"}


def describe_components(trained: set[str]) -> str:
    """``everything``, ``everything but sam memory`` or the trained components in table order, for one line."""
    if trained >= set(COMPONENTS):
        return "everything"
    if trained >= set(COMPONENTS) - {MEMORY_COMPONENT}:
        return f"everything but {MEMORY_COMPONENT}"
    return ", ".join(c for c in COMPONENTS if c in trained) or "nothing"


@dataclass
class FreezePlan:
    """What trains. First the stage preset and the freeze flags pick whole components; then, in ms-swift's
    order, ``freeze_parameters_ratio``, the ``freeze_parameters`` prefixes, ``freeze_parameters_regex`` and
    upstream's list of names freeze, and last the ``trainable_parameters`` prefixes and
    ``trainable_parameters_regex`` make trainable whatever the steps before froze."""

    stage: int | None = None
    freeze_vit: bool | None = None
    freeze_aligner: bool | None = None
    freeze_llm: bool | None = None
    freeze_parameters: list[str] = field(default_factory=list)
    freeze_parameters_regex: str | None = None
    freeze_parameters_ratio: float = 0.0
    freeze_names: list[str] = field(default_factory=list)
    trainable_parameters: list[str] = field(default_factory=list)
    trainable_parameters_regex: str | None = None

    def trainable_components(self) -> set[str]:
        if self.stage is not None and self.stage not in STAGES:
            raise StageError(f"--stage must be 1, 2, 3 or 4; got {self.stage}")
        # without a preset everything trains that the flags leave, but SAM 2's memory (stage 4's alone)
        trained = set(STAGES[self.stage][0]) if self.stage is not None else set(COMPONENTS) - {MEMORY_COMPONENT}
        for flag, component in FREEZE_FLAGS.items():
            value = getattr(self, flag)
            if value is True:
                trained.discard(component)
            elif value is False:
                trained.add(component)
        return trained

    def hook_grad_factor(self) -> float | None:
        return STAGES[self.stage][1] if self.stage is not None else None

    def apply(self, model: nn.Module) -> None:
        """Set ``requires_grad`` on every parameter of ``model``."""
        trained = self.trainable_components()
        if self.stage == 4 and not any(n.startswith("seg_projector") for n, _ in model.named_parameters()):
            raise StageError("stage 4 trains the seg projector and SAM 2, but this model has no seg modules")
        params = list(model.named_parameters())
        names = [name for name, _ in params]
        flags = {name: component_of(name) in trained for name in names}
        steps = (
            (ratio_frozen(params, self.freeze_parameters_ratio), False),
            (_by_prefix(names, self.freeze_parameters, "--freeze_parameters"), False),
            (_by_regex(names, self.freeze_parameters_regex, "--freeze_parameters_regex"), False),
            (_named(names, self.freeze_names, "--freeze_custom_parameters_json"), False),
            (_by_prefix(names, self.trainable_parameters, "--trainable_parameters"), True),
            (_by_regex(names, self.trainable_parameters_regex, "--trainable_parameters_regex"), True),
        )
        for chosen, trainable in steps:
            for name in chosen:
                flags[name] = trainable
        for name, param in params:
            param.requires_grad_(flags[name])


def read_freeze_names(path: str) -> list[str]:
    """The parameter names of a ``--freeze_custom_parameters_json`` file: a JSON list of strings, as upstream's
    ``projects/vlm_7B_params.json``."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise StageError(f"--freeze_custom_parameters_json {file}: no such file")
    try:
        names = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise StageError(f"--freeze_custom_parameters_json {file} line {err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise StageError(
            f"--freeze_custom_parameters_json {file}: expected a JSON list of parameter names, such as "
            '["mllm.lm_head.weight", ...]'
        )
    return names


def ratio_frozen(params: list[tuple[str, nn.Parameter]], ratio: float) -> list[str]:
    """The first parameters, in the model's order, that together hold at most ``ratio`` of all its values (as
    ms-swift's ``--freeze_parameters_ratio`` counts them)."""
    if ratio <= 0:
        return []
    budget = int(sum(p.numel() for _, p in params) * ratio)
    frozen, total = [], 0
    for name, param in params:
        total += param.numel()
        if total > budget:
            break
        frozen.append(name)
    return frozen


def _by_prefix(names: list[str], prefixes: list[str], flag: str) -> list[str]:
    """Names that start with one of ``prefixes``; a prefix that matches none is an error, not a no-op."""
    found = []
    for prefix in prefixes:
        matched = [name for name in names if name.startswith(prefix)]
        if not matched:
            hint = f"; for a regex use {flag}_regex" if set(prefix) & set(REGEX_SIGNS) else ""
            raise StageError(
                f"{flag} {prefix}: no parameter name starts with it (a prefix such as {_example(names)}){hint}"
            )
        found += matched
    return found


def _by_regex(names: list[str], pattern: str | None, flag: str) -> list[str]:
    """Names the regex finds (``re.search``); an invalid regex or one that finds nothing is an error."""
    if pattern is None:
        return []
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise StageError(f"{flag} {pattern!r} is not a valid regular expression ({err})") from err
    found = [name for name in names if compiled.search(name)]
    if not found:
        raise StageError(f"{flag} {pattern!r} matches no parameter name (names look like {_example(names)})")
    return found


def _named(names: list[str], wanted: list[str], flag: str) -> list[str]:
    """``wanted``, each of which must be a parameter name of the model."""
    known = set(names)
    missing = [name for name in wanted if name not in known]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise StageError(f"{flag}: {len(missing)} name(s) are not parameters of this model: {shown}")
    return list(wanted)


def _example(names: list[str]) -> str:
    middle = names[len(names) // 2] if names else "mllm.model.language_model"
    return ".".join(middle.split(".")[:3])


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
