"""One stage-3 training step at the released dimensions on a GPU, and the serving throughput of the same model.

A prepared script for a GPU machine (``--device cpu --size tiny`` runs it on a CPU in seconds, to prove it works):

1. **Model**: a random-weight bf16 CitrusV with the release's dimensions (Qwen2.5-VL-7B + SAM 2 Hiera-L, as
   ``bench/real_scale.py`` defines them), built directly on the device. All decoder layers when the training
   step fits in the device's free memory, else as many as fit (said so); ``--layers`` sets the number.
2. **Step**: stage 3 as upstream runs it: everything trains (``FreezePlan(stage=3)``, HookGrad 0.001), flash
   attention (sdpa when flash-attn is not installed, said so), gradient checkpointing, one packed row of
   ``--max_length`` 12288 tokens (phantom scans: one segmentation sample, the rest box and yes/no questions,
   through the project's processor and packing collator), AdamW (lr 1e-5, betas 0.9/0.999, weight decay 0.1,
   states in the parameters' bf16), grad clip 1.0. The first step warms up; the next ones are timed.
   Reported: tokens/s (real tokens of the pack) and model FLOPs utilisation, 6 x parameters x tokens/s over the
   device's bf16 peak (a table of known peaks by device name, or ``--peak_tflops``). Parameters count every
   weight but the input embedding table (a lookup, no matmul); attention FLOPs and the recompute of
   gradient checkpointing are not counted (model FLOPs, not hardware FLOPs).
3. **Serving**: the same model behind the ``citrus-v deploy`` app (``create_app`` with the deploy defaults, in
   this process), clients at concurrency 1 and 8 for ``--serve_seconds`` each, every answer forced to the same
   text with one ``[SEG]`` (``bench/serve_load.py``'s client and forced predictor).

    python bench/gpu_step.py                                   # 7B on the GPU, max_length 12288
    python bench/gpu_step.py --device cpu --size tiny --max_length 1024 --serve_seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import statistics
import threading
import time
from typing import Any

import numpy as np
import torch

# the scripts next to this one (bench/ is the script's folder on sys.path)
from real_scale import SIZES, Dims, citrus_config, meta_skeleton, tokenizers
from serve_load import LOAD_ANSWER, _clients, _forced_predictor

GIB = 2**30
# dense bf16 tensor-core peaks (TFLOP/s) by device name; the first name found in the device's name wins
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
# bytes per trained parameter: bf16 weight + bf16 gradient + AdamW's two bf16 states
TRAIN_BYTES_PER_PARAM = 8


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of the device called ``name``, when the table knows it."""
    for key, value in BF16_PEAK_TFLOPS:
        if key in name:
            return value
    return None


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The bf16 peak of ``device`` and where it comes from (None when unknown)."""
    if given is not None:
        return given, "--peak_tflops"
    if device.type != "cuda":
        return None, "unknown for this device: give --peak_tflops"
    name = torch.cuda.get_device_name(device)
    value = peak_for_name(name)
    return value, f"{name} (table)" if value else f"{name} is not in the table: give --peak_tflops"


def attention_implementation(device: torch.device, wanted: str) -> tuple[str, str]:
    """transformers' attention implementation for ``--attn_impl`` on ``device``, and a note when it fell back."""
    if wanted == "sdpa":
        return "sdpa", "sdpa (asked)"
    if device.type != "cuda":
        return "sdpa", "sdpa: flash attention needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "sdpa: flash-attn is not installed (pip install flash-attn), so this is not upstream's kernel"
    return "flash_attention_2", "flash_attention_2"


