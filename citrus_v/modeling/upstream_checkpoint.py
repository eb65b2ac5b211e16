"""The released Citrus-V checkpoint layout (``Citrus-V-8B-v1.0``): read it, write it.

Recognising the layout and reading its SAM 2 configuration need no model and live in
:mod:`citrus_v.checkpoint_layout.upstream`; the tensors are handled here.

Upstream stores the same three parts as we do, but its SAM 2 sits under ``grounding_encoder.sam2_model.`` in
Meta's original names, and its ``config.json`` names the SAM 2 architecture only by ``cfg_path``
(``.../sam2_hiera_l.yaml``). Reading:

- ``mllm.*`` and ``seg_projector.*`` load as they are (legacy ``mllm.model.layers`` names are accepted too);
- ``grounding_encoder.sam2_model.*`` goes through :mod:`citrus_v.modeling.sam2_names`;
- the video/memory tensors (:data:`~citrus_v.modeling.sam2_names.IGNORED_MODULES`) load into SAM 2's memory
  modules (``propagator.*``, :mod:`citrus_v.modeling.propagation`) through
  :mod:`citrus_v.modeling.sam2_video_names`, with the memory architecture read from their shapes
  (:func:`upstream_memory_config`); tensors that transformers' ``Sam2VideoModel`` cannot hold are set aside
  instead (said in the log), kept on the model as ``upstream_unused_tensors`` and saved next to our weights in
  ``upstream_unused.safetensors``. Either way writing the upstream layout again gives back every tensor bit
  for bit;
- tensors are read one shard at a time with ``safe_open`` into the one state dict the model then owns, so the
  peak memory stays near one copy of the weights.

Writing (:func:`write_upstream`) works on tensors, shard by shard, without building the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Sam2Config

from ..checkpoint_layout import (
    CONFIG_FILE,
    META_PREFIX,
    WEIGHTS_INDEX_FILE,
    CheckpointError,
    is_upstream_layout,
    read_config_dict,
    resolve_model,
    weight_files,
)
from ..checkpoint_layout.sam2_variants import VARIANTS
from ..objectives import head_prefixes
from .checkpoint import canonical_name, raise_weight_problems
from .configuration_citrus_v import UPSTREAM_MASK_POSTPROCESS, CitrusVConfig
from .grounding import GroundingEncoder
from .propagation import SegPropagator, video_config
from .sam2_names import Sam2NameError, hf_to_meta, hf_to_meta_name, is_ignored, meta_to_hf
from .sam2_video_names import (
    MemoryLayoutError,
    hf_to_meta_memory_name,
    memory_config_from_meta,
    meta_to_hf_memory,
)

logger = logging.getLogger(__name__)

SAM_PREFIX = "grounding_encoder."
# SAM 2's memory modules on the model (CitrusV.propagator); Meta's names for them under META_PREFIX
MEMORY_PREFIX = "propagator."
# seg_point_head (the [SEG] point head) is ours: it travels next to the projector, and only Citrus-V reads it
PASS_THROUGH = ("mllm.", "seg_projector.", "seg_point_head.")
# training-only objectives' heads (citrus_v.objectives.head_prefixes) have no upstream module: they are
# left out of the upstream layout (and its config)
UNUSED_FILE = "upstream_unused.safetensors"
DEFAULT_SHARD_SIZE = "5GB"

# Upstream's loss settings (mmdet CrossEntropyLoss / DiceLoss keyword arguments); ours hold the weights.
UPSTREAM_LOSS_MASK = {"use_sigmoid": True, "reduction": "mean", "loss_weight": 2.0}
UPSTREAM_LOSS_DICE = {
    "use_sigmoid": True,
    "activate": True,
    "reduction": "mean",
    "naive_dice": True,
    "eps": 1.0,
    "loss_weight": 1.0,
}
UPSTREAM_ONLY_FIELDS = (
    "frozen_sam2_decoder",
    "frozen_sam2_image_encoder",
    "frozen_sam2_prompt_encoder",
    "use_seg_loss",
)
# Files of our folders that the upstream layout does not have (everything else, e.g. the tokenizer, is copied).
NOT_COPIED = {CONFIG_FILE, WEIGHTS_INDEX_FILE, UNUSED_FILE, "citrus_v_processor.json"}

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2}
_DTYPE_BYTES.update({"I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8})


class ShardedTensors(Mapping[str, torch.Tensor]):
    """The tensors of safetensors shards, read one at a time on access (headers only until then)."""

    def __init__(self, files: list[Path]) -> None:
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in files:
            try:
                handle = safe_open(path, framework="pt")
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
            self._handles[path] = handle
            for name in handle.keys():
                view = handle.get_slice(name)
                self._where[name] = path
                self._info[name] = (tuple(view.get_shape()), view.get_dtype())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def nbytes(self, name: str) -> int:
        shape, dtype = self._info[name]
        return _DTYPE_BYTES.get(dtype, 4) * int(torch.Size(shape).numel())


class _Prefixed(Mapping[str, torch.Tensor]):
    """A view of ``source`` holding the names that start with ``prefix``, with the prefix removed."""

    def __init__(self, source: Mapping[str, torch.Tensor], prefix: str) -> None:
        self._source = source
        self._prefix = prefix
        self._names = [n[len(prefix) :] for n in source if n.startswith(prefix)]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._source[self._prefix + name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _Shapes(Mapping[str, torch.Tensor]):
    """Meta-device stand-ins for the tensors of ``reader``: renaming them costs no memory."""

    def __init__(self, reader: ShardedTensors) -> None:
        self._reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.empty(self._reader.shape(name), device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader)

    def __len__(self) -> int:
        return len(self._reader)


# --- configuration --------------------------------------------------------------------------------------------
def citrus_config_from_upstream(config_dict: dict, sam2_config: Sam2Config) -> CitrusVConfig:
    """Our configuration for an upstream ``config.json``; upstream's ``grounding_encoder_config`` is kept aside.

    Masks are post-processed as upstream does (``mask_postprocess="threshold_low_res"``) unless the file says
    otherwise."""
    fields = dict(config_dict)
    fields.setdefault("mask_postprocess", UPSTREAM_MASK_POSTPROCESS)
    fields["upstream_grounding_encoder_config"] = fields.get("grounding_encoder_config") or {}
    fields["grounding_encoder_config"] = sam2_config.to_dict()
    return CitrusVConfig.from_dict(fields)


def upstream_memory_config(shapes: ShardedTensors, sam2_config: Sam2Config, directory: Path) -> dict | None:
    """The ``sam2_memory_config`` of an upstream checkpoint's SAM 2 memory tensors, read from their shapes.

    ``None`` when it carries none, or when transformers' ``Sam2VideoModel`` cannot hold them (said in the log:
    they are then set aside as before, and a volume gets per-frame prompting only).
    """
    memory = {
        name[len(META_PREFIX) :]: shapes.shape(name)
        for name in shapes
        if name.startswith(META_PREFIX) and is_ignored(name[len(META_PREFIX) :])
    }
    if not memory:
        logger.info("%s carries no SAM 2 memory modules: masks through frames come from per-frame prompting", directory)
        return None
    try:
        settings = memory_config_from_meta(memory, sam2_config.vision_config.fpn_hidden_size)
        _check_memory_shapes(memory, sam2_config, settings)
    except MemoryLayoutError as err:
        logger.warning(
            "set aside the %d SAM 2 memory tensors of %s (%s): masks through frames come from per-frame prompting",
            len(memory),
            directory,
            err,
        )
        return None
    return settings


def _check_memory_shapes(memory: Mapping[str, tuple[int, ...]], sam2_config: Sam2Config, settings: dict) -> None:
    """Raise :class:`MemoryLayoutError` unless the renamed memory tensors fill the memory modules exactly."""
    renamed = meta_to_hf_memory({name: torch.empty(shape, device="meta") for name, shape in memory.items()})
    with torch.device("meta"):
        expected = SegPropagator(video_config(sam2_config, settings), GroundingEncoder(sam2_config)).state_dict()
    wrong = [
        f"{hf_to_meta_memory_name(n)} {list(t.shape)} (expected {list(expected[n].shape)})"
        for n, t in renamed.items()
        if n in expected and t.shape != expected[n].shape
    ]
    missing = sorted(hf_to_meta_memory_name(n) or n for n in set(expected) - set(renamed))
    if wrong or missing:
        raise MemoryLayoutError(f"shapes {wrong[:4]}, missing {missing[:4]}")


def sam2_variant_name(sam2_config: Sam2Config) -> str | None:
    """Meta's config name for a SAM 2 configuration that equals one of the released variants, else ``None``."""
    ours = _architecture(sam2_config)
    for name, variant in VARIANTS.items():
        if _architecture(variant.config()) == ours:
            return name
    return None


