"""Citrus-V at the released model's dimensions on this CPU: load, memory, prefill/decode speed, one vs two passes.

Builds a random-weight bf16 CitrusV with the dimensions of the release (Qwen2.5-VL-7B text and vision, SAM 2
Hiera-L; ``--size 3b``: the Qwen2.5-VL-3B dimensions; ``small``/``tiny``: scaled-down twins that run in seconds,
for checking the script), writes it in the released upstream layout (``config.json`` upstream-style, sharded
safetensors with an index, SAM 2 in Meta's names with its video/memory tensors, a tokenizer without ``[SEG]``),
then loads it with ``CitrusV.from_pretrained`` and asks one segmentation question and one box question.

- **Weights without a second copy**: a child process builds the model on the meta device, then draws the
  tensors of one shard at a time (``normal_`` in place, bf16) and writes them; SAM 2 (a few hundred MB) is
  drawn whole and renamed with the project's own rules. The parent holds no weights until it loads the folder.
- **Answers are forced**: the weights are random, so a logits processor forces the answer text (one ``[SEG]``
  for the segmentation question, a fenced JSON box for the box question), as ``bench/serve_load.py`` does.
- **Measured**: load time; peak resident memory (``VmHWM``: anonymous memory and the memory-mapped weight pages
  the model touched) against the weights' size; prefill and decode tokens/s, timed inside the generation pass,
  decode against the bound this machine's read bandwidth sets (bandwidth / bytes of language-model weights read
  per token); one segmentation answer in our single pass against upstream's two passes (generate, then a full
  forward over prompt, image and answer for the ``[SEG]`` state) on the same model.

    .venv/bin/python bench/real_scale.py --size 7b       # the release: 15.9 GiB of weights, needs 18.3 GiB free
    .venv/bin/python bench/real_scale.py --size 3b       # when the 7B does not fit (8.0 GiB of weights)
    .venv/bin/python bench/real_scale.py --size small    # under a minute: checks the script
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2_5_VLConfig, Sam2Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.sam2_original_names: Meta's SAM 2 video/memory tensor shapes

from serve_load import ForceText, _two_pass  # noqa: E402  (bench/ is the script's folder)

GIB = 2**30
SEG_QUESTION = "<image>Please segment the lesion."
SEG_ANSWER = "Sure, it is [SEG].<|im_end|>"
BOX_QUESTION = "<image>Locate the lesion, output its bbox coordinates using JSON format."
BOX_ANSWER = '```json\n[\n{"bbox_2d": [61,99,145,178],"label": "lesion"}\n]\n```<|im_end|>'
LANGUAGE_PREFIXES = ("mllm.model.language_model.layers.", "mllm.model.language_model.norm.", "mllm.lm_head.")


@dataclass(frozen=True)
class Dims:
    """The sizes of one Citrus-V: Qwen2.5-VL text and vision, the SAM 2 architecture, the test image side."""

    text_hidden: int
    text_layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's length rounded up to 64 (the tiny preset's rule)
    tie_word_embeddings: bool
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    fullatt_blocks: tuple[int, ...]
    sam2: str  # a Meta architecture name (citrus_v.checkpoint_layout.sam2_variants) or "tiny"
    image_side: int


# Qwen2.5-VL-7B-Instruct and -3B-Instruct config.json; SAM 2 Hiera-L as the release uses.
SIZES: dict[str, Dims] = {
    "7b": Dims(3584, 28, 28, 4, 18944, 152064, False, (16, 24, 24), 32, 1280, 3420, 16, (7, 15, 23, 31),
               "sam2_hiera_l", 448),
    # Qwen2.5-VL-3B ties its LM head to the embedding; here it is a tensor of its own (as in the 7B), since
    # CitrusV.from_pretrained does not yet accept a folder without the tied lm_head tensor
    "3b": Dims(2048, 36, 16, 2, 11008, 151936, False, (16, 24, 24), 32, 1280, 3420, 16, (7, 15, 23, 31),
               "sam2_hiera_l", 448),
    # the release's vocabulary (so the LM head weighs as in the release), a narrow stack, the tiny SAM 2
    "small": Dims(512, 4, 8, 2, 1408, 152064, False, (8, 12, 12), 4, 256, 684, 4, (3,), "tiny", 224),
    # the tiny preset's sizes (citrus_v.recipes.presets)
    "tiny": Dims(128, 4, 4, 2, 512, None, False, (4, 6, 6), 4, 96, 192, 4, (3,), "tiny", 224),
}


# --- the model's configuration ----------------------------------------------------------------------------------
def tokenizers() -> tuple[Any, Any]:
    """(tokenizer as the upstream files hold it, without [SEG]; the same with the Citrus-V tokens added)."""
    from citrus_v.processing.tokenizer_builder import build_tokenizer

    return build_tokenizer(citrus_tokens=False), build_tokenizer()


def mllm_config(dims: Dims, tokenizer: Any) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL configuration of ``dims``, token ids read from ``tokenizer`` (as the tiny preset does)."""
    from citrus_v.tokens import ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

    ids = tokenizer.convert_tokens_to_ids
    vocab = dims.vocab or (len(tokenizer) + 63) // 64 * 64
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=dims.text_hidden,
            intermediate_size=dims.intermediate,
            num_hidden_layers=dims.text_layers,
            num_attention_heads=dims.heads,
            num_key_value_heads=dims.kv_heads,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": list(dims.mrope_section)},
            rope_theta=1e6,
            bos_token_id=ids(ENDOFTEXT),
            eos_token_id=ids(IM_END),
            pad_token_id=ids(ENDOFTEXT),
            tie_word_embeddings=dims.tie_word_embeddings,
        ),
        vision_config=dict(
            depth=dims.vision_depth,
            hidden_size=dims.vision_hidden,
            intermediate_size=dims.vision_intermediate,
            num_heads=dims.vision_heads,
            out_hidden_size=dims.text_hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=list(dims.fullatt_blocks),
        ),
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        tie_word_embeddings=dims.tie_word_embeddings,
    )