# --- how many decoder layers fit ----------------------------------------------------------------------------------
def fit_layers(dims: Dims, free_bytes: int, max_length: int) -> int:
    """How many decoder layers a training step of ``dims`` fits in ``free_bytes`` (at most all of them).

    Every parameter costs :data:`TRAIN_BYTES_PER_PARAM`; gradient checkpointing keeps each layer's input
    (``max_length`` x hidden, bf16) and recomputes one layer at a time (its MLP and attention activations, and
    their gradients), plus 2 GiB for the vision tower, SAM 2, the loss and the allocator; 10% of the memory is
    left free.
    """
    skeleton = meta_skeleton(dims)
    layer = sum(p.numel() for n, p in skeleton.named_parameters() if ".language_model.layers.0." in n)
    rest = sum(p.numel() for p in skeleton.parameters()) - layer * dims.text_layers
    kept = max_length * dims.text_hidden * 2
    working = max_length * (3 * dims.intermediate + 6 * dims.text_hidden) * 2 * 2 + 2 * GIB
    budget = 0.9 * free_bytes - rest * TRAIN_BYTES_PER_PARAM - working
    return max(0, min(dims.text_layers, int(budget // (layer * TRAIN_BYTES_PER_PARAM + kept))))


def layers_that_fit(dims: Dims, device: torch.device, max_length: int, wanted: int | None) -> tuple[int, str]:
    """Decoder layers to build: ``--layers``, else all when the step fits in free device memory, else what fits."""
    if wanted is not None:
        return wanted, f"{wanted} of {dims.text_layers} decoder layers (--layers)"
    if device.type != "cuda":
        return dims.text_layers, f"all {dims.text_layers} decoder layers"
    free, _ = torch.cuda.mem_get_info(device)
    fit = fit_layers(dims, free, max_length)
    if fit >= dims.text_layers:
        return dims.text_layers, f"all {dims.text_layers} decoder layers (estimated to fit in {free / GIB:.0f} GiB)"
    if fit < 1:
        raise SystemExit(f"not even one decoder layer fits in {free / GIB:.1f} GiB free on {device}: use --size 3b")
    return fit, f"{fit} of {dims.text_layers} decoder layers: all would not fit in {free / GIB:.0f} GiB free"


# --- model, processor, batch --------------------------------------------------------------------------------------
def build(dims: Dims, layers: int, device: torch.device, attn: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A random-init CitrusV built on ``device`` (no CPU copy) and its processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from citrus_v.modeling import CitrusV
    from citrus_v.processing.processor import CitrusVProcessor

    config = citrus_config(dims)
    config.text_config.num_hidden_layers = layers
    with torch.device(device):
        model = CitrusV._from_config(config, attn_implementation=attn, dtype=dtype)
    _, tokenizer = tokenizers()
    side = dims.image_side
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=side * side)
    sam = config.sam2_config().prompt_encoder_config
    processor = CitrusVProcessor(tokenizer, image_processor, sam_image_size=sam.image_size,
                                 mask_size=model.mask_size[0])
    return model, processor


def _samples(side: int, seed: int):
    """Endless phantom samples: one segmentation question first, then box and yes/no questions in turn."""
    from citrus_v.data.synth import make_phantom, segmentation_sample

    rng = np.random.default_rng(seed)
    yield segmentation_sample(make_phantom(rng, size=side), "lesion")
    for index in range(10**6):
        phantom = make_phantom(rng, size=side)
        if index % 2:
            ys, xs = np.nonzero(phantom.masks["lesion"])
            box = f'```json\n[\n{{"bbox_2d": [{xs.min()},{ys.min()},{xs.max()},{ys.max()}],"label": "lesion"}}\n]\n```'
            turn = ("Locate the lesion, output its bbox coordinates using JSON format.", box)
        else:
            turn = ("Is there a lesion in the image? Answer yes or no.", "yes")
        yield {"messages": [{"role": "user", "content": "<image>" + turn[0]},
                            {"role": "assistant", "content": turn[1]}], "images": [phantom.image]}


def packed_batch(processor: Any, side: int, max_length: int, seed: int) -> tuple[dict[str, Any], int]:
    """One packed row of at most ``max_length`` tokens, padded to it; and its count of real tokens."""
    from citrus_v.data.collator import CitrusVCollator

    chosen, total = [], 0
    for sample in _samples(side, seed):
        length = len(processor.encode_sample(sample, max_length=max_length)["input_ids"])
        if total + length > max_length:
            break
        chosen.append(sample)
        total += length
    batch = CitrusVCollator(processor, packing=True, max_length=max_length, pad_to_max_length=True)(chosen)
    if batch is None or batch["input_ids"].shape[0] != 1:
        raise RuntimeError("the samples did not pack into one row")
    return dict(batch), total


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.to(device)
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {key: move(value) for key, value in batch.items()}


# --- the training step -------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model: Any, batch: dict[str, Any], device: torch.device, steps: int, lr: float) -> list[float]:
    """``steps`` stage-3 optimizer steps on ``batch``; the seconds of each."""
    from citrus_v.train.sft import enable_checkpointing
    from citrus_v.train.stages import FreezePlan

    plan = FreezePlan(stage=3)
    plan.apply(model)
    model.config.hook_grad_factor = plan.hook_grad_factor()
    enable_checkpointing(model)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.999), weight_decay=0.1)
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        loss = model(**batch, label_logits_only=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"the loss is {float(loss)}: the step did not run as a training step")
    del optimizer
    model.eval()
    return seconds


def parameter_counts(model: Any) -> dict[str, int]:
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "flop_parameters": total - embedding}


