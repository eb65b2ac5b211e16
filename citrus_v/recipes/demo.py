"""``citrus-v demo``: data -> stage 3 -> stage 4 -> evaluation -> pictures, on a CPU, with no downloads.

Steps (each reuses the real command's code):
1. synthesise the corpus (``citrus-v data synth``) into ``OUT/data``;
2. take the tiny stage-1/2 checkpoint shipped with the package (:mod:`citrus_v.recipes.tiny_base`, made by
   ``citrus-v demo --make-base``), as upstream starts stages 3-4 from its stage-2 checkpoint; with
   ``--from-scratch`` (or when the package has none) build the random-init tiny preset instead;
3. stage 3 — everything trains, HookGrad 0.001 — on all tasks, mixed per task (``citrus-v sft --stage 3``);
4. stage 4 — seg projector + SAM 2 only — on the segmentation rows (``citrus-v sft --stage 4``);
5. evaluate on the held-out test split (``citrus-v eval``), plus the language control: the same
   segmentation evaluation with every ``[SEG]`` embedding replaced by the mean ``[SEG]`` embedding;
6. write ``OUT/report.md`` with the numbers, the targets, the loss curves and overlay pictures.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .bars import bar_rows, summary_value

TARGETS = {  # the demo's quality bar, on the held-out split
    "seg mean Dice": (">=", 0.80),
    "control Dice drop": (">=", 0.20),
    "[SEG] emitted": (">=", 0.95),
    "box JSON parsable": (">=", 0.95),
    "det Acc@IoU0.5": (">=", 0.50),
    "closed VQA accuracy": (">=", 0.85),
    "report ROUGE-L": (">=", 0.60),
    "doc field exact match": (">=", 0.80),
}


@dataclass
class DemoPlan:
    """How big each step is; ``--fast`` shrinks everything to a smoke run of about a minute."""

    images: int = 460
    stage3_steps: int = 600
    # the base's stage 4 already ran thousands of steps: more here barely moves the held-out Dice
    stage4_steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-3  # from random weights
    base_learning_rate: float = 2e-4  # stage 3 from the shipped stage-1/2 checkpoint
    # stage 4 trains only the projector and SAM 2 (small, far from converged): a higher rate suits them
    seg_learning_rate: float = 1e-3
    # share of lab reports among the images
    documents: float = 0.25
    # extra held-out images (test split only; the training images stay the same): a 10% split alone holds
    # too few closed questions and extraction fields to tell a bar met from one missed by a point or two
    test_images: int = 150
    # share of lab reports among stage 3's samples (the rest: the base's scan mix); fewer cost the base part
    # of its reading (chosen on the base corpus's own validation rows; docs/experiments/ has the runs)
    stage3_documents: float = 0.35
    # extra lab reports in the training split alone: with only the images' own (about 90) at that share, stage 3
    # shows each report some twenty times and the model learns those by heart instead of reading
    train_documents: int = 320
    eval_limit: int | None = None  # per task; None = the whole test split
    # CT/MR volumes (split 80/10/10), more held-out ones, and ultrasound clips (split 80/10/10)
    volumes: int = 40
    test_volumes: int = 12
    clips: int = 12
    # share of the volumes' and clips' grounded rows about a target that is not there (the 2-D rows keep only
    # their lesion-free scans, as the 2-D bars were set on)
    volume_absent_share: float = 0.15
    # share of volume and clip rows among stage 3's scan samples (the lab reports keep their share)
    volume_share: float = 0.08
    # and among stage 4's: with a larger share SAM 2 and the projector win back on the volumes what stage 3's
    # language-model steps moved, the 2-D masks holding (docs/experiments/ has the runs)
    stage4_volume_share: float = 0.4
    # frames of each volume or clip SAM 2 trains on in stage 4 (``--sam_train_frames``): fewer than the default
    # keep stage 4 at that share inside the demo's time, the volumes' Dice within a run's spread
    stage4_sam_train_frames: int = 2

    @classmethod
    def fast(cls) -> DemoPlan:
        return cls(images=60, stage3_steps=80, stage4_steps=40, eval_limit=6, test_images=0, train_documents=10,
                   volumes=4, test_volumes=1, clips=3)


def _say(message: str) -> None:
    print(message, flush=True)


def _sft(
    model: Path, dataset: list[str], out: Path, stage: int, steps: int, plan: DemoPlan, seed: int, lr: float,
    **flags: Any,
) -> Path:
    from .tiny_base import run_stage

    return run_stage(
        model, dataset, out, stage, steps, lr, plan.batch_size, seed, warmup_steps=20, log_every=30, **flags
    )


_TARGET_RE = re.compile(r"segment (?:the |all |every )?(.+?)(?: in this image| in the image)?[.?]", re.I)


def target_of(prompt: str) -> str:
    """The target a segmentation prompt names ("segment the left kidney" -> "left kidney")."""
    match = _TARGET_RE.search(prompt)
    if not match:
        return "other"
    target = match.group(1).strip().lower()
    return "every lesion" if re.search(r"\b(every|all)\b", prompt, re.I) and "lesion" in target else target


def read_predictions(path: Path) -> list[dict]:
    """The records of an eval run's ``predictions.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dice_per_target(records: list[dict]) -> dict[str, dict[str, float]]:
    """Mean Dice and count per named target, from an eval run's records (:func:`read_predictions`)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record.get("task") == "seg" and record.get("scores"):
            groups[target_of(record.get("prompt", ""))].append(float(record["scores"]["dice"]))
    return {t: {"dice": float(np.mean(v)), "n": len(v)} for t, v in sorted(groups.items())}


class MeanSegEmbedding:
    """Records what the ``[SEG]`` heads hand SAM 2 — the projected embedding, and the point head's output when
    the model has one — then replaces each by its mean over the run (the control)."""

    def __init__(self, model: torch.nn.Module) -> None:
        heads = [model.seg_projector, getattr(model, "seg_point_head", None)]
        self.heads = [head for head in heads if head is not None]
        self.seen: list[list[torch.Tensor]] = [[] for _ in self.heads]
        self.means: list[torch.Tensor] | None = None
        self.handles = [head.register_forward_hook(self._hook(i)) for i, head in enumerate(self.heads)]

    def _hook(self, index: int):
        def replace(module, args, output):
            if self.means is None:
                self.seen[index].append(output.detach().reshape(-1, output.shape[-1]))
                return output
            return self.means[index].to(output.dtype).expand_as(output).clone()

        return replace

    def freeze(self) -> int:
        """Switch from recording to replacing; returns how many ``[SEG]`` embeddings the mean is over."""
        if not self.seen[0]:
            raise RuntimeError("no [SEG] embedding was produced, so there is no mean to use for the control")
        stacked = [torch.cat(seen) for seen in self.seen]
        self.means = [s.mean(dim=0) for s in stacked]
        return stacked[0].shape[0]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _overlay_seg(record: dict, image: Image.Image, truth: np.ndarray, out: Path) -> None:
    from ..media import rle_to_mask

    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    mask = record.get("parsed") or {}
    pred = rle_to_mask(mask["mask"]) if mask.get("mask") else np.zeros(truth.shape, bool)
    rgb[pred, 0] = 0.45 * rgb[pred, 0] + 140
    rgb[truth, 1] = 0.45 * rgb[truth, 1] + 140
    picture = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.text((4, 4), f"{target_of(record['prompt'])}: Dice {record['scores']['dice']:.2f}", fill=(255, 255, 0))
    picture.save(out)


def _corners(box: list[float]) -> tuple[float, float, float, float]:
    """``box`` as (left, top, right, bottom): a model may write its corners in either order."""
    x0, y0, x1, y1 = box
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _overlay_boxes(record: dict, image: Image.Image, out: Path) -> None:
    picture = image.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    for box in (record.get("reference") or {}).get("boxes", []):
        draw.rectangle(_corners(box), outline=(0, 255, 0), width=2)
    for box in (record.get("parsed") or {}).get("boxes", []):
        draw.rectangle(_corners(box), outline=(255, 0, 0), width=2)
    draw.text((4, 4), "truth green, prediction red", fill=(255, 255, 0))
    picture.save(out)


def _text_card(record: dict, image: Image.Image, out: Path) -> None:
    """The image with the question, the reference and the model's answer under it."""
    width = max(image.width, 448)
    chars = width // 7  # the default font is about 6 px a character
    lines = [
        f"Q: {record.get('prompt', '')}",
        f"truth: {record.get('reference_text', '')}",
        f"model: {record.get('output', '')}",
    ]
    wrapped = []
    for line in lines:
        wrapped += [line[i : i + chars] for i in range(0, min(len(line), 6 * chars), chars)] or [""]
    card = Image.new("RGB", (width, image.height + 14 * len(wrapped) + 8), (20, 20, 20))
    card.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(card)
    for k, line in enumerate(wrapped):
        draw.text((4, image.height + 4 + 14 * k), line, fill=(230, 230, 230))
    card.save(out)


