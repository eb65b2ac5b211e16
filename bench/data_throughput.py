"""Data pipeline throughput and packing efficiency on the synthetic corpus (a benchmark, not a test).

Measures samples/s of the full pipeline — read row -> load images and masks (PNG, DICOM, NIfTI) ->
template -> tokens -> tensors (padded batches of 8) — with 0, 1 and 2 loader workers, then the packing
efficiency (real tokens / tokens of the padded batch) at max_length 2048 and 8192, for the tiny preset's
224-pixel images (64 image tokens) and for upstream's training bounds (the same images resized to 448 px,
256 image tokens).

    .venv/bin/python bench/data_throughput.py [--n 200] [--samples 400] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from citrus_v.data.collator import CitrusVCollator
from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.dataset import RowDataset
from citrus_v.data.packing import packed_stats, padded_stats, plan_packs
from citrus_v.data.validate import ValidationOptions
from citrus_v.processing.processor import CitrusVProcessor
from citrus_v.recipes.presets import build_tiny


def throughput(dataset: RowDataset, processor: CitrusVProcessor, workers: int, samples: int, batch: int = 8) -> float:
    """Samples per second through DataLoader + collator (first batch excluded: worker start-up)."""
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=CitrusVCollator(processor),
        generator=torch.Generator().manual_seed(0), persistent_workers=False,
    )
    done, start = 0, None
    while done < samples:
        for out in loader:
            if start is None:
                start = time.perf_counter()  # after the first batch
                continue
            done += out.num_samples
            if done >= samples:
                break
    return done / (time.perf_counter() - start)


def packing_table(lengths: list[int], has_seg: list[bool], label: str) -> list[str]:
    rows = []
    padded = padded_stats(lengths, 8)
    rows.append(f"| {label} | padded, batches of 8 | - | {padded.efficiency:.3f} | {padded.sequences} |")
    for max_length in (2048, 8192):
        for limit, name in ((1, "1 [SEG] sample per row (today's model)"), (10**9, "any [SEG] samples per row")):
            packs = plan_packs(lengths, max_length, has_seg, limit)
            stats = packed_stats(lengths, packs, max_length)
            rows.append(f"| {label} | packed, {name} | {max_length} | {stats.efficiency:.3f} | {stats.sequences} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="source images in the synthetic corpus")
    parser.add_argument("--samples", type=int, default=400, help="samples timed per worker setting")
    parser.add_argument("--corpus", help="an existing corpus folder (default: generate one)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # loader workers, not intra-op threads, are what is measured

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus"
        if not args.corpus:
            start = time.perf_counter()
            write_corpus(corpus, CorpusOptions(n=args.n, seed=0))
            print(f"synth: {args.n} images in {time.perf_counter() - start:.1f} s")
        _, processor = build_tiny(seed=0)
        start = time.perf_counter()
        dataset = RowDataset.from_jsonl([corpus / "train.jsonl"], processor)
        print(f"index + check (headers) + token lengths: {len(dataset)} rows in {time.perf_counter() - start:.1f} s")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads 1")
        print("\n| loader workers | samples/s |\n|---|---|")
        for workers in (0, 1, 2):
            print(f"| {workers} | {throughput(dataset, processor, workers, args.samples):.1f} |", flush=True)

        has_seg = [bool(r.row.get("masks")) for r in dataset.records]
        print("\n| images | batching | max_length | efficiency | sequences |\n|---|---|---|---|---|")
        for line in packing_table(dataset.lengths, has_seg, "224 px (64 tokens)"):
            print(line)
        upstream = ValidationOptions(decode=False)  # upstream bounds: 224-px images upscaled to 448 px
        big = RowDataset.from_jsonl([corpus / "train.jsonl"], CitrusVProcessor(
            processor.tokenizer, type(processor.image_processor)(min_pixels=upstream.min_pixels,
                                                                 max_pixels=upstream.max_pixels),
            processor.sam_image_size, processor.mask_size,
        ))
        for line in packing_table(big.lengths, has_seg, "448 px (256 tokens)"):
            print(line)


if __name__ == "__main__":
    main()
