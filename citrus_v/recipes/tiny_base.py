"""The tiny stage-1/2 checkpoint the demo starts from, and the recipe that makes it.

Upstream runs stages 3 and 4 from a checkpoint that already went through stages 1-2 (and from Meta's
pretrained SAM 2). The demo does the same with a tiny model: ``citrus_v/weights/tiny-base`` ships with
the package, made by one command::

    citrus-v demo --make-base citrus_v/weights/tiny-base --overwrite

which synthesises its own corpus (a different seed from the demo's, so the demo's held-out images are
new to it), builds the tiny preset and runs ``citrus-v sft`` stages on it, in this order:

1. stage 2 — the whole MLLM — in three parts, each mixed by ``FILE#N`` per task (more detection and closed
   questions than the corpus holds), with the training-only objectives of :mod:`citrus_v.objectives`
   (the scans' rows carry lesion annotations, the lab reports a character map):
   first the scans' tasks alone (:data:`SCAN_MIX`), then every task with 45% of the samples lab reports
   (:data:`READING_MIX`), where the reading objectives teach the reading, then the scans again with a third
   lab reports at half the rate (:data:`REFRESH_MIX`). Reading comes second because learning it from the
   start cost the tiny model its eye for lesions (docs/experiments/ keeps the measurements). Reading in turn
   costs counting, which the third part wins back in part;
2. stage 4 — seg projector and SAM 2 — on the segmentation rows: SAM is random in the tiny preset, so this
   stands in for loading Meta's pretrained SAM 2 weights. It runs in two parts, as SAM itself learns
   prompts before it learns language: first every training mask also gets a positive point inside its
   target (``--point_prompt_probability 1``), so SAM's decoder learns to select by position; then a fifth
   of them do, and the rest get the point the ``[SEG]`` point head predicts
   (:mod:`citrus_v.modeling.point_head`), as inference does;
3. stage 2 once more, on the closed questions alone with the vision tower frozen (``--freeze_vit``; the seg
   modules are frozen in stage 2 anyway), so that only the language model and the aligner learn. In the
   mixed parts the counting questions are a few percent of the samples, and the language model read the
   count less often than its image tokens hold it; this part closes most of that gap. It comes after
   stage 4 because it does not touch the tower or SAM 2.

Each stage's ``logging.jsonl`` and loss curves stay next to the checkpoint (``recipe/``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checkpoint_layout import SHIPPED_MODELS

PACKAGED_BASE = SHIPPED_MODELS["tiny-base"]
# files of a training run's folder that are not part of the checkpoint
RUN_RECORDS = ("training_args.bin", "logging.jsonl", "loss_curves.png", "sft_args.json")

# share of each task in the first part of stage 2 (corpus task names): the scans only
SCAN_MIX: dict[str, float] = {
    "detection": 0.30,
    "vqa-closed": 0.20,
    "segmentation": 0.12,
    "report": 0.08,
    "cot": 0.08,
    "vqa-open": 0.07,
}


def with_documents(mix: dict[str, float], share: float) -> dict[str, float]:
    """``mix`` scaled to ``1 - share``, with lab reports (task ``document``) as the remaining ``share``."""
    if not 0 <= share < 1:
        raise ValueError(f"the documents' share must be in [0, 1), got {share}")
    total = sum(mix.values())
    return {**{task: value / total * (1 - share) for task, value in mix.items()}, "document": share}


# the second part of stage 2, where reading is learnt: every task, 45% of the samples lab reports; the
# closed questions (counting among them) keep their share of the scans part, the other scan tasks give way
READING_MIX: dict[str, float] = {
    "document": 0.45,
    "vqa-closed": 0.20,
    "detection": 0.15,
    "segmentation": 0.07,
    "report": 0.05,
    "cot": 0.04,
    "vqa-open": 0.04,
}
# the third part: the scans' mix again, with lab reports kept at about a third, at a lower rate; counting
# is what reading costs the tiny model most
REFRESH_MIX: dict[str, float] = {
    "document": 0.30,
    "vqa-closed": 0.14,
    "detection": 0.21,
    "segmentation": 0.084,
    "report": 0.056,
    "cot": 0.056,
    "vqa-open": 0.049,
}


@dataclass
class BaseRecipe:
    """Everything that decides the tiny base checkpoint."""

    images: int = 3600
    # 1,350 lab reports next to 2,250 scans: reading is learnt from the reports alone
    documents: float = 0.375
    corpus_seed: int = 1001
    seed: int = 0
    batch_size: int = 8
    # stage 2: the scans' tasks first, then the reading part (each its own cosine schedule)
    stage2_steps: int = 3000
    reading_steps: int = 1500
    stage2_learning_rate: float = 1e-3
    reading_learning_rate: float = 1e-3
    refresh_steps: int = 600
    refresh_learning_rate: float = 5e-4
    # SAM and the projector are frozen and random in stage 2: keep their mask losses from pulling on the LLM
    stage2_hook_grad_factor: float = 0.001
    save_steps: int = 750
    # stage 4: first with a real point on every mask, then on this share of them (the rest: predicted points)
    stage4_point_steps: int = 1500
    stage4_steps: int = 1500
    stage4_point_prompt_probability: float = 0.2
    stage4_learning_rate: float = 1e-3
    # last: the closed questions alone, the tower frozen, so the language model learns to read the count
    closed_steps: int = 600
    closed_learning_rate: float = 2e-4
    warmup_steps: int = 100
    mix: dict[str, float] = field(default_factory=lambda: dict(SCAN_MIX))
    reading_mix: dict[str, float] = field(default_factory=lambda: dict(READING_MIX))
    refresh_mix: dict[str, float] = field(default_factory=lambda: dict(REFRESH_MIX))


def split_by_task(train: Path) -> dict[str, Path]:
    """Write one ``{stem}.{task}.jsonl`` per ``task`` of ``train`` next to it (row paths stay relative to
    the same folder); return task -> file."""
    groups: dict[str, list[str]] = {}
    for line in train.read_text(encoding="utf-8").splitlines():
        if line.strip():
            groups.setdefault(json.loads(line).get("task", "other"), []).append(line)
    files = {}
    for task, lines in sorted(groups.items()):
        files[task] = train.with_name(f"{train.stem}.{task}.jsonl")
        files[task].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def mixed_dataset(files: dict[str, Path], mix: dict[str, float], samples: int) -> list[str]:
    """``FILE#N`` entries giving each task its share of ``samples`` (files repeat as needed)."""
    missing = sorted(set(mix) - set(files))
    if missing:
        raise ValueError(f"the corpus has no rows for task(s) {', '.join(missing)}: they are in the mix")
    total = sum(mix.values())
    return [f"{files[task]}#{max(1, round(samples * share / total))}" for task, share in mix.items()]