def write_overlays(eval_dir: Path, out: Path, per_task: int = 3) -> list[Path]:
    """Prediction-next-to-truth pictures for a few samples of each task."""
    from ..eval.loaders import LoadOptions, load_data
    from ..eval.references import load_images, reference_masks

    out.mkdir(parents=True, exist_ok=True)
    run = json.loads((eval_dir / "run.json").read_text())
    samples = {
        s.id: s for r in load_data([d.split("=", 1)[-1] for d in run["data"]], LoadOptions("test")) for s in r.samples
    }
    written: list[Path] = []
    counts: dict[str, int] = defaultdict(int)
    for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        task, sample = record.get("task"), samples.get(record.get("id"))
        if sample is None or record.get("status") == "failed" or counts[task] >= per_task:
            continue
        images = load_images(sample)
        if not images:
            continue
        path = out / f"{task}_{counts[task]}.png"
        if task == "seg":
            size = images[0].size
            masks = reference_masks(sample, size)
            truth = np.any(np.stack(masks), axis=0) if masks else np.zeros((size[1], size[0]), bool)
            _overlay_seg(record, images[0], truth, path)
        elif task == "det":
            _overlay_boxes(record, images[0], path)
        else:
            reference = sample.reference if isinstance(sample.reference, str) else json.dumps(sample.reference)
            record = {**record, "reference_text": reference}
            _text_card(record, images[0], path)
        counts[task] += 1
        written.append(path)
    return written


