"""How fast SAM 2 segments a volume: frames one per pass through its image encoder, or a chunk per pass.

    .venv/bin/python bench/volume_segment.py --model tiny-base --repeats 5

``VolumeSegmenter`` (per-frame prompting, as the shipped base segments volumes) draws a mask stack for
``--seg`` ``[SEG]`` states on every frame of a volume (default: the NIfTI volume nibabel ships, 41 x 33 x 25),
once with ``frames_per_pass=1`` and once with a chunk per pass (the default), the two interleaved ``--repeats``
times so that a busy machine slows both alike. Prints the median seconds of each, their ratio, and how many
voxels and object scores the two disagree on (batching changes only the order of float sums).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_quality import machine  # noqa: E402


def default_volume() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "anatomical.nii"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-base", help="model folder, or tiny-base")
    parser.add_argument("--volume", default=None, help="NIfTI volume, DICOM series folder or clip (default: "
                        "nibabel's anatomical.nii)")
    parser.add_argument("--seg", type=int, default=2, help="[SEG] states to segment")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    from citrus_v.checkpoint_layout import resolve_model
    from citrus_v.infer import CitrusVPredictor
    from citrus_v.infer.volume_segmentation import VolumeSegmenter
    from citrus_v.media import read_volume

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = CitrusVPredictor.from_pretrained(resolve_model(args.model), propagation="per_frame")
    volume = read_volume(args.volume or default_volume())
    generator = torch.Generator().manual_seed(0)
    hidden = predictor.model.config.text_config.hidden_size
    states = list(torch.randn(args.seg, hidden, generator=generator))
    labels = [f"target {k}" for k in range(args.seg)]
    segmenters = {
        "one frame per pass": VolumeSegmenter(predictor.model, predictor.processor, predictor.postprocess_masks,
                                              "per_frame", frames_per_pass=1),
        "a chunk per pass": VolumeSegmenter(predictor.model, predictor.processor, predictor.postprocess_masks,
                                            "per_frame"),
    }
    times: dict[str, list[float]] = {name: [] for name in segmenters}
    results = {}
    for _ in range(args.repeats):
        for name, segmenter in segmenters.items():
            started = time.perf_counter()
            results[name] = segmenter.segment(states, volume, labels)
            times[name].append(time.perf_counter() - started)
    one, chunk = (statistics.median(times[name]) for name in segmenters)
    first, second = results.values()
    voxels = sum(int(np.count_nonzero(a.mask != b.mask)) for a, b in zip(first, second, strict=True))
    total = sum(a.mask.size for a in first)
    score_gap = max(float(np.abs(a.object_scores - b.object_scores).max()) for a, b in zip(first, second, strict=True))
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    print(f"volume: {volume.num_frames} frames of {volume.frame_shape[1]} x {volume.frame_shape[0]}; "
          f"{args.seg} [SEG]; chunk {segmenters['a chunk per pass'].frames_per_chunk} frames; "
          f"median of {args.repeats}")
    print(f"one frame per pass: {one:.3f} s")
    print(f"a chunk per pass: {chunk:.3f} s")
    print(f"speed-up: {one / chunk:.2f}x")
    print(f"masks differ in {voxels} of {total} voxels; object scores by at most {score_gap:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
