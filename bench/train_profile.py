"""Where a training step of the side-by-side model goes, and how close its largest matrix products run to this
machine's matrix-product peak.

Profiles a few optimizer steps of ``citrus-v sft``'s work on the tiny Qwen2.5-VL that ``bench/peer_swift.py``
builds (its ``work`` folder: run that script first, or point ``--model`` and ``--dataset`` elsewhere): the batches
as our collator makes them (``--packing`` as the flag), the model's forward with logits only where a label is,
backward and the fused AdamW step the trainer uses. Prints time per step by kind of work and the LM head's
matrix products in GFLOP/s against one large float32 product on the same threads.

    python bench/train_profile.py [--steps 5] [--packing true] [--batch 4]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".peer" / "work"


def peak_gflops(side: int = 2048, repeats: int = 5) -> float:
    """The best of ``repeats`` float32 ``side``-cubed matrix products, in GFLOP/s."""
    import torch

    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * side**3 / best / 1e9


def kind_of(name: str, shapes: list, vocab: int) -> str:
    """The kind of work a profiled operator is."""
    if name in ("aten::mm", "aten::addmm") and any(vocab in shape for shape in shapes if shape):
        return "LM head matrix products"
    if "log_softmax" in name or "nll_loss" in name or "cross_entropy" in name:
        return "LM loss (log-softmax, forward and backward)"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear"):
        return "other matrix products"
    if "scaled_dot_product" in name:
        return "attention"
    if "adamw" in name or "zero_grad" in name:
        return "optimizer and zero_grad"
    if name == "aten::fill_":
        return "fills (gradient buffers)"
    if "conv" in name:
        return "patch embedding"
    return "everything else"


def lm_head_flops(events: list, vocab: int) -> tuple[float, float]:
    """FLOPs and self seconds of the profiled matrix products with the vocabulary as one of their sides."""
    flops = seconds = 0.0
    for event in events:
        shapes = [s for s in event.input_shapes if s]
        if event.key == "aten::mm" and len(shapes) == 2 and any(vocab in s for s in shapes):
            (m, k), (_, n) = shapes
            flops += 2.0 * m * k * n * event.count
            seconds += event.self_cpu_time_total / 1e6
    return flops, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=WORK / "citrus_v_tiny")
    parser.add_argument("--dataset", type=Path, default=WORK / "data" / "train.jsonl")
    parser.add_argument("--steps", type=int, default=5, help="profiled optimizer steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--packing", choices=("true", "false"), default="true")
    args = parser.parse_args()
    for path in (args.model, args.dataset):
        if not path.exists():
            raise SystemExit(f"{path} does not exist. Fix: run python bench/peer_swift.py once (it writes the model "
                             "and data there), or pass --model and --dataset")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.data import DataLoader

    from citrus_v.modeling.modeling_citrus_v import CitrusV
    from citrus_v.processing.processor import CitrusVProcessor
    from citrus_v.train.arguments import SftArguments
    from citrus_v.train.data import BOOKKEEPING_KEYS, build_train_dataset

    processor = CitrusVProcessor.from_pretrained(args.model)
    sft = SftArguments(model=str(args.model), dataset=[str(args.dataset)], max_length=args.max_length,
                       packing=args.packing == "true")
    data, collator, _ = build_train_dataset(sft, processor)
    loader = DataLoader(data, batch_size=args.batch, shuffle=False, collate_fn=collator)
    batches = [batch for _, batch in zip(range(args.steps + 1), loader, strict=False)]
    model = CitrusV.from_pretrained(args.model, torch_dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    vocab = model.config.text_config.vocab_size

    def step(batch: dict) -> None:
        # as the trainer calls it: the collator's bookkeeping aside, logits only where a label is
        out = model(**{k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}, label_logits_only=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in batches[1:]:
            step(batch)
    wall = (time.perf_counter() - start) / (len(batches) - 1)
    events = prof.key_averages(group_by_input_shape=True)
    per_kind: dict[str, float] = defaultdict(float)
    for event in events:
        per_kind[kind_of(event.key, list(event.input_shapes or []), vocab)] += event.self_cpu_time_total / 1e6
    total = sum(per_kind.values())
    steps = len(batches) - 1
    labels = sum(int((b["labels"] != -100).sum()) for b in batches[1:]) / steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; packing {args.packing}, batch {args.batch}, "
          f"{steps} steps; {labels:.0f} label tokens per step, vocabulary {vocab:,}")
    print(f"wall per step (under the profiler): {wall * 1000:.0f} ms")
    print("| work | ms per step | share |\n|---|---|---|")
    for kind, seconds in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {seconds / steps * 1000:.0f} | {seconds / total:.0%} |")
    flops, seconds = lm_head_flops(events, vocab)
    peak = peak_gflops()
    achieved = flops / seconds / 1e9 if seconds else float("nan")
    print(f"LM head matrix products: {achieved:.0f} GFLOP/s; one 2048^3 float32 product: {peak:.0f} GFLOP/s "
          f"({achieved / peak:.0%} of it)")


if __name__ == "__main__":
    main()