def write_montage(pictures: list[Path], out: Path, columns: int = 4, cell: int = 224) -> Path | None:
    """One contact sheet of ``pictures`` (each scaled to ``cell`` pixels high), ``columns`` to a row."""
    if not pictures:
        return None
    tiles = []
    for path in pictures:
        with Image.open(path) as image:
            width = round(image.width * cell / image.height)
            tiles.append(image.convert("RGB").resize((width, cell), Image.Resampling.LANCZOS))
    rows = [tiles[i : i + columns] for i in range(0, len(tiles), columns)]
    width = max(sum(t.width for t in row) + 4 * (len(row) - 1) for row in rows)
    sheet = Image.new("RGB", (width, len(rows) * cell + 4 * (len(rows) - 1)), (255, 255, 255))
    for r, row in enumerate(rows):
        x = 0
        for tile in row:
            sheet.paste(tile, (x, r * (cell + 4)))
            x += tile.width + 4
    sheet.save(out)
    return out


def headline_numbers(tasks: dict[str, Any], control: dict[str, Any] | None, records: list[dict]) -> dict:
    """The numbers the quality bar is about, from the eval summaries and the run's records
    (:func:`read_predictions`)."""

    seg = [r for r in records if r.get("task") == "seg" and r.get("status") != "failed"]
    det = [r for r in records if r.get("task") == "det" and r.get("status") != "failed"]
    # prompts with something to segment ("segment the lesion" on a clear image rightly gets no [SEG])
    targets = [r for r in seg if (r.get("reference") or {}).get("num_masks", 0) > 0]
    dice = summary_value(tasks, "seg", "dice")
    control_dice = (control or {}).get("dice")
    # the 2-D bar is about the scans' closed questions; those about volumes and clips are reported beside theirs
    closed = closed_correct(records, videos=False)
    return {
        "seg mean Dice": dice,
        "control Dice drop": None if dice is None or control_dice is None else dice - control_dice,
        "[SEG] emitted": float(np.mean(["[SEG]" in (r.get("output") or "") for r in targets])) if targets else None,
        "box JSON parsable": float(np.mean([r["status"] == "ok" for r in det])) if det else None,
        "det Acc@IoU0.5": summary_value(tasks, "det", "acc_iou50"),
        "closed VQA accuracy": float(np.mean(closed)) if closed else None,
        "report ROUGE-L": summary_value(tasks, "report", "rouge_l"),
        "doc field exact match": summary_value(tasks, "doc", "field_em"),
    }