# --- serving -----------------------------------------------------------------------------------------------------
def serve_throughput(model: Any, processor: Any, levels: list[int], seconds: float, max_tokens: int) -> list[dict]:
    """Requests/s and latency of the deploy app on ``model`` at each concurrency (forced answers, one [SEG])."""
    import uvicorn

    from citrus_v.serve.server import ServerSettings, create_app

    settings = ServerSettings(served_model_name="tiny")  # the name bench/serve_load.py's client sends
    app = create_app(_forced_predictor(model, processor, LOAD_ANSWER), settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    rows = []
    try:
        asyncio.run(_clients(url, 1, min(seconds, 2.0), max_tokens))  # warm-up
        for concurrency in levels:
            start = time.perf_counter()
            latencies = asyncio.run(_clients(url, concurrency, seconds, max_tokens))
            wall = time.perf_counter() - start
            rows.append({
                "concurrency": concurrency,
                "requests": len(latencies),
                "requests_per_s": len(latencies) / wall,
                "p50_ms": 1000 * statistics.median(latencies),
                "p95_ms": 1000 * float(np.percentile(latencies, 95)),
            })
    finally:
        server.should_exit = True
        thread.join(30)
    return rows


# --- the run -----------------------------------------------------------------------------------------------------
def report(meta: dict[str, Any], counts: dict[str, int], seconds: list[float], tokens: int, padded: int,
           peak: tuple[float | None, str], serving: list[dict]) -> list[tuple[str, str]]:
    """(measure, value) rows of the markdown table."""
    timed = seconds[1:] or seconds
    step = statistics.median(timed)
    tokens_per_s = tokens / step
    flops = 6 * counts["flop_parameters"] * tokens_per_s
    mfu = flops / (peak[0] * 1e12) if peak[0] else float("nan")
    rows = [
        ("device", meta["device"]),
        ("model", f"{meta['size']}: {meta['layers']}"),
        ("attention", meta["attention"]),
        ("parameters (trainable)", f"{counts['total'] / 1e9:.3f} B ({counts['trainable'] / 1e9:.3f} B)"),
        ("packed row", f"{tokens} real tokens of {padded} (max_length), {meta['samples']} samples"),
        ("step time (median of timed steps)", f"{step:.3f} s ({len(timed)} timed, first {seconds[0]:.2f} s)"),
        ("training tokens/s", f"{tokens_per_s:.1f}"),
        ("model FLOPs/s (6 x parameters x tokens/s)", f"{flops / 1e12:.3f} TFLOP/s"),
        ("bf16 peak", f"{peak[0]} TFLOP/s, {peak[1]}" if peak[0] else peak[1]),
        ("MFU", f"{mfu:.3f}" if math.isfinite(mfu) else "n/a"),
        ("peak device memory", meta["peak_memory"]),
    ]
    for row in serving:
        rows.append((
            f"deploy, concurrency {row['concurrency']}",
            f"{row['requests_per_s']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms "
            f"({row['requests']} requests)",
        ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b", help="model dimensions (bench/real_scale.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--max_length", type=int, default=12288, help="tokens of the packed row, as upstream")
    parser.add_argument("--attn_impl", choices=("flash_attn", "sdpa"), default="flash_attn", help="attention kernel")
    parser.add_argument("--layers", type=int, help="decoder layers to build (all that fit when omitted)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps; the first is not timed")
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="AdamW learning rate (upstream stage 3)")
    parser.add_argument("--peak_tflops", type=float, help="the device's bf16 peak, when not in the table")
    parser.add_argument("--serve_seconds", type=float, default=20.0, help="seconds of load per concurrency")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client counts for serving")
    parser.add_argument("--max_tokens", type=int, default=32, help="answer length cap of the serving requests")
    parser.add_argument("--skip_serve", action="store_true", help="measure the training step only")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="weights' dtype (upstream trains in bf16; float32 is faster on CPUs without bf16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the phantoms")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    device, dims = torch.device(args.device), SIZES[args.size]
    layers, layers_note = layers_that_fit(dims, device, args.max_length, args.layers)
    attn, attn_note = attention_implementation(device, args.attn_impl)
    print(f"{args.size}: {layers_note}; attention {attn_note}; {args.dtype}", flush=True)
    # the seed draws the weights; the process's random state is left as it was
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(args.seed)
        model, processor = build(dims, layers, device, attn, getattr(torch, args.dtype))
    batch, tokens = packed_batch(processor, dims.image_side, args.max_length, args.seed)
    samples = int((batch["input_ids"] == processor.template.vision_start_id).sum())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = train_steps(model, to_device(batch, device), device, args.steps, args.learning_rate)
    except torch.OutOfMemoryError as err:
        raise SystemExit(
            f"out of memory in the training step with {layers} decoder layers ({err}). Fix: rerun with fewer "
            f"--layers (e.g. {max(1, layers - 4)}) or a smaller --max_length"
        ) from err
    peak_memory = (f"{torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB allocated" if device.type == "cuda"
                   else "n/a (CPU)")
    counts = parameter_counts(model)
    serving = []
    if not args.skip_serve:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        levels = [int(c) for c in args.concurrency.split(",") if c]
        serving = serve_throughput(model, processor, levels, args.serve_seconds, args.max_tokens)
    meta = {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "size": args.size, "layers": layers_note, "attention": attn_note, "samples": samples,
            "peak_memory": peak_memory}
    rows = report(meta, counts, seconds, tokens, args.max_length, peak_tflops(device, args.peak_tflops), serving)
    print(f"\ngpu_step --size {args.size} --device {args.device} --max_length {args.max_length}, "
          f"torch {torch.__version__}\n")
    print("| measure | value |")
    print("|---|---|")
    for measure, value in rows:
        print(f"| {measure} | {value} |")
    if args.json:
        data = {"rows": dict(rows), "step_seconds": seconds, "tokens": tokens, "parameters": counts,
                "serving": serving}
        with open(args.json, "w") as handle:
            json.dump(data, handle, indent=2)


if __name__ == "__main__":
    main()
