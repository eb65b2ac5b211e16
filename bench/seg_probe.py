"""Where do segmentation masks go wrong: the language model, the projector, or SAM 2? A teacher-forced probe.

    .venv/bin/python bench/seg_probe.py --model demo_out/checkpoint --data demo_out/data/test.jsonl \\
        --fit demo_out/data/train.jsonl

The gold answer of every segmentation row is fed in (no generation), and for each ``[SEG]``:

1. Dice of its low-res mask against the target, per target named in the prompt, and the control: the same
   with every ``[SEG]`` embedding replaced by their mean (a target whose Dice does not drop ignores the words).
2. A linear probe (logistic regression on standardised features, fitted on ``--fit`` rows, scored on
   ``--data`` rows): how well the target can be read from the language model's ``[SEG]`` hidden state, and
   from the projector's output (what SAM 2 receives), with the confusions. A high first and a low second
   accuracy point at the projector; both high with a low Dice point at SAM 2.

Prints the tables and the machine; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "sam_pixel_values")


def seg_rows(path: Path, limit: int | None) -> tuple[Path, list[str]]:
    """The segmentation rows with a ``[SEG]`` answer, written beside ``path`` (relative media stay valid),
    and the target each one names."""
    from citrus_v.data.rows import RowIssue, read_jsonl
    from citrus_v.recipes.demo import target_of

    rows, targets = [], []
    for record in read_jsonl(path):
        if isinstance(record, RowIssue):
            print(f"skipped {record}", file=sys.stderr)
            continue
        row = record.row
        answer = " ".join(m["content"] for m in row.get("messages", []) if m.get("role") == "assistant")
        if row.get("task") != "segmentation" or "[SEG]" not in answer:
            continue
        rows.append(json.dumps(row) + "\n")
        targets.append(target_of(next(m["content"] for m in row["messages"] if m["role"] == "user")))
        if limit and len(rows) == limit:
            break
    if not rows:
        raise SystemExit(f"{path}: no segmentation rows with a [SEG] answer")
    out = path.with_name(f".seg_probe_{path.stem}.jsonl")
    out.write_text("".join(rows))
    return out, targets


@torch.no_grad()
def run(model, processor, path: Path, targets: list[str], batch_size: int, label: str = "probe"):
    """Teacher-forced pass: per ``[SEG]`` its target, Dice, hidden state and projected embedding."""
    from citrus_v.data.collator import CitrusVCollator
    from citrus_v.data.dataset import RowDataset
    from citrus_v.eval.seg_metrics import dice

    dataset = RowDataset.from_jsonl([str(path)], processor)
    if len(dataset) != len(targets):
        raise SystemExit(f"{path}: {len(targets) - len(dataset)} row(s) could not be loaded (see above)")
    collator = CitrusVCollator(processor)
    hidden: list[torch.Tensor] = []
    projected: list[torch.Tensor] = []

    def keep(module, inputs, output):
        hidden.append(inputs[0].detach())
        projected.append(output.detach())

    hook = model.seg_projector.register_forward_hook(keep)
    labels, dices = [], []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=f"seg probe ({label})", unit="batch"):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            out = model(**{k: batch[k] for k in KEYS if k in batch})
            for j, (pred, truth) in enumerate(zip(out.pred_masks, batch["gt_masks"], strict=True)):
                for k in range(pred.shape[0]):
                    dices.append(dice(pred[k].numpy() > 0, truth[k].numpy() > 0.5))
                    labels.append(targets[start + j])
    finally:
        hook.remove()
    return labels, np.array(dices), torch.cat(hidden), torch.cat(projected)


def linear_probe(train_x, train_y, test_x, test_y, steps: int = 500) -> tuple[float, dict[str, Counter]]:
    """Fit a softmax regression on standardised features; accuracy on the test features and, per target,
    what it was mistaken for."""
    classes = sorted(set(train_y) | set(test_y))
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    weight = torch.zeros(a.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    y = torch.tensor([index[c] for c in train_y])
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ weight + bias, y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    predicted = [classes[i] for i in (b @ weight + bias).argmax(1).tolist()]
    confusions: dict[str, Counter] = defaultdict(Counter)
    for truth, guess in zip(test_y, predicted, strict=True):
        if truth != guess:
            confusions[truth][guess] += 1
    return float(np.mean([t == p for t, p in zip(test_y, predicted, strict=True)])), confusions


def main() -> int:
    from demo_quality import machine

    from citrus_v.infer.predictor import CitrusVPredictor
    from citrus_v.recipes.demo import MeanSegEmbedding

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--data", required=True, help="JSONL to probe (a held-out split)")
    parser.add_argument("--fit", help="JSONL to fit the linear probe on (a training split); no probe without it")
    parser.add_argument("--limit", type=int, default=None, help="at most this many rows of each file")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    predictor = CitrusVPredictor.from_pretrained(args.model)
    model, processor = predictor.model.eval(), predictor.processor
    data, targets = seg_rows(Path(args.data), args.limit)
    # the control: what the [SEG] heads give SAM replaced by its mean over this pass
    control_hook = MeanSegEmbedding(model)
    try:
        labels, dice, hidden, projected = run(model, processor, data, targets, args.batch_size)
        control_hook.freeze()
        control_labels, control, _, _ = run(model, processor, data, targets, args.batch_size, "control")
    finally:
        control_hook.remove()
    assert control_labels == labels

    result: dict = {"model": args.model, "data": args.data, "masks": len(labels), "machine": machine()}
    result["dice"] = float(dice.mean())
    result["control"] = float(control.mean())
    per_target = {}
    print(f"machine: {result['machine']}")
    print(f"\n{len(labels)} masks: mean Dice {dice.mean():.3f}, with the mean [SEG] embedding {control.mean():.3f}\n")
    print("| target | n | Dice | control |\n|---|---|---|---|")
    for target in sorted(set(labels)):
        rows = np.array([label == target for label in labels])
        per_target[target] = {
            "n": int(rows.sum()),
            "dice": float(dice[rows].mean()),
            "control": float(control[rows].mean()),
        }
        print(f"| {target} | {rows.sum()} | {dice[rows].mean():.3f} | {control[rows].mean():.3f} |")
    result["per_target"] = per_target

    if args.fit:
        fit, fit_targets = seg_rows(Path(args.fit), args.limit)
        fit_labels, _, fit_hidden, fit_projected = run(model, processor, fit, fit_targets, args.batch_size)
        print("\nlinear probe: which target does each [SEG] name? (fitted on --fit, scored on --data)\n")
        print("| features | accuracy | mistaken for |\n|---|---|---|")
        result["probe"] = {}
        for name, train_x, test_x in (
            ("language model [SEG] state", fit_hidden, hidden),
            ("projector output (SAM's prompt)", fit_projected, projected),
        ):
            accuracy, confusions = linear_probe(train_x, fit_labels, test_x, labels)
            mistakes = "; ".join(
                f"{t} → " + ", ".join(f"{g} {n}" for g, n in c.most_common(2)) for t, c in sorted(confusions.items())
            )
            print(f"| {name} | {accuracy:.3f} | {mistakes or '—'} |")
            result["probe"][name] = {"accuracy": accuracy, "confusions": {t: dict(c) for t, c in confusions.items()}}
        fit.unlink()
    data.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