def closed_correct(records: list[dict], videos: bool) -> list[float]:
    """Per closed question scored (of the scans, or with ``videos`` of volumes and clips): 1.0 right, 0.0 not."""
    return [
        float(r["scores"]["correct"])
        for r in records
        if r.get("task") == "vqa" and (r.get("reference") or {}).get("answer_type") == "closed"
        and bool(r.get("videos")) == videos and (r.get("scores") or {}).get("correct") is not None
    ]


def shipped_base() -> Path | None:
    """The packaged tiny stage-1/2 checkpoint, or None when this installation has none."""
    from .tiny_base import PACKAGED_BASE

    return PACKAGED_BASE if (PACKAGED_BASE / "model.safetensors").is_file() else None


class _Clock:
    """Seconds spent on each step of the demo, as ``metrics.json`` records them."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Record the time since the last lap as step ``name``."""
        self.timings[name] = round(time.monotonic() - self.last, 1)
        self.last = time.monotonic()

    def total(self) -> None:
        self.timings["total"] = round(time.monotonic() - self.started, 1)


def run_demo(
    out: str | Path = "demo_out",
    fast: bool = False,
    seed: int = 0,
    steps: int | None = None,
    from_scratch: bool = False,
    overwrite: bool = False,
) -> dict:
    """Run the whole demo into ``out``; return the headline numbers. ``out`` must be absent or empty unless
    ``overwrite`` is set, which replaces it."""
    from .output import prepare_output_dir
    from .tiny_base import split_by_task

    plan = DemoPlan.fast() if fast else DemoPlan()
    if steps is not None:
        plan.stage3_steps = plan.stage4_steps = steps
    out = prepare_output_dir(out, overwrite, "--out")
    clock = _Clock()
    _synthesise(out, plan, seed)
    clock.lap("data")
    shipped = None if from_scratch else shipped_base()
    base, lr = _start(shipped, out, plan, seed)
    clock.lap("build")
    files = split_by_task(out / "data" / "train.jsonl")
    stage3 = _stage3(files, base, out, plan, seed, lr)
    clock.lap("stage3")
    seg_lr = plan.seg_learning_rate if shipped is not None else lr
    checkpoint = _stage4(files, stage3, out, plan, seed, seg_lr)
    clock.lap("stage4")
    evaluation = _evaluate(checkpoint, out, plan, seed)
    clock.lap("eval")
    numbers = _write_results(evaluation, clock, out, plan, base)
    _say(f"\nreport: {out / 'report.md'}")
    _say(f"serve it:  citrus-v deploy --model {checkpoint} --port 8000 --served_model_name citrus-v-tiny")
    _say("open app:  citrus-v app --api http://127.0.0.1:8000/v1 --port 7860")
    return numbers