def sam2_config(dims: Dims) -> Sam2Config:
    from citrus_v.checkpoint_layout.sam2_variants import VARIANTS
    from citrus_v.recipes.presets import tiny_sam2_config

    return tiny_sam2_config() if dims.sam2 == "tiny" else VARIANTS[dims.sam2].config()


def citrus_config(dims: Dims) -> Any:
    """The CitrusV configuration of ``dims``; ``[SEG]`` is the first id after the tokenizer's built-in tokens."""
    from citrus_v.modeling import CitrusVConfig
    from citrus_v.tokens import SEG_TOKEN

    plain, sized = tokenizers()
    seg = sized.convert_tokens_to_ids(SEG_TOKEN)
    assert seg == len(plain), "the upstream loader adds [SEG] right after the built-in tokens"
    return CitrusVConfig.from_parts(mllm_config(dims, sized), sam2_config(dims), seg_token_idx=seg)


def meta_skeleton(dims: Dims) -> torch.nn.Module:
    """The model on the meta device: its tensor names and shapes, no memory."""
    from citrus_v.modeling import CitrusV

    with torch.device("meta"):
        return CitrusV(citrus_config(dims))


def video_tensor_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
    """Meta's SAM 2 video/memory tensors the release carries (unused for single images), by Meta name."""
    from tests.sam2_original_names import OriginalSam2, tiny_original_sam2, video_modules

    return video_modules(tiny_original_sam2() if dims.sam2 == "tiny" else OriginalSam2())


def weight_bytes(skeleton: torch.nn.Module, dims: Dims) -> int:
    """Bytes of the bf16 weights the upstream folder holds (tied tensors once, video tensors included)."""
    seen: set[int] = set()
    total = 0
    for tensor in skeleton.state_dict(keep_vars=True).values():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * 2
    return total + sum(math.prod(shape) * 2 for shape in video_tensor_shapes(dims).values())


# --- writing the folder (in a child process) --------------------------------------------------------------------
def _draw(shape: tuple[int, ...], name: str, generator: torch.Generator) -> torch.Tensor:
    """A random bf16 tensor drawn in place: norm scales 1, other vectors 0, the rest N(0, 0.02)."""
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    if len(shape) == 1 and "norm" in name and name.endswith("weight"):
        return tensor.fill_(1.0)
    if len(shape) == 1:
        return tensor.zero_()
    return tensor.normal_(0.0, 0.02, generator=generator)


