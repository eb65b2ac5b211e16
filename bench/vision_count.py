"""How well can the tiny preset's vision tower count lesions on its own?

Trains a fresh Qwen2.5-VL vision tower (the tiny preset's, with any of its config fields overridden) and a
fresh :class:`~citrus_v.objectives.lesion_count.LesionCountHead` on nothing but the lesion-count targets of a
corpus's scans (``citrus-v data synth``), then reads the count (the head's cells summed and rounded) on
another corpus split. It tells in minutes whether a tower or a training signal can count better, before a base
is built with it (BENCHMARKS.md, demo quality). ``--tower cnn`` trains a small plain conv net on the same
pixels and targets instead: a reference for how well the counts can be learnt at all. With
``--teacher_steps N`` that CNN trains first and then teaches the tower, as a convnet teacher speeds up a ViT
that learns from few images (DeiT): the tower learns the CNN's cell features or cell logits next to the
targets. ``--stem conv`` puts a small conv stem in place of the tower's patch embedding. ``--shift`` moves
every training scan by a fresh random offset at each step, ``--target bilinear`` shares each centre's count
between the four cells around it, and ``--readings`` writes what was read on each scan, to look at which ones
the tower miscounts.

    python bench/vision_count.py --train CORPUS [--val CORPUS --val_split val] [--steps 1500]
        [--vision depth=6 hidden_size=128 ...] [--count_weight 0.25] [--mirror] [--shift PX] [--tower qwen|cnn]
        [--stem patch|conv] [--teacher_steps 900 --distill feature|logit|both --distill_weight 1.0]
        [--target cell|bilinear] [--readings FILE]

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
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from citrus_v.data.rows import SkipCounter, iter_rows
from citrus_v.media import read_image
from citrus_v.objectives.lesion_count import LesionCountHead, lesion_count_target
from citrus_v.processing.tokenizer_builder import build_tokenizer
from citrus_v.recipes.presets import tiny_image_processor, tiny_mllm_config


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


def unpatch(pixels: torch.Tensor, grid: list[int], patch: int, merge: int) -> torch.Tensor:
    """``[n, patches, dim]`` processor patches of ``grid`` ``(t, h, w)`` -> ``[n, 3, h * patch, w * patch]``
    normalised images: undoes the processor's (rows/m, cols/m, m, m, channel, time, p, p) patch order, frame 0."""
    _, rows, cols = grid
    m, p = merge, patch
    patches = pixels.reshape(len(pixels), rows // m, cols // m, m, m, 3, -1, p, p)[:, :, :, :, :, :, 0]
    return patches.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(len(pixels), 3, rows * p, cols * p)


def repatch(images: torch.Tensor, patch: int, merge: int, frames: int) -> torch.Tensor:
    """The inverse of :func:`unpatch`: ``[n, 3, H, W]`` -> the processor's ``[n, patches, dim]``, each
    image repeated over ``frames`` as the processor repeats a still image."""
    n, channels, height, width = images.shape
    m, p = merge, patch
    grid = images.reshape(n, channels, height // (m * p), m, p, width // (m * p), m, p)
    grid = grid.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, frames, -1, -1)
    return grid.reshape(n, (height // p) * (width // p), channels * frames * p * p)


def shift(image: torch.Tensor, points: list[list[float]], reach: int, generator: torch.Generator):
    """``image`` ``[3, H, W]`` moved by a random whole-pixel offset of at most ``reach`` each way (edges
    repeated) and its lesion centres moved with it; centres pushed off the image are dropped."""
    dx, dy = (int(v) for v in torch.randint(-reach, reach + 1, (2,), generator=generator))
    height, width = image.shape[-2:]
    padded = torch.nn.functional.pad(image[None].float(), (reach,) * 4, mode="replicate")[0]
    moved = padded[:, reach - dy : reach - dy + height, reach - dx : reach - dx + width]
    kept = [[x + dx, y + dy] for x, y in points if 0 <= x + dx < width and 0 <= y + dy < height]
    return moved, kept


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
        image = unpatch(pixels.float(), grid, self.patch_size, self.merge)[:, :1]  # channel 0: the scans are grey
        return self.net(image).flatten(2).transpose(1, 2)


class ConvStem(torch.nn.Module):
    """A small conv stem in place of the Qwen tower's patch embedding (one linear map of each 14-px patch on its
    own): overlapping 3 x 3 convolutions with batch norm see across patch edges before the transformer blocks
    do. It takes the flattened patches the tower's ``patch_embed`` takes and gives one feature per patch in
    the processor's patch order, for scans of one ``grid``."""

    def __init__(self, patch_size: int, merge: int, grid: list[int], hidden: int) -> None:
        super().__init__()
        if patch_size % 2:
            raise SystemExit(f"--stem conv: the patch ({patch_size} px) must be even, for the stem's stride-2 stage")
        self.patch_size, self.merge, self.grid = patch_size, merge, grid

        def block(inputs: int, outputs: int, kernel: int, stride: int) -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2 if stride < kernel else 0),
                torch.nn.BatchNorm2d(outputs),
                torch.nn.ReLU(),
            )

        self.net = torch.nn.Sequential(
            block(1, 16, 3, 2), block(16, 32, 3, 1),
            torch.nn.Conv2d(32, hidden, patch_size // 2, patch_size // 2),  # one feature per patch
        )

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        """``[n * patches, dim]`` processor patches -> ``[n * patches, hidden]``, in the same order."""
        _, rows, cols = self.grid
        m = self.merge
        pixels = flat.float().reshape(-1, rows * cols, flat.shape[-1])
        features = self.net(unpatch(pixels, self.grid, self.patch_size, m)[:, :1])  # the scans are grey
        n, hidden = features.shape[:2]
        features = features.reshape(n, hidden, rows // m, m, cols // m, m).permute(0, 2, 4, 3, 5, 1)
        return features.reshape(n * rows * cols, hidden)


def bilinear_count_target(points: list[list[float]], size: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """Like :func:`lesion_count_target`, but each centre's one count is shared between the (up to) four cells
    whose centres surround it, by bilinear weights: a centre on a cell boundary counts half in each cell, so
    the target moves smoothly with the lesion instead of jumping from one cell to the next."""
    rows, cols = cells
    width, height = size
    target = torch.zeros(rows, cols)
    for x, y in points:
        # continuous cell coordinates, with cell centres at whole numbers
        u = min(max(x * cols / width - 0.5, 0.0), cols - 1.0)
        v = min(max(y * rows / height - 0.5, 0.0), rows - 1.0)
        c0, r0 = int(u), int(v)
        fu, fv = u - c0, v - r0
        c1, r1 = min(c0 + 1, cols - 1), min(r0 + 1, rows - 1)
        target[r0, c0] += (1 - fu) * (1 - fv)
        target[r0, c1] += fu * (1 - fv)
        target[r1, c0] += (1 - fu) * fv
        target[r1, c1] += fu * fv
    return target.flatten()


class Reader(torch.nn.Module):
    """A tower and the count head on its merged cells, for one patch ``grid``."""

    def __init__(self, kind: str, tower: torch.nn.Module, head: LesionCountHead, grid: list[int]) -> None:
        super().__init__()
        self.kind, self.tower, self.head, self.grid = kind, tower, head, grid

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[n, patches, dim]`` processor patches -> ``[n, cells, out_hidden]`` merged-cell features."""
        if self.kind == "cnn":
            return self.tower(pixels, self.grid)
        flat = pixels.float().reshape(-1, pixels.shape[-1])
        out = self.tower(flat, grid_thw=torch.tensor([self.grid] * len(pixels))).pooler_output
        return out.reshape(len(pixels), -1, out.shape[-1])

    def read(self, pixels: torch.Tensor) -> torch.Tensor:
        """The rounded count the head reads on each scan."""
        was = self.training
        self.eval()
        with torch.no_grad():
            counts = torch.cat([torch.sigmoid(self.head(self.tokens(pixels[i : i + 64]))).sum(-1)
                                for i in range(0, len(pixels), 64)])
        self.train(was)
        return counts.round()


def encode(corpus: Path, images: dict[str, list[list[float]]], processor, merge: int, label: str,
           mirror: bool = False, target=lesion_count_target):
    """Pixel patches (fp16, to keep thousands of scans in memory), count targets and counts of ``images``;
    with ``mirror``, each image's three mirror images too."""
    pixels, targets, counts, centres = [], [], [], []
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
            targets.append(target(points, image.size, cells))
            counts.append(len(points))
            centres.append(points)
    return torch.stack(pixels), torch.stack(targets), torch.tensor(counts), grid, centres


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
        "--shift", type=int, default=0, metavar="PX",
        help="move each training scan by a fresh random offset of up to PX pixels each way at every step",
    )
    parser.add_argument(
        "--tower", choices=["qwen", "cnn"], default="qwen",
        help="the preset's Qwen2.5-VL vision tower, or a small conv net as a reference on the same pixels",
    )
    parser.add_argument(
        "--stem", choices=["patch", "conv"], default="patch",
        help="the Qwen tower's own patch embedding, or a small conv stem (ConvStem) in its place",
    )
    parser.add_argument(
        "--teacher_steps", type=int, default=0,
        help="first train the reference CNN this many steps, then teach the tower its cells (--distill)",
    )
    parser.add_argument("--distill", choices=["feature", "logit", "both"], default="feature",
                        help="what the tower learns from the CNN: its cell features (through a linear map), "
                             "its head's cell logits, or both")
    parser.add_argument("--distill_weight", type=float, default=1.0)
    parser.add_argument("--target", choices=["cell", "bilinear"], default="cell",
                        help="each centre counts in its cell (as the base), or shared bilinearly by the four "
                             "cells around it")
    parser.add_argument("--readings", type=Path, help="write each read scan's centres and read count here (JSONL)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    vision = tiny_mllm_config(build_tokenizer()).vision_config
    for item in args.vision:
        key, _, value = item.partition("=")
        if not hasattr(vision, key):
            raise SystemExit(f"--vision {item}: the vision config has no field {key!r}")
        setattr(vision, key, json.loads(value))
    patch, merge = vision.patch_size, vision.spatial_merge_size
    processor = tiny_image_processor(patch, merge)
    train_images, train_without = scans(args.train, "train")
    val_images, val_without = scans(args.val or args.train, args.val_split)
    target = bilinear_count_target if args.target == "bilinear" else lesion_count_target
    x_train, t_train, _, grid, p_train = encode(
        args.train, train_images, processor, merge, "train", args.mirror, target
    )
    x_val, _, n_val, val_grid, _ = encode(args.val or args.train, val_images, processor, merge, args.val_split)
    if val_grid != grid:
        raise SystemExit(f"the scans to read give a {val_grid} patch grid, the training ones {grid}: use one size")
    tokens = grid[1] * grid[2] // merge**2
    cells = (grid[1] // merge, grid[2] // merge)
    frames = x_train.shape[-1] // (3 * patch**2)  # the processor's temporal_patch_size
    if args.shift:  # the stored patches must come back exactly, or the shifted scans would not be the scans
        again = repatch(unpatch(x_train[:4], grid, patch, merge), patch, merge, frames)
        assert torch.equal(again, x_train[:4]), "repatch(unpatch(x)) differs from the processor's patches"
    print(
        f"{len(x_train)} training scans, {len(x_val)} to read (image rows without lesion_points, such as lab "
        f"reports, left out: {train_without} train, {val_without} read); "
        f"counts to read: {dict(sorted(Counter(n_val.tolist()).items()))}"
    )

    def reader(kind: str) -> Reader:
        tower = (
            ReferenceCNN(patch, merge, vision.out_hidden_size)
            if kind == "cnn"
            else Qwen2_5_VisionTransformerPretrainedModel._from_config(vision)
        )
        if kind != "cnn" and args.stem == "conv":
            tower.patch_embed = ConvStem(patch, merge, grid, vision.hidden_size)
        made = Reader(kind, tower, LesionCountHead(vision.out_hidden_size, count_weight=args.count_weight), grid)
        described = (
            "a reference CNN"
            if kind == "cnn"
            else f"a Qwen2.5-VL tower: depth {vision.depth}, width {vision.hidden_size}, "
            f"full attention in {vision.fullatt_block_indexes}, {args.stem} stem"
        )
        print(f"{described}, {sum(p.numel() for p in made.parameters()):,} parameters with the head", flush=True)
        return made

    augment = torch.Generator().manual_seed(args.seed)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        """A random training batch (moved by ``--shift``) and its count targets."""
        chosen = torch.randint(0, len(x_train), (args.batch_size,))
        pixels, wanted = x_train[chosen], t_train[chosen]
        if args.shift:
            images = unpatch(pixels, grid, patch, merge)
            moved = [shift(images[i], p_train[j], args.shift, augment) for i, j in enumerate(chosen.tolist())]
            pixels = repatch(torch.stack([m for m, _ in moved]), patch, merge, frames)
            size = (images.shape[-1], images.shape[-2])
            wanted = torch.stack([target(points, size, cells) for _, points in moved])
        return pixels, wanted

    def fit(student: Reader, steps: int, teacher: Reader | None = None) -> torch.Tensor:
        """Train ``student`` on the count targets (and, given a ``teacher``, on its cells too) for ``steps``,
        reading the val scans five times on the way, then print the accuracy by lesion count; returns the
        last reading's counts."""
        # the student's map onto the teacher's features; drawn only in runs with a teacher (in both of their
        # fits, as when the figures in BENCHMARKS.md were measured), so runs without one draw as before
        adapter = torch.nn.Linear(vision.out_hidden_size, vision.out_hidden_size) if args.teacher_steps else None
        parameters = [*student.parameters(), *(adapter.parameters() if teacher else [])]
        optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.01)
        standard = None
        started = time.monotonic()
        report = max(1, steps // 5)
        counts = None  # the last reading, kept so the breakdown and --readings need not read again
        for step in range(1, steps + 1):
            scale = min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * scale
            pixels, wanted = batch()
            found = student.tokens(pixels)
            loss = student.head.loss(found.reshape(-1, found.shape[-1]), wanted.reshape(-1), [tokens] * len(wanted))
            if teacher is not None:
                with torch.no_grad():
                    taught = teacher.tokens(pixels)
                    if standard is None:  # each teacher feature's mean and spread, from the first batch
                        standard = taught.mean(dim=(0, 1)), taught.std(dim=(0, 1)).clamp(min=1e-3)
                if args.distill in ("feature", "both"):
                    features = (taught - standard[0]) / standard[1]  # standardised: the term starts near 1
                    loss = loss + args.distill_weight * F.mse_loss(adapter(found), features)
                if args.distill in ("logit", "both"):
                    loss = loss + args.distill_weight * F.mse_loss(student.head(found), teacher.head(taught))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            if step % report == 0 or step == steps:
                counts = student.read(x_val)
                right = counts == n_val
                print(f"{student.kind} step {step}: loss {loss.item():.3f}, count accuracy "
                      f"{right.float().mean():.3f} ({int(right.sum())}/{len(right)}), "
                      f"{(time.monotonic() - started) / step:.3f} s/step", flush=True)
        if counts is None:  # no steps: no reading yet
            counts = student.read(x_val)
        right = counts == n_val
        for count in sorted(set(n_val.tolist())):
            chosen = n_val == count
            print(f"  {count} lesion(s): {right[chosen].float().mean():.3f} of {int(chosen.sum())}")
        return counts

    teacher = None
    if args.teacher_steps:
        teacher = reader("cnn")
        fit(teacher, args.teacher_steps)
        teacher.eval()
    student = reader(args.tower)
    counts = fit(student, args.steps, teacher)
    if args.readings:  # one line per scan read, to look at which scans the tower miscounts
        with args.readings.open("w", encoding="utf-8") as out:
            for (reference, points), found in zip(val_images.items(), counts.tolist(), strict=True):
                out.write(json.dumps({"image": reference, "lesion_points": points, "read": int(found)}) + "\n")
        print(f"wrote each scan's reading to {args.readings}")


if __name__ == "__main__":
    main()
