"""Synthetic phantoms: grey images with an organ-like ellipse and a bright round lesion, with masks.

Each phantom has two targets, so a segmentation prompt must name which one it wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TARGETS = ("lesion", "organ")


@dataclass
class Phantom:
    image: np.ndarray  # [H, W] uint8
    masks: dict[str, np.ndarray]  # target name -> [H, W] bool


def make_phantom(rng: np.random.Generator, size: int = 224) -> Phantom:
    """One phantom: background noise, an ellipse 'organ', a bright disc 'lesion' somewhere else."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = rng.normal(40, 8, (size, size)).astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    ry, rx = rng.uniform(0.12, 0.25, 2) * size
    organ = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    image[organ] += 60
    while True:
        ly, lx = rng.uniform(0.1, 0.9, 2) * size
        radius = rng.uniform(0.04, 0.09) * size
        lesion = (yy - ly) ** 2 + (xx - lx) ** 2 <= radius**2
        if not (lesion & organ).any():
            break
    image[lesion] += 150
    return Phantom(np.clip(image, 0, 255).astype(np.uint8), {"lesion": lesion, "organ": organ})


def segmentation_sample(phantom: Phantom, target: str) -> dict:
    """An ms-swift style sample asking for ``target``'s mask."""
    return {
        "messages": [
            {"role": "user", "content": f"<image>Please segment the {target} in this image."},
            {"role": "assistant", "content": "Sure, it is [SEG]."},
        ],
        "images": [phantom.image],
        "masks": [phantom.masks[target]],
    }