def _architecture(config: Sam2Config) -> dict:
    bookkeeping = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "id2label"}
    bookkeeping |= {"label2id", "output_hidden_states", "output_attentions", "return_dict"}

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in bookkeeping}
        return value

    return clean(config.to_dict())


def upstream_config_dict(config: CitrusVConfig, dtype_name: str) -> dict:
    """``config.json`` in upstream's layout: Qwen2.5-VL text fields at top level, upstream's extra fields."""
    text = config.text_config.to_dict()
    rope = dict(text.pop("rope_parameters", None) or {})
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        text.pop(key, None)
    if rope:
        text["rope_theta"] = rope.get("rope_theta")
        if rope.get("mrope_section") is not None:
            text["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
    vision = config.vision_config.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        vision.pop(key, None)

    grounding = dict(getattr(config, "upstream_grounding_encoder_config", None) or {})
    if not grounding:
        sam2 = config.sam2_config()
        name = sam2_variant_name(sam2)
        grounding = {"apply_postprocessing": True, "torch_dtype": dtype_name}
        if name is not None:
            grounding["cfg_path"] = f"{name}.yaml"
        else:
            # not one of Meta's architectures: upstream's code cannot build it, our loader reads this entry
            grounding["sam2_config"] = sam2.to_dict()
            logger.warning(
                "the SAM 2 of this model is not one of Meta's released architectures (%s): the upstream "
                "config.json carries its full configuration, which only Citrus-V reads",
                ", ".join(VARIANTS),
            )

    out: dict[str, Any] = {"architectures": ["CitrusV"], "model_type": "citrus_v"}
    out.update(text)
    out.update(
        vision_config=vision,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        seg_token_idx=config.seg_token_idx,
        tie_word_embeddings=config.tie_word_embeddings,
        torch_dtype=dtype_name,
        grounding_encoder_config=grounding,
        loss_mask_config={**UPSTREAM_LOSS_MASK, **(config.loss_mask_config or {})},
        loss_dice_config={**UPSTREAM_LOSS_DICE, **(config.loss_dice_config or {})},
    )
    out["frozen_sam2_decoder"] = bool(getattr(config, "frozen_sam2_decoder", False))
    for key in UPSTREAM_ONLY_FIELDS[1:]:
        if hasattr(config, key):
            out[key] = getattr(config, key)
    if config.use_res_seg_projector:
        out["use_res_seg_projector"] = True
    if not config.multimask_output:  # upstream code always takes three candidates; ours reads this field
        out["multimask_output"] = False
    if config.seg_point_head:
        out["seg_point_head"] = True
        logger.warning(
            "this model prompts SAM 2 with a point from each [SEG] (seg_point_head): the head travels in the "
            "upstream files, but only Citrus-V uses it; upstream's code ignores it and its masks will differ"
        )
    return out


# --- reading ----------------------------------------------------------------------------------------------------
def _renamed_names(
    reader: Mapping[str, torch.Tensor], directory: Path, memory: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our names for the tensors of an upstream checkpoint (values as given), and the set-aside upstream names.

    With ``memory`` the video/memory tensors are renamed into the memory modules (``propagator.*``) instead of
    being set aside."""
    foreign = [n for n in reader if not n.startswith(PASS_THROUGH) and not n.startswith(META_PREFIX)]
    if foreign:
        raise CheckpointError(
            f"{directory}: {len(foreign)} tensor(s) belong to no part of Citrus-V ({', '.join(PASS_THROUGH)}, "
            f"{META_PREFIX}): {', '.join(sorted(foreign)[:8])}. Fix: remove them, or restore the original weights"
        )
    try:
        sam, ignored = meta_to_hf(_Prefixed(reader, META_PREFIX))
    except Sam2NameError as err:
        raise CheckpointError(
            f"{directory}: {err} (names under {META_PREFIX}). Fix: restore the original weights of this folder"
        ) from err
    renamed = {canonical_name(n): reader[n] for n in reader if n.startswith(PASS_THROUGH)}
    renamed.update({SAM_PREFIX + name: value for name, value in sam.items()})
    if memory and ignored:
        try:
            held = meta_to_hf_memory(ignored)
        except MemoryLayoutError as err:
            raise CheckpointError(f"{directory}: {err} (names under {META_PREFIX})") from err
        renamed.update({MEMORY_PREFIX + name: value for name, value in held.items()})
        return renamed, []
    return renamed, [META_PREFIX + name for name in ignored]


def _upstream_name(name: str) -> str:
    """The name a tensor of ours has in the upstream layout (for messages)."""
    if name.startswith(SAM_PREFIX):
        inner = name[len(SAM_PREFIX) :]
        return META_PREFIX + (hf_to_meta_name(inner) or inner)
    if name.startswith(MEMORY_PREFIX):
        inner = name[len(MEMORY_PREFIX) :]
        return META_PREFIX + (hf_to_meta_memory_name(inner) or inner)
    return name


def check_upstream_weights(reader: ShardedTensors, expected: Mapping[str, tuple[int, ...]], directory: Path) -> None:
    """Compare the renamed upstream tensors with the model's shapes, from the headers only."""
    renamed, _ = _renamed_names(_Shapes(reader), directory, memory=_holds_memory(expected))
    problems = []
    for name, tensor in renamed.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name]):
            where = reader.file_of(name).name + ": " if name in reader else ""
            problems.append(
                f"{where}{_upstream_name(name)} has shape {list(tensor.shape)} but {CONFIG_FILE} implies "
                f"{list(expected[name])}"
            )
    missing = [_upstream_name(n) for n in expected if n not in renamed]
    unexpected = [n for n in renamed if n not in expected]
    raise_weight_problems(
        problems,
        missing,
        unexpected,
        header=f"the upstream-layout weights in {directory} do not fit {directory / CONFIG_FILE}",
        fix="config.json and the weights come from different models; restore the original files",
        shown=8,
    )


