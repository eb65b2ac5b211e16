"""The smallest end-to-end run: build the tiny preset, train it briefly on phantoms, predict, draw.

It shows the pieces working together (processor -> model -> losses -> backward -> save -> load ->
masks); the full demo with staged training and evaluation is a later, larger command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data.synth import TARGETS, make_phantom, segmentation_sample
from .modeling.modeling_citrus_v import CitrusV
from .presets import build_tiny
from .processing.processor import CitrusVProcessor


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else float(2 * (pred & target).sum() / total)


def predict_mask(model: CitrusV, processor: CitrusVProcessor, sample: dict) -> np.ndarray:
    """Teacher-forced mask for ``sample``'s ``[SEG]``, upsampled to the image size, thresholded at 0.5."""
    batch = processor(sample)
    batch.pop("labels")
    batch.pop("gt_masks")
    with torch.no_grad():
        out = model(**batch)
    height, width = sample["images"][0].shape[:2]
    logits = torch.nn.functional.interpolate(out.pred_masks[0][:1, None], (height, width), mode="bilinear")
    return (logits[0, 0].sigmoid() > 0.5).numpy()


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> Image.Image:
    """Grey image with the prediction in red and the ground truth in green (yellow where both)."""
    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32)
    rgb[pred, 0] = 0.5 * rgb[pred, 0] + 127
    rgb[truth, 1] = 0.5 * rgb[truth, 1] + 127
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def run_demo(out: str | Path = "demo_out", steps: int = 60, seed: int = 0, batch_size: int = 4) -> dict:
    """Build, train ``steps`` steps, save, reload, evaluate Dice per target; write ``out/``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, processor = build_tiny(seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in (bar := tqdm(range(steps), desc="training", unit="step")):
        samples = [segmentation_sample(make_phantom(rng), TARGETS[(step + i) % 2]) for i in range(batch_size)]
        loss = model(**processor(samples)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    checkpoint = out / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)

    model = CitrusV.from_pretrained(checkpoint).eval()
    processor = CitrusVProcessor.from_pretrained(checkpoint)
    test_rng = np.random.default_rng(seed + 1)
    scores: dict[str, list[float]] = {t: [] for t in TARGETS}
    for k in tqdm(range(8), desc="evaluating", unit="image"):
        phantom = make_phantom(test_rng)
        for target in TARGETS:
            pred = predict_mask(model, processor, segmentation_sample(phantom, target))
            scores[target].append(dice_score(pred, phantom.masks[target]))
            if k == 0:
                overlay(phantom.image, pred, phantom.masks[target]).save(out / f"overlay_{target}.png")
    metrics = {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-5:])),
        "dice": {t: float(np.mean(v)) for t, v in scores.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"checkpoint: {checkpoint}\noverlays: {out}/overlay_*.png (prediction red, truth green)")
    return metrics