def _synthesise(out: Path, plan: DemoPlan, seed: int) -> None:
    """Step 1: the phantom corpus in ``out/data``."""
    from ..data.corpus import CorpusOptions, write_corpus

    extra = f" and {plan.test_images} more held-out ones" if plan.test_images else ""
    reports = f", {plan.train_documents} more lab reports to train on" if plan.train_documents else ""
    _say(f"[1/6] synthesising {plan.images} phantom images{extra}{reports}, {plan.volumes + plan.test_volumes} "
         f"volumes and {plan.clips} clips, and their rows")
    # the demo's bars were set on this mix: lesion-free scans only, no top-up of other absent-target rows
    options = CorpusOptions(
        n=plan.images, seed=seed, documents=plan.documents, test_images=plan.test_images,
        train_documents=plan.train_documents, absent_share=0.0,
        volumes=plan.volumes, test_volumes=plan.test_volumes, clips=plan.clips,
        volume_absent_share=plan.volume_absent_share,
    )
    summary = write_corpus(out / "data", options)
    _say(f"      rows: {summary.rows}")


def _start(shipped: Path | None, out: Path, plan: DemoPlan, seed: int) -> tuple[Path, float]:
    """Step 2: the checkpoint stage 3 starts from (the shipped base, else the random-init tiny preset in
    ``out/base``) and stage 3's learning rate for it."""
    from .presets import build_preset

    if shipped is not None:
        _say(f"[2/6] starting from the shipped tiny stage-1/2 checkpoint ({shipped})")
        return shipped, plan.base_learning_rate
    _say("[2/6] building the tiny preset (random weights)")
    return build_preset("tiny", out / "base", seed=seed), plan.learning_rate


def _stage3(files: dict[str, Path], base: Path, out: Path, plan: DemoPlan, seed: int, lr: float) -> Path:
    """Step 3: everything trains on all tasks, mixed per task, into ``out/stage3``."""
    from .tiny_base import SCAN_MIX, mixed_dataset, with_documents

    _say(f"[3/6] stage 3: everything trains (HookGrad 0.001), {plan.stage3_steps} steps")
    mix = with_documents(with_volumes(SCAN_MIX, STAGE3_VOLUME_MIX, plan.volume_share), plan.stage3_documents)
    mix = {task: share for task, share in mix.items() if task in files}
    dataset = mixed_dataset(files, mix, plan.stage3_steps * plan.batch_size)
    return _sft(base, dataset, out / "stage3", 3, plan.stage3_steps, plan, seed, lr, presence_loss_weight=1.0,
                train_propagation="per_frame")


def _stage4(files: dict[str, Path], stage3: Path, out: Path, plan: DemoPlan, seed: int, lr: float) -> Path:
    """Step 4: the seg projector and SAM 2 on the segmentation rows, into ``out/checkpoint``."""
    from .tiny_base import mixed_dataset

    _say(f"[4/6] stage 4: seg projector + SAM 2 (and its memory modules), {plan.stage4_steps} steps")
    mix = with_volumes({"segmentation": 1.0}, {"segmentation-3d": 1.0}, plan.stage4_volume_share)
    dataset = mixed_dataset(files, {task: share for task, share in mix.items() if task in files},
                            plan.stage4_steps * plan.batch_size)
    return _sft(stage3, dataset, out / "checkpoint", 4, plan.stage4_steps, plan, seed, lr,
                sam_train_frames=plan.stage4_sam_train_frames, **_volume_flags(stage3))


# the volumes' and clips' part of stage 3: their segmentation and their closed questions
STAGE3_VOLUME_MIX = {"segmentation-3d": 0.75, "vqa-closed-3d": 0.25}


def with_volumes(mix: dict[str, float], volumes: dict[str, float], share: float) -> dict[str, float]:
    """``mix`` scaled to ``1 - share`` and ``volumes`` (the volume and clip tasks) to ``share``."""
    if not 0 <= share < 1:
        raise ValueError(f"the volumes' share must be in [0, 1), got {share}")
    scale, total = sum(mix.values()), sum(volumes.values())
    return {
        **{task: value / scale * (1 - share) for task, value in mix.items()},
        **{task: value / total * share for task, value in volumes.items()},
    }