def run_stage(
    model: Path,
    dataset: list[str],
    out: Path,
    stage: int,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    warmup_steps: int,
    log_every: int,
    save_steps: int | None = None,
    hook_grad_factor: float | None = None,
    point_prompt_probability: float | None = None,
    freeze_vit: bool | None = None,
) -> Path:
    """One ``citrus-v sft --stage N`` run as the demo and the base recipe use it (cosine decay, no weight decay,
    one loader worker); checkpoints every ``save_steps`` (the last two kept), none when None; ``freeze_vit``
    as upstream's flag (None: the stage decides)."""
    from ..train.arguments import SftArguments
    from ..train.sft import run_sft

    args = SftArguments(
        model=str(model),
        dataset=dataset,
        output_dir=str(out),
        stage=stage,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(warmup_steps, steps // 10),
        weight_decay=0.0,
        adam_beta2=0.999,  # what the demo and the shipped base were trained with, as upstream's stage 3-4 lines pass
        gradient_checkpointing=False,  # the tiny model fits in memory; recomputing would only slow the CPU
        max_length=1024,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=2,
        hook_grad_factor=hook_grad_factor,
        point_prompt_probability=point_prompt_probability,
        freeze_vit=freeze_vit,
        logging_steps=max(1, steps // log_every),
        dataloader_num_workers=1,  # decode DICOM/NIfTI and encode the next batch while this one trains
        report_to=["none"],
        overwrite_output_dir=True,
        seed=seed,
    )
    return run_sft(args)


def _stage(
    model: Path, dataset: list[str], out: Path, stage: int, steps: int, lr: float, recipe: BaseRecipe,
    hook_grad_factor: float | None = None, point_prompt_probability: float | None = None,
    freeze_vit: bool | None = None,
) -> Path:
    return run_stage(
        model, dataset, out, stage, steps, lr, recipe.batch_size, recipe.seed, recipe.warmup_steps, 100,
        save_steps=recipe.save_steps, hook_grad_factor=hook_grad_factor,
        point_prompt_probability=point_prompt_probability, freeze_vit=freeze_vit,
    )


def write_base(
    out: Path, stages: dict[str, Path], recipe: BaseRecipe, timings: dict[str, float], overwrite: bool = False
) -> None:
    """Write the base folder ``out``: the model and processor files of the last of ``stages`` (name -> run
    folder, in order), and in ``out/recipe`` each stage's log and loss curves, the recipe and the timings.
    ``out`` must be absent or empty unless ``overwrite`` is set, which replaces it."""
    import torch

    from ..train.callbacks import plot_loss_curves
    from .output import prepare_output_dir

    last = list(stages.values())[-1]
    prepare_output_dir(out, overwrite, "--make-base folder")
    for item in last.iterdir():
        # the model and processor files; the run's own records go to recipe/
        if item.is_file() and item.name not in RUN_RECORDS:
            shutil.copy2(item, out / item.name)
    notes = out / "recipe"
    notes.mkdir()
    for stage, folder in stages.items():
        log = folder / "logging.jsonl"
        if log.is_file():
            shutil.copy2(log, notes / f"{stage}_logging.jsonl")
            plot_loss_curves(log, notes / f"loss_{stage}.png")
    record = {"recipe": asdict(recipe), "timings_s": timings, "torch_threads": torch.get_num_threads()}
    (notes / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")


def stage2_parts(recipe: BaseRecipe) -> list[tuple[str, str, dict[str, float], int, float]]:
    """Stage 2 in three parts, each from the one before, with its own mix, length and rate:
    (name, what it teaches, mix, steps, learning rate)."""
    return [
        ("stage2", "the scans: the whole MLLM", recipe.mix, recipe.stage2_steps, recipe.stage2_learning_rate),
        (
            "stage2_reading",
            "reading: every task with the lab reports",
            recipe.reading_mix,
            recipe.reading_steps,
            recipe.reading_learning_rate,
        ),
        (
            "stage2_refresh",
            "refresh: the scans with a third lab reports",
            recipe.refresh_mix,
            recipe.refresh_steps,
            recipe.refresh_learning_rate,
        ),
    ]


def make_base(
    out: str | Path, work: str | Path | None = None, recipe: BaseRecipe | None = None, overwrite: bool = False
) -> Path:
    """Run the recipe and write the tiny base checkpoint to ``out`` (with its curves in ``out/recipe``), its
    runs in ``work`` (default: ``OUT-work`` next to ``out``). Either folder must be absent or empty unless
    ``overwrite`` is set, which replaces them; both are checked before anything runs."""
    from ..data.corpus import CorpusOptions, write_corpus
    from .output import check_output_dir, prepare_output_dir
    from .presets import build_preset

    recipe = recipe or BaseRecipe()
    out = Path(out)
    work = Path(work) if work is not None else out.parent / f"{out.name}-work"
    check_output_dir(out, overwrite, "--make-base folder")
    prepare_output_dir(work, overwrite, "--make-base folder")
    timings: dict[str, float] = {}
    started = time.monotonic()
    print(f"[1/7] synthesising {recipe.images} images (seed {recipe.corpus_seed})", flush=True)
    write_corpus(work / "data", CorpusOptions(n=recipe.images, seed=recipe.corpus_seed, documents=recipe.documents))
    files = split_by_task(work / "data" / "train.jsonl")
    timings["data"] = round(time.monotonic() - started, 1)
    print("[2/7] building the tiny preset", flush=True)
    base = build_preset("tiny", work / "preset", seed=recipe.seed)
    parts: dict[str, Path] = {}
    stage2 = base
    for number, (name, what, mix, steps, lr) in enumerate(stage2_parts(recipe), start=3):
        t = time.monotonic()
        print(f"[{number}/7] stage 2, {what}, {steps} steps", flush=True)
        dataset = mixed_dataset(files, mix, steps * recipe.batch_size)
        stage2 = _stage(
            stage2, dataset, work / name.replace("_", "-"), 2, steps, lr, recipe,
            hook_grad_factor=recipe.stage2_hook_grad_factor,
        )
        parts[name] = stage2
        timings[name] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    steps = recipe.stage4_point_steps + recipe.stage4_steps
    print(f"[6/7] stage 4: seg projector + SAM 2, {steps} steps ({recipe.stage4_point_steps} with points)", flush=True)
    seg = [str(files["segmentation"])]
    points = _stage(
        stage2, seg, work / "stage4-points", 4, recipe.stage4_point_steps, recipe.stage4_learning_rate, recipe,
        point_prompt_probability=1.0,
    )
    stage4 = _stage(
        points, seg, work / "stage4", 4, recipe.stage4_steps, recipe.stage4_learning_rate, recipe,
        point_prompt_probability=recipe.stage4_point_prompt_probability,
    )
    timings["stage4"] = round(time.monotonic() - t, 1)
    parts.update(stage4_points=points, stage4=stage4)
    t = time.monotonic()
    print(f"[7/7] stage 2, the closed questions alone with the vision tower frozen, {recipe.closed_steps} steps",
          flush=True)
    # no [SEG] in these rows, so no HookGrad either: the stage's own factor (1.0) is what the base keeps
    parts["stage2_closed"] = _stage(
        stage4, [str(files["vqa-closed"])], work / "stage2-closed", 2, recipe.closed_steps,
        recipe.closed_learning_rate, recipe, freeze_vit=True,
    )
    timings["stage2_closed"] = round(time.monotonic() - t, 1)

    timings["total"] = round(time.monotonic() - started, 1)
    write_base(out, parts, recipe, timings, overwrite=overwrite)
    print(f"wrote the tiny base checkpoint to {out} in {timings['total']:.0f} s", flush=True)
    return out