def _sam_tensors(skeleton: torch.nn.Module, dims: Dims, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """SAM 2 in the released names (``grounding_encoder.sam2_model.`` + Meta's), video/memory tensors included."""
    from citrus_v.checkpoint_layout import META_PREFIX
    from citrus_v.modeling.sam2_names import POSITIONAL_COPIES, hf_to_meta

    prefix = "grounding_encoder."
    ours = {
        name[len(prefix):]: _draw(tuple(t.shape), name, generator)
        for name, t in skeleton.state_dict().items()
        if name.startswith(prefix)
    }
    ours[POSITIONAL_COPIES[1]] = ours[POSITIONAL_COPIES[0]]  # one matrix in Meta's SAM 2
    meta = hf_to_meta(ours)
    meta.update({name: _draw(shape, name, generator) for name, shape in video_tensor_shapes(dims).items()})
    return {META_PREFIX + name: tensor for name, tensor in meta.items()}


def write_folder(size: str, folder: str, max_shard_size: str, seed: int) -> dict[str, float]:
    """Write a random-weight CitrusV of ``size`` in the released upstream layout to ``folder``, shard by shard."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from citrus_v.checkpoint_layout import CONFIG_FILE, WEIGHTS_INDEX_FILE
    from citrus_v.modeling.upstream_checkpoint import upstream_config_dict

    start = time.perf_counter()
    dims, out = SIZES[size], Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    skeleton = meta_skeleton(dims)
    # the names upstream stores for mllm.* and seg_projector.* are ours; a tied LM head is stored once
    tied = {"mllm.lm_head.weight"} if dims.tie_word_embeddings else set()
    shapes = {
        name: tensor
        for name, tensor in skeleton.state_dict().items()
        if not name.startswith("grounding_encoder.") and name not in tied
    }
    sam = _sam_tensors(skeleton, dims, generator)
    entries = {**shapes, **sam}
    split = split_state_dict_into_shards_factory(
        entries,
        get_storage_size=lambda t: t.numel() * 2,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    count = len(split.filename_to_tensors)
    weight_map: dict[str, str] = {}
    for number, names in enumerate(split.filename_to_tensors.values(), start=1):
        shard = f"model-{number:05d}-of-{count:05d}.safetensors"
        tensors = {n: sam[n] if n in sam else _draw(tuple(entries[n].shape), n, generator) for n in names}
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        del tensors  # one shard in memory at a time
    total = sum(t.numel() * 2 for t in entries.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / CONFIG_FILE).write_text(json.dumps(upstream_config_dict(skeleton.config, "bfloat16"), indent=2) + "\n")
    plain, _ = tokenizers()
    plain.save_pretrained(out)  # upstream's tokenizer files lack [SEG]; the loader adds it
    side = dims.image_side
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=side * side).save_pretrained(out)
    return {"bytes": float(total), "tensors": float(len(entries)), "shards": float(count),
            "seconds": time.perf_counter() - start}


def measure_bandwidth(megabytes: int) -> dict[str, float]:
    """This machine's memory bandwidth in GB/s: reading a buffer far beyond the caches (a sum), and copying it."""
    elements = megabytes * 2**20 // 4
    source = torch.ones(elements, dtype=torch.float32)
    target = torch.empty_like(source)
    reads, copies = [], []
    for _ in range(5):
        start = time.perf_counter()
        source.sum()
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        target.copy_(source)
        copies.append(time.perf_counter() - start)
    nbytes = elements * 4
    return {"read_gb_s": nbytes / min(reads) / 1e9, "copy_gb_s": 2 * nbytes / min(copies) / 1e9,
            "threads": float(torch.get_num_threads())}


# --- measuring ---------------------------------------------------------------------------------------------------
def memory_status() -> dict[str, int]:
    """This process's VmRSS, VmHWM, RssAnon and RssFile in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def available_memory() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line: cannot check the memory before building")


class StepClock(LogitsProcessor):
    """Notes the time of every generation step (logits processors run once per step, after the forward)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


class FirstForward:
    """A pre-hook on the multimodal model: when the first forward of a ``generate`` starts, and its length."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.start: float | None = None
        self.prompt_tokens = 0
        self._handle = module.register_forward_pre_hook(self._note, with_kwargs=True)

    def _note(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.start is None:
            self.start = time.perf_counter()
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.prompt_tokens = int(ids.shape[1])

    def remove(self) -> None:
        self._handle.remove()


def timed_answer(predictor: Any, image: np.ndarray, question: str, answer: str) -> dict[str, Any]:
    """One forced answer through our predictor (one generation pass): latency, prefill and decode speed."""
    from citrus_v.infer import Request

    ids = predictor.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    clock, first = StepClock(), FirstForward(predictor.model.mllm)
    start = time.perf_counter()
    try:
        result = predictor.predict_batch(
            [Request([image], question)], logits_processor=LogitsProcessorList([ForceText(ids), clock])
        )[0]
    finally:
        first.remove()
    latency = time.perf_counter() - start
    prefill = clock.times[0] - first.start
    steps = len(clock.times) - 1
    decode = (clock.times[-1] - clock.times[0]) / steps if steps else float("nan")
    return {"prediction": result, "latency_s": latency, "prompt_tokens": first.prompt_tokens,
            "prefill_s": prefill, "prefill_tok_s": first.prompt_tokens / prefill,
            "decode_tokens": steps, "decode_tok_s": 1.0 / decode if steps else float("nan")}


def matvec_bound(model: torch.nn.Module, repeats: int = 5) -> dict[str, float]:
    """What this CPU's matrix-vector kernel allows a decode step: every linear layer of one decoder layer and
    the LM head, timed alone on the model's own weights at batch 1 (best of ``repeats``), summed over the layers.

    Decoding reads each weight once per token through these kernels; the time they take alone, not the memory
    bandwidth, is what a decode step can at best reach on a CPU whose bf16 kernels are compute-bound.
    """
    language = model.mllm.model.language_model
    layer_linears = [m for m in language.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    head = model.mllm.get_output_embeddings()

    def best(linear: torch.nn.Linear) -> float:
        x = torch.randn(1, linear.in_features, dtype=linear.weight.dtype)
        times = []
        with torch.no_grad():
            for _ in range(repeats + 1):
                start = time.perf_counter()
                linear(x)
                times.append(time.perf_counter() - start)
        return min(times[1:])

    layer_s = sum(best(linear) for linear in layer_linears)
    head_s = best(head)
    token_s = layer_s * len(language.layers) + head_s
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layer_linears) * len(language.layers)
    weight_bytes += head.weight.numel() * head.weight.element_size()
    return {"tokens_s": 1.0 / token_s, "gb_s": weight_bytes / token_s / 1e9}


def language_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: the decoder layers, the final norm and the LM head."""
    seen: set[int] = set()
    total = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(LANGUAGE_PREFIXES) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


class ProjectorTap:
    """A forward hook on the seg projector: the ``[SEG]`` prompt embeddings each pass hands to SAM 2."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self._handle = model.seg_projector.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.outputs.append(output.detach().float().clone())

    def remove(self) -> None:
        self._handle.remove()


def compare_passes(predictor: Any, image: np.ndarray, repeats: int) -> dict[str, Any]:
    """Our single pass against upstream's two (generate, then a full forward for the [SEG] state), alternated.

    Both ways must hand SAM 2 the same ``[SEG]`` embedding: their relative difference is reported (bf16
    rounding differs between the cached decode step and the full forward; the masks are not compared, since
    the two ways bring them to full size differently).
    """
    from citrus_v.infer import Request

    single, double, difference = [], [], []
    tap = ProjectorTap(predictor.model)
    try:
        for _ in range(repeats):
            tap.outputs.clear()
            ours = timed_answer(predictor, image, SEG_QUESTION, SEG_ANSWER)
            single.append(ours["latency_s"])
            start = time.perf_counter()
            reference = _two_pass(predictor, Request([image], SEG_QUESTION), SEG_ANSWER)
            double.append(time.perf_counter() - start)
            if len(ours["prediction"].masks) != 1 or len(reference) != 1 or len(tap.outputs) != 2:
                raise RuntimeError(
                    f"expected one mask and one [SEG] embedding from each way, got {len(ours['prediction'].masks)} "
                    f"and {len(reference)} masks, {len(tap.outputs)} embeddings"
                )
            a, b = tap.outputs
            difference.append(float((a - b).norm() / b.norm().clamp_min(1e-12)))
    finally:
        tap.remove()
    return {"single_s": statistics.median(single), "two_pass_s": statistics.median(double),
            "difference": max(difference), "last": ours}


# --- the run -----------------------------------------------------------------------------------------------------
def check_room(size: str, need_bytes: int, work_dir: Path, weights: int) -> None:
    """Refuse before building when memory or disk would not hold the model (the figures would be swap or OOM)."""
    available = available_memory()
    if available < need_bytes:
        smaller = "3b" if size == "7b" else "small"
        sys.exit(
            f"--size {size}: needs {need_bytes / GIB:.1f} GiB of memory, {available / GIB:.1f} GiB available "
            f"(MemAvailable; {(need_bytes - available) / GIB:.1f} GiB short): run --size {smaller}, or free memory"
        )
    free_disk = shutil.disk_usage(work_dir).free
    if free_disk < weights * 1.05:
        sys.exit(
            f"--work_dir {work_dir}: the weights take {weights / GIB:.1f} GiB, {free_disk / GIB:.1f} GiB free on "
            "that disk. Fix: give a --work_dir on a disk with room"
        )


def run_questions(folder: Path, dims: Dims, warmup: int, repeats: int) -> dict[str, Any]:
    """Load the folder, then the box question, the warm-up and the timed segmentation answers."""
    from citrus_v.data.synth import make_phantom
    from citrus_v.infer import CitrusVPredictor
    from citrus_v.modeling import CitrusV
    from citrus_v.processing.processor import CitrusVProcessor

    before = memory_status()
    start = time.perf_counter()
    model = CitrusV.from_pretrained(folder).eval()
    model_s = time.perf_counter() - start
    predictor = CitrusVPredictor(model, CitrusVProcessor.from_pretrained(folder))
    load_s = time.perf_counter() - start
    loaded = memory_status()
    image = make_phantom(np.random.default_rng(0), size=dims.image_side).image
    box = timed_answer(predictor, image, BOX_QUESTION, BOX_ANSWER)  # first use: the weights are paged in
    if len(box["prediction"].boxes) != 1:
        raise RuntimeError(f"the forced box answer gave {len(box['prediction'].boxes)} boxes, expected 1")
    for _ in range(warmup):
        timed_answer(predictor, image, SEG_QUESTION, SEG_ANSWER)
    passes = compare_passes(predictor, image, repeats)
    kernels = matvec_bound(model)
    return {
        "matvec": kernels,
        "model_load_s": model_s, "load_s": load_s, "dtype": str(next(model.parameters()).dtype),
        "rss_before": before, "rss_loaded": loaded, "rss_end": memory_status(),
        "box": box, "passes": passes, "decode_bytes": language_bytes_per_token(model),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def figures(size: str, written: dict, bandwidth: dict, run: dict) -> list[tuple[str, float, str, str]]:
    """(measure, value, unit, target) rows; value NaN where not measured."""
    weights = written["bytes"]
    peak = run["rss_end"]["VmHWM"]
    growth = peak - run["rss_before"]["VmRSS"]
    bound = bandwidth["read_gb_s"] * 1e9 / run["decode_bytes"]
    box, seg = run["box"], run["passes"]["last"]
    decode = box["decode_tok_s"]  # the longer answer: the steadier decode figure
    ratio = run["passes"]["single_s"] / run["passes"]["two_pass_s"]
    return [
        ("weights (bf16, upstream layout)", weights / GIB, "GiB", ""),
        ("write the folder (random weights)", written["seconds"], "s", ""),
        ("CitrusV.from_pretrained", run["model_load_s"], "s", ""),
        ("load with processor and predictor", run["load_s"], "s", ""),
        ("first answer (box, weights paged in)", box["latency_s"], "s", ""),
        ("peak resident memory", peak / GIB, "GiB", ""),
        ("peak resident / weights", peak / weights, "x", "<= 1.25"),
        ("peak growth over the imports / weights", growth / weights, "x", "<= 1.25"),
        ("prefill (vision + prompt)", seg["prefill_tok_s"], "tokens/s", ""),
        ("prompt tokens", float(seg["prompt_tokens"]), "tokens", ""),
        ("decode (box answer)", decode, "tokens/s", ""),
        ("decode (segmentation answer)", seg["decode_tok_s"], "tokens/s", ""),
        ("decode steps timed (box, segmentation)", float(box["decode_tokens"]), f"+ {seg['decode_tokens']} steps", ""),
        ("read bandwidth", bandwidth["read_gb_s"], "GB/s", ""),
        ("decode bound (bandwidth / LM bytes per token)", bound, "tokens/s", ""),
        ("decode / bound", decode / bound, "x", ">= 0.50"),
        ("matrix-vector kernels alone (one layer's linears x layers + LM head)", run["matvec"]["tokens_s"],
         "tokens/s", ""),
        ("matrix-vector kernels' weight rate", run["matvec"]["gb_s"], "GB/s", ""),
        ("decode / matrix-vector kernels alone", decode / run["matvec"]["tokens_s"], "x", ""),
        ("segmentation answer, our single pass", run["passes"]["single_s"], "s", ""),
        ("segmentation answer, upstream's two passes", run["passes"]["two_pass_s"], "s", ""),
        ("single / two passes", ratio, "x", "<= 0.60"),
        ("single pass: prefill", seg["prefill_s"], "s", ""),
        ("single pass: decode steps", seg["decode_tokens"] / seg["decode_tok_s"], "s", ""),
        ("single pass: the rest (encoding, SAM 2, masks)",
         seg["latency_s"] - seg["prefill_s"] - seg["decode_tokens"] / seg["decode_tok_s"], "s", ""),
        ("[SEG] embedding difference, single vs two passes", run["passes"]["difference"], "relative", ""),
    ]


def verdict(value: float, target: str) -> str:
    if not target or not math.isfinite(value):
        return ""
    op, bound = target.split()
    return "met" if (value <= float(bound) if op == "<=" else value >= float(bound)) else "not met"


def print_table(size: str, rows: list[tuple[str, float, str, str]], bandwidth: dict) -> None:
    print(
        f"\nreal_scale --size {size}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
        f"{available_memory() / GIB:.1f} GiB available now, torch {torch.__version__}, "
        f"{int(bandwidth['threads'])} threads\n"
    )
    print("| measure | value | unit | target | |")
    print("|---|---|---|---|---|")
    for measure, value, unit, target in rows:
        shown = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        print(f"| {measure} | {shown} | {unit} | {target} | {verdict(value, target)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b", help="model dimensions to build")
    parser.add_argument("--work_dir", help="where the weights are written (a temporary folder when omitted)")
    parser.add_argument("--keep", action="store_true", help="keep the written model folder")
    parser.add_argument(
        "--warmup", type=int, default=0,
        help="untimed segmentation answers before timing (the box question already pages in the language model "
        "and the vision tower)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed single-pass/two-pass pairs (median)")
    parser.add_argument("--max_shard_size", default="5GB", help="safetensors shard size, as the release")
    parser.add_argument("--bandwidth_mb", type=int, default=1024, help="buffer for the bandwidth measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dims = SIZES[args.size]
    weights = weight_bytes(meta_skeleton(dims), dims)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="citrus-real-scale-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    # the weights once, the imports, activations and logits: a 15% margin, at least 2 GiB
    check_room(args.size, int(weights + max(2 * GIB, 0.15 * weights)), work_dir, weights)
    folder = work_dir / f"citrus-v-{args.size}-upstream"
    # a terminated run still removes its weights (the finally below)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        # children draw and write the weights and measure the bandwidth: this process's peak is the model's
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            bandwidth = pool.apply(measure_bandwidth, (args.bandwidth_mb,))
            written = pool.apply(write_folder, (args.size, str(folder), args.max_shard_size, args.seed))
        print(f"wrote {folder}: {written['tensors']:.0f} tensors in {written['shards']:.0f} shards, "
              f"{written['bytes'] / GIB:.2f} GiB, {written['seconds']:.1f} s", flush=True)
        run = run_questions(folder, dims, args.warmup, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            if not args.work_dir:
                shutil.rmtree(work_dir, ignore_errors=True)
    rows = figures(args.size, written, bandwidth, run)
    print_table(args.size, rows, bandwidth)
    if args.json:
        keys = ("measure", "value", "unit", "target")
        data = {"size": args.size, "rows": [dict(zip(keys, row, strict=True)) for row in rows],
                "bandwidth": bandwidth, "written": written, "parameters": run["parameters"], "dtype": run["dtype"]}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
