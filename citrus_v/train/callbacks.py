"""Training callbacks: per-step logs to ``logging.jsonl`` and a PNG of the loss curves at the end.

Neither stops a run when its file cannot be written (a full disk): each says so on stderr, and the run's
checkpoints, which do stop it with a message, decide whether training can go on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

from .. import objectives

LOSS_KEYS = (
    "loss", "lm_loss", "mask_bce", "mask_dice", "mask_iou", "video_mask_bce", "video_mask_dice", "video_mask_iou",
    "presence", *objectives.log_names(),
)  # fmt: skip


class JsonlLoggerCallback(TrainerCallback):
    """Appends every log record (with its step) to ``output_dir/logging.jsonl``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "logging.jsonl"
        self._failing = False  # the last append failed: warn once per run of failures, and when it recovers

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **logs}
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            if not self._failing:
                print(
                    f"warning: cannot append to {self.path} ({err}); the log records from step {state.global_step} "
                    "are missing from it until the disk has room (the console log has them)",
                    file=sys.stderr,
                    flush=True,
                )
            self._failing = True
            return
        if self._failing:
            print(f"{self.path}: writing again from step {state.global_step}", file=sys.stderr, flush=True)
        self._failing = False


def plot_loss_curves(log_file: str | Path, out_file: str | Path) -> Path | None:
    """Draw the loss curves recorded in ``log_file``; ``None`` when there is nothing to draw."""
    records = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    series = {k: [(r["step"], r[k]) for r in records if k in r] for k in LOSS_KEYS}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, label=key, linewidth=1.5)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("Training losses")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_file)
    plt.close(figure)
    return Path(out_file)


class LossCurveCallback(TrainerCallback):
    """Writes ``output_dir/loss_curves.png`` when training ends."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        log_file = self.output_dir / "logging.jsonl"
        if state.is_world_process_zero and log_file.is_file():
            out_file = self.output_dir / "loss_curves.png"
            try:
                plot_loss_curves(log_file, out_file)
            except OSError as err:
                print(f"warning: cannot write {out_file} ({err})", file=sys.stderr, flush=True)


def weight_digest(model) -> str:
    """SHA-256 over every parameter's bytes, in name order: equal digests mean equal weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class DdpDigestCallback(TrainerCallback):
    """In a multi-process run, each rank writes its weight digest to ``output_dir/ddp_digests/rankN.txt``
    at the end, so replicas that drifted apart are caught (they must be identical under DDP)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.folder = Path(output_dir) / "ddp_digests"

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.world_size <= 1 or model is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{args.process_index}.txt").write_text(weight_digest(model) + "\n")