def _volume_flags(model: Path) -> dict[str, Any]:
    """Stage 4's flags for volume and clip rows: SAM 2's presence loss on, and each ``[SEG]`` meeting the frames
    as the checkpoint segments volumes at inference (:func:`~citrus_v.infer.volume_segmentation.default_propagation`).
    Stage 3 prompts each frame alone, as the memory modules train in stage 4 only."""
    from ..infer.volume_segmentation import default_propagation
    from ..modeling.configuration_citrus_v import CitrusVConfig

    return {"presence_loss_weight": 1.0, "train_propagation": default_propagation(CitrusVConfig.from_pretrained(model))}


@dataclass
class Evaluation:
    """Step 5's results: every task's summary, the control's numbers (None when it could not run), the volumes'
    propagation comparison and their pictures."""

    tasks: dict[str, Any]
    control: dict | None
    propagation: list[dict[str, Any]]
    pictures: list[Path]


def _evaluate(checkpoint: Path, out: Path, plan: DemoPlan, seed: int) -> Evaluation:
    """Step 5: the 2-D tasks on the held-out split into ``out/eval``, the mean-``[SEG]`` control into
    ``out/eval_control``, then the volumes and clips (:func:`_evaluate_volumes`)."""
    from ..eval.backends import InProcessBackend
    from ..eval.runner import EvalConfig, run_eval
    from ..infer.predictor import CitrusVPredictor

    _say("[5/6] evaluating on the held-out test split")
    predictor = CitrusVPredictor.from_pretrained(checkpoint)
    backend = InProcessBackend(predictor, batch_size=8, name=str(checkpoint))
    control_hook = MeanSegEmbedding(predictor.model)
    test = str(out / "data" / "test.jsonl")
    result = run_eval(
        EvalConfig(
            tasks=["seg", "det", "vqa", "report", "doc", "cot"],
            data=[test],
            out=out / "eval",
            limit=plan.eval_limit,
            seed=seed,
        ),
        backend,
    )
    control = None
    try:
        count = control_hook.freeze()
        control_result = run_eval(
            EvalConfig(tasks=["seg"], data=[test], out=out / "eval_control", limit=plan.eval_limit, seed=seed),
            backend,
        )
        control = {
            "dice": control_result.tasks["seg"]["overall"]["dice"],
            "embeddings": count,
            "per_target": dice_per_target(read_predictions(out / "eval_control" / "predictions.jsonl")),
        }
    except RuntimeError as err:
        _say(f"      control skipped: {err}")
    finally:
        control_hook.remove()
    volume_tasks, propagation, pictures = _evaluate_volumes(predictor, out, plan, seed)
    return Evaluation({**result.tasks, **volume_tasks}, control, propagation, pictures)


def _evaluate_volumes(predictor: Any, out: Path, plan: DemoPlan, seed: int) -> tuple[dict, list[dict], list[Path]]:
    """The held-out volumes and clips (``seg3d``) and absent targets (``absent``) into ``out/eval_volumes``, with
    the checkpoint's propagation; with SAM 2's memory modules, ``seg3d`` again the other way into
    ``out/eval_volumes_{mode}``; then pictures of a volume and a clip. Returns the task summaries, the comparison
    rows and the pictures."""
    from ..eval.backends import InProcessBackend
    from ..eval.runner import EvalConfig, run_eval
    from ..infer.predictor import CitrusVPredictor
    from .demo_volumes import propagation_row, volume_pictures, write_propagation

    if plan.volumes + plan.test_volumes + plan.clips == 0:
        return {}, [], []
    test = str(out / "data" / "test.jsonl")
    backend = InProcessBackend(predictor, batch_size=8, name="checkpoint")
    config = EvalConfig(tasks=["seg3d", "absent"], data=[test], out=out / "eval_volumes", limit=plan.eval_limit,
                        seed=seed)
    result = run_eval(config, backend)
    rows = [propagation_row(result.tasks, predictor.propagation)]
    if predictor.model.propagator is not None:
        other = "per_frame" if predictor.propagation == "memory" else "memory"
        again = CitrusVPredictor(predictor.model, predictor.processor, propagation=other)
        config = EvalConfig(tasks=["seg3d"], data=[test], out=out / f"eval_volumes_{other}", limit=plan.eval_limit,
                            seed=seed)
        rows.append(propagation_row(run_eval(config, InProcessBackend(again, batch_size=8)).tasks, other))
    write_propagation(rows, out / "propagation.json")
    return result.tasks, rows, volume_pictures(backend, Path(test), out / "overlays")


