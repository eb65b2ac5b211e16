"""How well can the tiny preset's vision tower count lesions on its own?

Trains a fresh Qwen2.5-VL vision tower (the tiny preset's, with any of its config fields overridden) and a
fresh :class:`~citrus_v.modeling.lesion_count.LesionCountHead` on nothing but the lesion-count targets of a
corpus's scans (``citrus-v data synth``), then reads the count (the head's cells summed and rounded) on
another corpus split. It tells in minutes whether a tower or a training signal can count better, before a
base is built with it (BENCHMARKS.md, demo quality). ``--tower cnn`` trains a small plain conv net on the
same pixels and targets instead: a reference for how well the counts can be learnt at all.

    python bench/vision_count.py --train CORPUS [--val CORPUS --val_split val] [--steps 1500]
        [--vision depth=6 hidden_size=128 ...] [--count_weight 0.25] [--mirror] [--tower qwen|cnn]

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
from PIL import Image, ImageOps
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


def mirrored(image: Image.Image, points: list[list[float]]) -> list[tuple[Image.Image, list[list[float]]]]:
    """``image`` and its three mirror images (left-right, top-bottom, both), each with its lesion centres
    moved to match: the count stays, so they are free extra training scans for counting."""
    width, height = image.size
    flip_x = [[width - 1 - x, y] for x, y in points]
    return [
        (image, points),
        (ImageOps.mirror(image), flip_x),
        (ImageOps.flip(image), [[x, height - 1 - y] for x, y in points]),
        (ImageOps.flip(ImageOps.mirror(image)), [[x, height - 1 - y] for x, y in flip_x]),
    ]


class ReferenceCNN(torch.nn.Module):
    """A small plain conv net with the Qwen tower's input and output: the processor's patches in, one
    ``out_hidden``-wide feature per merged cell out. Convolutions and batch norm learn quickly from few
    images, so it tells whether the counting labels can be learnt from these pixels at all."""

    def __init__(self, patch_size: int, merge: int, out_hidden: int) -> None:
        super().__init__()
        if patch_size * merge % 4:
            raise SystemExit(
                f"--tower cnn: a merged cell of {patch_size * merge} px (patch {patch_size} x merge {merge}) must "
                "be a multiple of 4 px, for the CNN's two stride-2 stages"
            )
        self.patch_size, self.merge = patch_size, merge

        def block(inputs: int, outputs: int, kernel: int = 3, stride: int = 1) -> torch.nn.Sequential:
            padding = kernel // 2 if stride < kernel else 0
            return torch.nn.Sequential(
                torch.nn.Conv2d(inputs, outputs, kernel, stride, padding),
                torch.nn.BatchNorm2d(outputs),
                torch.nn.ReLU(),
            )

        cell = patch_size * merge  # pixels per merged cell: two stride-2 stages, then one cell-sized stride
        self.net = torch.nn.Sequential(
            block(1, 16, stride=2), block(16, 32, stride=2), block(32, 64), block(64, 64),
            block(64, 96, kernel=cell // 4, stride=cell // 4), block(96, 96), block(96, out_hidden),
        )

    def forward(self, pixels: torch.Tensor, grid: list[int]) -> torch.Tensor:
        """``[n, patches, dim]`` processor patches of ``grid`` ``(t, h, w)`` -> ``[n, cells, out_hidden]``."""
        _, rows, cols = grid
        m, p = self.merge, self.patch_size
        # undo the processor's (rows/m, cols/m, m, m, channel, time, p, p) patch order; channel 0, frame 0
        patches = pixels.float().reshape(len(pixels), rows // m, cols // m, m, m, 3, -1, p, p)[:, :, :, :, :, 0, 0]
        image = patches.permute(0, 1, 3, 5, 2, 4, 6).reshape(len(pixels), 1, rows * p, cols * p)
        return self.net(image).flatten(2).transpose(1, 2)


def encode(corpus: Path, images: dict[str, list[list[float]]], processor, merge: int, label: str,
           mirror: bool = False):
    """Pixel patches (fp16, to keep thousands of scans in memory), count targets and counts of ``images``;
    with ``mirror``, each image's three mirror images too."""
    pixels, targets, counts = [], [], []
    grid = None
    for reference, original_points in tqdm(images.items(), desc=f"reading {label}", unit="image"):
        original = read_image(reference, base_dir=corpus).convert("RGB")
        for image, points in mirrored(original, original_points) if mirror else [(original, original_points)]:
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
    parser.add_argument("--mirror", action="store_true", help="train on each scan's three mirror images too")
    parser.add_argument(
        "--tower", choices=["qwen", "cnn"], default="qwen",
        help="the preset's Qwen2.5-VL vision tower, or a small conv net as a reference on the same pixels",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    vision = tiny_mllm_config(build_tokenizer()).vision_config
    for item in args.vision:
        key, _, value = item.partition("=")
        if not hasattr(vision, key):
            raise SystemExit(f"--vision {item}: the vision config has no field {key!r}")
        setattr(vision, key, json.loads(value))
    if args.tower == "cnn":
        tower = ReferenceCNN(vision.patch_size, vision.spatial_merge_size, vision.out_hidden_size)
    else:
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision)
    head = LesionCountHead(vision.out_hidden_size, count_weight=args.count_weight)
    processor = tiny_image_processor(vision.patch_size, vision.spatial_merge_size)

    train_images, train_without = scans(args.train, "train")
    val_images, val_without = scans(args.val or args.train, args.val_split)
    merge = vision.spatial_merge_size
    x_train, t_train, _, grid = encode(args.train, train_images, processor, merge, "train", args.mirror)
    x_val, _, n_val, val_grid = encode(args.val or args.train, val_images, processor, merge, args.val_split)
    if val_grid != grid:
        raise SystemExit(f"the scans to read give a {val_grid} patch grid, the training ones {grid}: use one size")
    tokens = grid[1] * grid[2] // merge**2
    parameters = [*tower.parameters(), *head.parameters()]
    described = (
        "a reference CNN"
        if args.tower == "cnn"
        else f"depth {vision.depth}, width {vision.hidden_size}, full attention in {vision.fullatt_block_indexes}"
    )
    print(
        f"tower: {described}, {sum(p.numel() for p in parameters):,} parameters with the head; "
        f"{len(x_train)} training scans, "
        f"{len(x_val)} to read (image rows without lesion_points, such as lab reports, left out: "
        f"{train_without} train, {val_without} read); "
        f"counts to read: {dict(sorted(Counter(n_val.tolist()).items()))}"
    )

    def image_tokens(pixels: torch.Tensor) -> torch.Tensor:
        if args.tower == "cnn":
            return tower(pixels, grid)
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
    right = None  # the last reading's right answers, kept so the breakdown below need not read again
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
    if right is None:  # --steps 0: no reading yet
        right = read() == n_val
    for count in sorted(set(n_val.tolist())):
        chosen = n_val == count
        print(f"  {count} lesion(s): {right[chosen].float().mean():.3f} of {int(chosen.sum())}")


if __name__ == "__main__":
    main()
