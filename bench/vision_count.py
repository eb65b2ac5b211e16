"""How well can the tiny preset's vision tower count lesions on its own?

Trains a fresh Qwen2.5-VL vision tower (the tiny preset's, with any of its config fields overridden) and a
fresh :class:`~citrus_v.modeling.lesion_count.LesionCountHead` on nothing but the lesion-count targets of a
corpus's scans (``citrus-v data synth``), then reads the count (the head's cells summed and rounded) on
another corpus split. It tells in minutes whether a tower or a training signal can count better, before a
base is built with it (BENCHMARKS.md, demo quality).

    python bench/vision_count.py --train CORPUS [--val CORPUS --val_split val] [--steps 1500]
        [--vision depth=6 hidden_size=128 ...] [--count_weight 0.25]

Each scan image counts once (the first row naming it); images without ``lesion_points`` are left out and
counted.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from citrus_v.data.medical_io import read_image
from citrus_v.data.rows import SkipCounter, iter_rows
from citrus_v.modeling.lesion_count import LesionCountHead
from citrus_v.presets import tiny_image_processor, tiny_mllm_config
from citrus_v.processing.images import lesion_count_target
from citrus_v.processing.tokenizer_builder import build_tokenizer


def scans(corpus: Path, split: str) -> tuple[dict[str, list[list[float]]], int]:
    """``{image reference: lesion centres}`` of one split, and how many of its image rows had no centres.

    Bad lines and rows are skipped, counted and named (file and line), as training would skip them."""
    path = corpus / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such split file; write a corpus with `citrus-v data synth --out {corpus}`")
    found: dict[str, list[list[float]]] = {}
    without = 0
    skips = SkipCounter()
    for record in iter_rows([path], skips):
        row = record.row
        if not row.get("images"):
            continue
        if "lesion_points" not in row:
            without += 1
        elif row["images"][0] not in found:
            found[row["images"][0]] = row["lesion_points"]
    if skips.total:
        print(f"{path}: {skips.summary()}; first: {skips.issues[0]}")
    return found, without


def encode(corpus: Path, images: dict[str, list[list[float]]], processor, merge: int, label: str):
    """Pixel patches (fp16, to keep thousands of scans in memory), count targets and counts of ``images``."""
    pixels, targets, counts = [], [], []
    grid = None
    for reference, points in tqdm(images.items(), desc=f"reading {label}", unit="image"):
        image = read_image(reference, base_dir=corpus).convert("RGB")
        batch = processor(images=[image], return_tensors="pt")
        if grid is None:
            grid = batch["image_grid_thw"][0].tolist()
        elif batch["image_grid_thw"][0].tolist() != grid:
            raise SystemExit(f"{corpus / reference}: a {image.size} image; every scan must have the same size")
        pixels.append(batch["pixel_values"].half())
        cells = (grid[1] // merge, grid[2] // merge)  # the merged-token grid, as the processor builds targets
        targets.append(lesion_count_target(points, image.size, cells))
        counts.append(len(points))
    return torch.stack(pixels), torch.stack(targets), torch.tensor(counts), grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="corpus folder whose train split trains")
    parser.add_argument("--val", type=Path, help="corpus folder to read on (default: --train)")
    parser.add_argument("--val_split", default="val")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--count_weight", type=float, default=0.25, help="LesionCountHead's count_weight")
    parser.add_argument("--vision", nargs="*", default=[], help="vision_config overrides, key=JSON value")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    vision = tiny_mllm_config(build_tokenizer()).vision_config
    for item in args.vision:
        key, _, value = item.partition("=")
        if not hasattr(vision, key):
            raise SystemExit(f"--vision {item}: the vision config has no field {key!r}")
        setattr(vision, key, json.loads(value))
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision)
    head = LesionCountHead(vision.out_hidden_size, count_weight=args.count_weight)
    processor = tiny_image_processor()

    train_images, train_without = scans(args.train, "train")
    val_images, val_without = scans(args.val or args.train, args.val_split)
    merge = vision.spatial_merge_size
    x_train, t_train, _, grid = encode(args.train, train_images, processor, merge, "train")
    x_val, _, n_val, val_grid = encode(args.val or args.train, val_images, processor, merge, args.val_split)
    if val_grid != grid:
        raise SystemExit(f"the scans to read give a {val_grid} patch grid, the training ones {grid}: use one size")
    tokens = grid[1] * grid[2] // merge**2
    parameters = [*tower.parameters(), *head.parameters()]
    print(
        f"tower: depth {vision.depth}, width {vision.hidden_size}, full attention in {vision.fullatt_block_indexes}, "
        f"{sum(p.numel() for p in parameters):,} parameters with the head; {len(x_train)} training scans, "
        f"{len(x_val)} to read (image rows without lesion_points, such as lab reports, left out: "
        f"{train_without} train, {val_without} read); "
        f"counts to read: {dict(sorted(Counter(n_val.tolist()).items()))}"
    )

    def image_tokens(pixels: torch.Tensor) -> torch.Tensor:
        flat = pixels.float().reshape(-1, pixels.shape[-1])
        out = tower(flat, grid_thw=torch.tensor([grid] * len(pixels))).pooler_output
        return out.reshape(len(pixels), tokens, -1)

    def read() -> torch.Tensor:
        tower.eval()
        with torch.no_grad():
            counts = torch.cat([torch.sigmoid(head(image_tokens(x_val[i : i + 64]))).sum(-1)
                                for i in range(0, len(x_val), 64)])
        tower.train()
        return counts.round()

    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.01)
    started = time.monotonic()
    report = max(1, args.steps // 5)
    for step in range(1, args.steps + 1):
        scale = min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * scale
        chosen = torch.randint(0, len(x_train), (args.batch_size,))
        found = image_tokens(x_train[chosen])
        loss = head.loss(found.reshape(-1, found.shape[-1]), t_train[chosen].reshape(-1), [tokens] * len(chosen))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % report == 0 or step == args.steps:
            right = read() == n_val
            print(f"step {step}: loss {loss.item():.3f}, count accuracy {right.float().mean():.3f} "
                  f"({int(right.sum())}/{len(right)}), {(time.monotonic() - started) / step:.3f} s/step", flush=True)
    right = read() == n_val
    for count in sorted(set(n_val.tolist())):
        chosen = n_val == count
        print(f"  {count} lesion(s): {right[chosen].float().mean():.3f} of {int(chosen.sum())}")


if __name__ == "__main__":
    main()
