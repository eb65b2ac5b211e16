"""Training throughput of the tiny preset on this machine, and a paper estimate for the 8B recipe.

Runs ``citrus-v sft`` (fp32, CPU) on a synthetic dataset with 1 and 2 processes, with and without
``--packing`` when available, and prints samples/s and tokens/s from the run's own logs. Then prints
FLOPs per token and memory per GPU under ZeRO-2/3 for upstream's 8B stage-3 recipe.

    python bench/train_throughput.py [--steps 30] [--rows 96]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_dataset(folder: Path, rows: int) -> Path:
    from test_train import _write_dataset  # the same phantom rows the tests train on

    return _write_dataset(folder, rows)


def run(model: Path, dataset: Path, out: Path, steps: int, nproc: int, packing: bool) -> dict:
    command = [
        sys.executable, "-m", "citrus_v.cli", "sft", "--model", str(model), "--dataset", str(dataset),
        "--stage", "3", "--max_steps", str(steps), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-4", "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no",
        "--logging_steps", "5", "--ddp_find_unused_parameters", "true",
    ]
    if packing:
        command += ["--packing", "true", "--max_length", "2048"]
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    steady = [r for r in records if "samples_per_second" in r][1:]  # skip the first (warm-up) window
    final = next(r for r in records if "train_runtime" in r)
    samples = sum(r["samples_per_second"] for r in steady) / max(len(steady), 1)
    tokens = sum(r["tokens_per_second"] for r in steady) / max(len(steady), 1)
    return {"samples/s": round(samples, 2), "tokens/s": round(tokens, 1), "runtime_s": final["train_runtime"]}


def paper_estimate() -> list[str]:
    """FLOPs per token and per-GPU memory for Qwen2.5-VL-7B + SAM 2-L, stage 3, 8 GPUs, ZeRO-2/3."""
    hidden, layers, inter, vocab, kv_heads, heads = 3584, 28, 18944, 152064, 4, 28
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * head_dim * kv_heads * 2  # q, o + k, v
    mlp = 3 * hidden * inter
    llm = layers * (attn + mlp) + 2 * vocab * hidden
    vision = 32 * (4 * 1280 * 1280 + 2 * 1280 * 3420 * 1.5) + 1280 * 4 * 3584 + 3584 * 3584
    sam = 224e6
    total = llm + vision + sam
    seq = 12288
    flops_token = 6 * llm + 12 * layers * hidden * seq  # matmuls fwd+bwd, plus causal attention (~half of 2·L·d·s·2·3)
    gpus = 8
    bf16, fp32_states = 2, 12  # bf16 weights + grads; fp32 master + Adam m, v
    zero2 = total * bf16 + (total * bf16 + total * fp32_states) / gpus
    zero3 = total * (bf16 + bf16 + fp32_states) / gpus
    # activations with gradient checkpointing: one hidden state per layer per token kept, bf16
    activations = layers * seq * hidden * bf16 + seq * vocab * 4  # + fp32 logits for the loss
    return [
        f"parameters: LLM {llm / 1e9:.2f} B, vision {vision / 1e9:.2f} B, SAM 2-L {sam / 1e9:.2f} B, "
        f"total {total / 1e9:.2f} B",
        f"training FLOPs per token at max_length {seq}: {flops_token / 1e9:.1f} GFLOP",
        f"memory per GPU (8 GPUs): ZeRO-2 {zero2 / 2**30:.1f} GiB, ZeRO-3 {zero3 / 2**30:.1f} GiB of states, "
        f"+ ~{activations / 2**30:.1f} GiB activations per 12k-token sample with gradient checkpointing",
        f"an 8-GPU node at 40% of 989 TFLOP/s (H100 bf16) trains ~{8 * 0.4 * 989e12 / flops_token:,.0f} tokens/s",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = tmp_path / "tiny"
        subprocess.run([sys.executable, "-m", "citrus_v.cli", "build", "--preset", "tiny", "--out", str(model)],
                       check=True, capture_output=True)
        dataset = make_dataset(tmp_path / "data", args.rows)
        print(f"tiny preset, fp32, {os.cpu_count()} CPU cores, batch 4 per process, {args.steps} steps")
        print(f"{'processes':>9} {'packing':>8} {'samples/s':>10} {'tokens/s':>10} {'runtime s':>10}")
        for nproc in (1, 2):
            for packing in (False, True):
                result = run(model, dataset, tmp_path / f"run{nproc}{packing}", args.steps, nproc, packing)
                if "error" in result:
                    print(f"{nproc:>9} {str(packing):>8}  error: {result['error']}")
                    continue
                print(f"{nproc:>9} {str(packing):>8} {result['samples/s']:>10} {result['tokens/s']:>10} "
                      f"{result['runtime_s']:>10}")
    print("\nPaper estimate, upstream 8B stage-3 recipe (8 GPUs, batch 1 x accumulation 8, max_length 12288):")
    for line in paper_estimate():
        print("  " + line)


if __name__ == "__main__":
    main()