def _write_results(evaluation: Evaluation, clock: _Clock, out: Path, plan: DemoPlan, base: Path) -> dict:
    """Step 6: loss curves, overlays, ``out/metrics.json`` and ``out/report.md``; returns the headline numbers."""
    from ..train.callbacks import plot_loss_curves
    from .demo_volumes import VOLUME_CLOSED, VOLUME_TARGETS, volume_numbers, volume_section

    _say("[6/6] writing the report and pictures")
    curves = {}
    for stage, folder in (("stage3", "stage3"), ("stage4", "checkpoint")):
        log = out / folder / "logging.jsonl"
        if log.is_file():
            curves[stage] = plot_loss_curves(log, out / f"loss_{stage}.png")
    overlays = write_overlays(out / "eval", out / "overlays")
    write_montage([p for p in overlays if p.stem.startswith(("seg_", "det_"))], out / "overlays.png")
    control = evaluation.control
    records = read_predictions(out / "eval" / "predictions.jsonl")
    numbers = {**headline_numbers(evaluation.tasks, control, records), **volume_numbers(evaluation.tasks)}
    volume_closed = closed_correct(records, videos=True)
    numbers[VOLUME_CLOSED] = float(np.mean(volume_closed)) if volume_closed else None
    per_target = dice_per_target(records)
    clock.lap("report")
    clock.total()
    metrics = {
        "plan": plan.__dict__,
        "base": str(base),
        "headline": numbers,
        "targets": {**TARGETS, **VOLUME_TARGETS},
        "dice_per_target": per_target,
        "control": control,
        "timings_s": clock.timings,
        "propagation": evaluation.propagation,
        "tasks": evaluation.tasks,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    report = _report(numbers, per_target, control, clock.timings, overlays, curves, plan, out, base)
    report += volume_section(numbers, evaluation.propagation, evaluation.pictures, out)
    (out / "report.md").write_text(report)
    return numbers


def _report(numbers, per_target, control, timings, overlays, curves, plan, out: Path, base: Path) -> str:
    lines = [
        "# Citrus-V demo",
        "",
        f"Started from: `{base}`",
        "",
        f"Plan: {plan.__dict__}",
        "",
        f"Timings (s): {timings}",
        "",
        "## Quality bar (held-out test split)",
        "",
        "| measure | value | target | status |",
        "|---|---|---|---|",
    ]
    lines += bar_rows(numbers, TARGETS)
    lines += ["", "## Dice per target", "", "| target | n | Dice | Dice with mean [SEG] (control) |"]
    lines.append("|---|---|---|---|")
    control_targets = (control or {}).get("per_target", {})
    for target, row in per_target.items():
        other = control_targets.get(target, {}).get("dice")
        lines.append(f"| {target} | {row['n']} | {row['dice']:.3f} | {'n/a' if other is None else f'{other:.3f}'} |")
    lines += ["", "Full metrics per task: `eval/report.md`; every answer: `eval/predictions.jsonl`.", ""]
    for stage, path in curves.items():
        if path:
            lines.append(f"![{stage} losses]({path.relative_to(out)})")
    lines.append("")
    if (out / "overlays.png").is_file():
        lines += [
            "Segmentation (prediction red, truth green, overlap yellow); detection (truth green, prediction red):",
            "",
            "![overlays](overlays.png)",
            "",
        ]
    lines += [f"![{p.stem}]({p.relative_to(out)})" for p in overlays]
    return "\n".join(lines) + "\n"