def read_upstream_weights(
    files: list[Path], expected: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read an upstream checkpoint into our names: ``(state_dict, unused)``, unused = the set-aside video tensors.

    Names and shapes are checked first (headers only); each tensor is then read once, shard by shard.
    """
    directory = files[0].parent
    reader = ShardedTensors(files)
    check_upstream_weights(reader, expected, directory)
    state_dict, ignored = _renamed_names(reader, directory, memory=_holds_memory(expected))
    unused = {name: reader[name] for name in ignored}
    if ignored:
        logger.info("set aside %d SAM 2 video/memory tensors of %s (unused for single images)", len(ignored), directory)
    return state_dict, unused


def _holds_memory(expected: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether the model has SAM 2 memory modules to load the upstream memory tensors into."""
    return any(name.startswith(MEMORY_PREFIX) for name in expected)


def stored_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype most tensors have (``None`` without floating tensors); others are named in a warning."""
    counts = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
    if not counts:
        return None
    dtype = counts.most_common(1)[0][0]
    if len(counts) > 1:
        logger.warning("the weights mix floating dtypes %s; loading them all as %s", dict(counts), dtype)
    return dtype


def read_unused(directory: Path) -> dict[str, torch.Tensor]:
    """The set-aside upstream tensors saved next to our weights (empty when there are none)."""
    path = directory / UNUSED_FILE
    return load_file(path) if path.is_file() else {}


def save_unused(tensors: Mapping[str, torch.Tensor], directory: Path) -> None:
    """Save the set-aside upstream tensors next to our weights (nothing when there are none)."""
    if tensors:
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / UNUSED_FILE, metadata={"format": "pt"})


# --- writing ----------------------------------------------------------------------------------------------------
class _Source:
    """One output tensor: a name in a ``ShardedTensors`` (read when its shard is written) or a tensor in memory."""

    def __init__(self, reader: ShardedTensors | None = None, name: str = "", tensor: torch.Tensor | None = None):
        self.reader, self.name, self.tensor = reader, name, tensor

    def nbytes(self) -> int:
        if self.tensor is not None:
            return self.tensor.numel() * self.tensor.element_size()
        return self.reader.nbytes(self.name)

    def load(self) -> torch.Tensor:
        return self.tensor if self.tensor is not None else self.reader[self.name]


def _memory_sources(reader: ShardedTensors, model_dir: Path) -> dict[str, _Source]:
    """The memory modules' tensors (``propagator.*``) under Meta's names, read when their shard is written."""
    sources = {}
    for name in reader:
        if name.startswith(MEMORY_PREFIX):
            meta = hf_to_meta_memory_name(name[len(MEMORY_PREFIX) :])
            if meta is None:
                raise CheckpointError(f"{model_dir}: {name} has no original SAM 2 name")
            sources[META_PREFIX + meta] = _Source(reader, name)
    return sources


def write_upstream(model_dir: str | Path, out: str | Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write the Citrus-V folder ``model_dir`` (our layout) to ``out`` in upstream's layout.

    ``config.json`` upstream-style, sharded safetensors with ``model.safetensors.index.json`` (SAM 2 in Meta's
    names under ``grounding_encoder.sam2_model.``, the memory modules' and any set-aside video tensors among them),
    and the tokenizer and image-processor files. Tensors keep their dtype and values.
    """
    model_dir, out = resolve_model(model_dir), Path(out)
    if model_dir.resolve() == out.resolve():
        raise CheckpointError(f"--out {out} is the model folder itself; give a new folder")
    read_config_dict(model_dir)
    files = weight_files(model_dir)
    if is_upstream_layout(files):
        raise CheckpointError(f"{model_dir} is already in the upstream layout; nothing to convert")
    config = CitrusVConfig.from_pretrained(model_dir)
    reader = ShardedTensors(files)

    sources: dict[str, _Source] = {}  # upstream name -> where its tensor comes from
    sam_names = [n for n in reader if n.startswith(SAM_PREFIX)]
    left_out = sorted(n for n in reader if n.startswith(head_prefixes()))
    if left_out:
        logger.info("left out the training-only tensors %s: upstream has no module for them", ", ".join(left_out))
    foreign = [
        n
        for n in reader
        if not n.startswith((SAM_PREFIX, MEMORY_PREFIX)) and not n.startswith(PASS_THROUGH + head_prefixes())
    ]
    if foreign:
        raise CheckpointError(f"{model_dir}: tensor(s) of no Citrus-V part: {', '.join(sorted(foreign)[:8])}")
    for name in reader:
        if name.startswith(PASS_THROUGH):
            sources[canonical_name(name)] = _Source(reader, name)
    try:
        sam = hf_to_meta(_Prefixed(reader, SAM_PREFIX)) if sam_names else {}
    except Sam2NameError as err:
        raise CheckpointError(f"{model_dir}: {err}") from err
    sources.update({META_PREFIX + name: _Source(tensor=tensor) for name, tensor in sam.items()})
    sources.update(_memory_sources(reader, model_dir))
    unused = read_unused(model_dir)
    clash = sorted(set(unused) & set(sources))
    if clash:
        raise CheckpointError(f"{model_dir / UNUSED_FILE} repeats tensors of the model: {', '.join(clash[:8])}")
    sources.update({name: _Source(tensor=tensor) for name, tensor in unused.items()})

    split = split_state_dict_into_shards_factory(
        sources,
        get_storage_size=_Source.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    out.mkdir(parents=True, exist_ok=True)
    count = len(split.filename_to_tensors)
    weight_map: dict[str, str] = {}
    dtypes: Counter[torch.dtype] = Counter()
    for number, names in enumerate(split.filename_to_tensors.values(), start=1):
        shard = f"model-{number:05d}-of-{count:05d}.safetensors"  # always sharded with an index, as upstream
        tensors = {n: sources[n].load() for n in names}
        dtypes.update(t.dtype for t in tensors.values() if t.is_floating_point())
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        del tensors
    total = sum(source.nbytes() for source in sources.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    dtype_name = str(dtypes.most_common(1)[0][0]).removeprefix("torch.") if dtypes else "float32"
    (out / CONFIG_FILE).write_text(json.dumps(upstream_config_dict(config, dtype_name), indent=2) + "\n")
    weight_names = {p.name for p in files}
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in NOT_COPIED and path.name not in weight_names:
            shutil.copy2(path, out / path.name)
    return out
