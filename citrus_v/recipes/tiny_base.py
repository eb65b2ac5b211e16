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
   stage 4 because it does not touch the tower or SAM 2;
4. volumes and clips (:func:`volume_parts`; the corpus gains CT/MR volumes and ultrasound clips, a share of
   their questions about targets that are not there): stage 3 on them beside the 2-D tasks (the language
   model learns to answer about a video, SAM 2 to take a ``[SEG]`` about one on each frame, with its presence
   loss), then stage 4 on the 2-D and 3-D segmentation rows with SAM 2's memory carrying each mask through the
   training frames, so that the memory modules (in the tiny preset since these parts) learn to propagate;
5. the point head fitted on the frozen language model's ``[SEG]`` states of the 2-D and 3-D segmentation rows
   (:func:`point_fit_part`, :mod:`citrus_v.train.point_head_fit`): stage 4's point objective run to
   convergence, which its steps above do not reach. Where a volume's target is, is SAM 2's point; a point
   on the wrong side of the body is a mask on the wrong organ.

Each stage's ``logging.jsonl`` and loss curves stay next to the checkpoint (``recipe/``), and
``recipe/recipe.json`` lists the parts the base went through. ``--base_from DIR`` continues a base made before the
recipe had its later parts: the parts it lists are not run again (the 2-D images of the corpus are the same), it
gains the memory modules, and the rest run from it::

    citrus-v demo --make_base citrus_v/weights/tiny-base-new --base_from tiny-base
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint_layout import SHIPPED_MODELS, CheckpointError, resolve_model

if TYPE_CHECKING:
    from ..data.corpus import CorpusOptions
    from ..train.point_head_fit import PointFitResult

PACKAGED_BASE = SHIPPED_MODELS["tiny-base"]

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


class BaseRecipeError(ValueError):
    """A ``--base_from`` folder the recipe cannot continue from, with the fix in the message."""


# the volumes' part: volume and clip rows a little over half the samples (most of them segmentation: the point
# head learns where a volume's target is from them), lab reports near a fifth (with fewer the base's reading
# slips), the scans' tasks the rest
VOLUME_MIX: dict[str, float] = {
    "segmentation-3d": 0.45,
    "vqa-closed-3d": 0.08,
    "segmentation": 0.08,
    "detection": 0.07,
    "vqa-closed": 0.07,
    "report": 0.025,
    "cot": 0.02,
    "vqa-open": 0.02,
    "document": 0.185,
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
    # volumes and clips (CorpusOptions' names), and their absent targets
    volumes: int = 160
    clips: int = 40
    absent_share: float = 0.15
    # last: stage 3 on volumes and clips beside the 2-D tasks, then stage 4 with SAM 2's memory
    volume_steps: int = 1800
    volume_learning_rate: float = 5e-4
    volume_mix: dict[str, float] = field(default_factory=lambda: dict(VOLUME_MIX))
    memory_steps: int = 600
    presence_loss_weight: float = 1.0
    # last: the point head fitted to convergence on the frozen language model's [SEG] states of the 2-D and 3-D
    # segmentation rows (stage 4's point objective; the steps above leave it short of that)
    point_fit_epochs: int = 100
    point_fit_learning_rate: float = 1e-3
    # how the base segments a volume unless asked otherwise (config.propagation): on held-out volumes each frame
    # prompted alone scores far above the tiny memory modules' propagation (docs/experiments/)
    propagation: str = "per_frame"

    def corpus_options(self) -> CorpusOptions:
        """The recipe's corpus: the 2-D images as the first parts had them (lesion-free scans the only absent
        targets among them), then the volumes and clips (from their own random streams) with ``absent_share``
        of their grounded rows about absent targets."""
        from ..data.corpus import CorpusOptions

        return CorpusOptions(
            n=self.images, seed=self.corpus_seed, documents=self.documents, volumes=self.volumes, clips=self.clips,
            absent_share=0.0, volume_absent_share=self.absent_share,
        )


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
    **flags: Any,
) -> Path:
    """One ``citrus-v sft --stage N`` run as the demo and the base recipe use it (cosine decay, no weight decay,
    one loader worker); checkpoints every ``save_steps`` (the last two kept), none when None; ``freeze_vit``
    as upstream's flag (None: the stage decides); ``flags``: more ``citrus-v sft`` flags by name (e.g.
    ``train_propagation="memory"``)."""
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
        **flags,
    )
    return run_sft(args)


def _stage(
    model: Path, dataset: list[str], out: Path, stage: int, steps: int, lr: float, recipe: BaseRecipe,
    hook_grad_factor: float | None = None, point_prompt_probability: float | None = None,
    freeze_vit: bool | None = None, **flags: Any,
) -> Path:
    return run_stage(
        model, dataset, out, stage, steps, lr, recipe.batch_size, recipe.seed, recipe.warmup_steps, 100,
        save_steps=recipe.save_steps, hook_grad_factor=hook_grad_factor,
        point_prompt_probability=point_prompt_probability, freeze_vit=freeze_vit, **flags,
    )


def write_base(
    out: Path,
    stages: dict[str, Path],
    recipe: BaseRecipe,
    timings: dict[str, float],
    overwrite: bool = False,
    earlier: Path | None = None,
    earlier_parts: Sequence[str] = (),
) -> None:
    """Write the base folder ``out``: the model and processor files of the last of ``stages`` (name -> run
    folder, in order), and in ``out/recipe`` each stage's log and loss curves, the recipe, the parts and the
    timings; ``earlier``: the base these stages continued from (after its ``earlier_parts``), whose records are
    kept beside them.
    ``out`` must be absent or empty unless ``overwrite`` is set, which replaces it."""
    import torch

    from ..train.callbacks import plot_loss_curves
    from ..train.point_head_fit import FIT_RECORD, RUN_RECORDS
    from .output import prepare_output_dir

    last = list(stages.values())[-1]
    prepare_output_dir(out, overwrite, "--make-base folder")
    for item in last.iterdir():
        # the model and processor files; the run's own records go to recipe/
        if item.is_file() and item.name not in RUN_RECORDS:
            shutil.copy2(item, out / item.name)
    if (out / "config.json").is_file():
        config = json.loads((out / "config.json").read_text())
        config["propagation"] = recipe.propagation
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _offline_tokenizer(out / "tokenizer_config.json")
    notes = out / "recipe"
    notes.mkdir()
    record: dict = {"recipe": asdict(recipe), "parts": list(stages), "timings_s": timings}
    if earlier is not None:
        before = json.loads((earlier / "recipe" / "recipe.json").read_text())
        for item in (earlier / "recipe").iterdir():
            if item.is_file() and item.name != "recipe.json":
                shutil.copy2(item, notes / item.name)
        # the earlier base's own record of what it continued from, kept one level down
        earlier_record = {"parts": list(earlier_parts), "timings_s": before.get("timings_s", {})}
        if "continued_from" in before:
            earlier_record["continued_from"] = before["continued_from"]
        record.update(parts=[*earlier_parts, *stages], continued_from=earlier_record)
    for stage, folder in stages.items():
        if (folder / FIT_RECORD).is_file():
            shutil.copy2(folder / FIT_RECORD, notes / f"{stage}_fit.json")
        log = folder / "logging.jsonl"
        if log.is_file():
            shutil.copy2(log, notes / f"{stage}_logging.jsonl")
            plot_loss_curves(log, notes / f"loss_{stage}.png")
    record["torch_threads"] = torch.get_num_threads()
    (notes / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")


def _offline_tokenizer(path: Path) -> None:
    """The base's tokenizer loads from its own folder only: the tokenizer saves the ``local_files_only`` it was
    loaded with, which is false when the recipe ran without ``HF_HUB_OFFLINE``."""
    if path.is_file():
        config = json.loads(path.read_text())
        config["local_files_only"] = True
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


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


@dataclass
class Part:
    """One training run of the recipe: ``name`` (its folder and its record in ``recipe/``), what it teaches, and
    how it runs from the checkpoint before it (``run(model) -> trained folder``)."""

    name: str
    what: str
    run: Callable[[Path], Path]


def recipe_parts(recipe: BaseRecipe, files: dict[str, Path], work: Path) -> list[Part]:
    """Every part of the recipe, in order, each from the checkpoint the one before it wrote."""

    def stage2(name: str, mix: dict[str, float], steps: int, lr: float) -> Callable[[Path], Path]:
        return lambda model: _stage(
            model, mixed_dataset(files, mix, steps * recipe.batch_size), work / name.replace("_", "-"), 2, steps,
            lr, recipe, hook_grad_factor=recipe.stage2_hook_grad_factor,
        )

    seg = [str(files["segmentation"])]
    parts = [Part(name, what, stage2(name, mix, steps, lr)) for name, what, mix, steps, lr in stage2_parts(recipe)]
    parts += [
        Part(
            "stage4_points", f"stage 4: seg projector + SAM 2 with a point on every mask, {recipe.stage4_point_steps} "
            "steps",
            lambda model: _stage(
                model, seg, work / "stage4-points", 4, recipe.stage4_point_steps, recipe.stage4_learning_rate,
                recipe, point_prompt_probability=1.0,
            ),
        ),
        Part(
            "stage4", f"stage 4: seg projector + SAM 2 with predicted points, {recipe.stage4_steps} steps",
            lambda model: _stage(
                model, seg, work / "stage4", 4, recipe.stage4_steps, recipe.stage4_learning_rate, recipe,
                point_prompt_probability=recipe.stage4_point_prompt_probability,
            ),
        ),
        # no [SEG] in these rows, so no HookGrad either: the stage's own factor (1.0) is what the base keeps
        Part(
            "stage2_closed", f"stage 2: the closed questions alone with the vision tower frozen, {recipe.closed_steps} "
            "steps",
            lambda model: _stage(
                model, [str(files["vqa-closed"])], work / "stage2-closed", 2, recipe.closed_steps,
                recipe.closed_learning_rate, recipe, freeze_vit=True,
            ),
        ),
    ]
    return parts + volume_parts(recipe, files, work) + [point_fit_part(recipe, files, work)]


def volume_parts(recipe: BaseRecipe, files: dict[str, Path], work: Path) -> list[Part]:
    """The parts on volumes and clips: stage 3 on a mix of volume, clip and 2-D rows (the language model learns
    to answer about a video, SAM 2 to take a [SEG] about one, the presence loss on), then stage 4 on the 2-D and
    3-D segmentation rows with SAM 2's memory carrying each mask through the training frames, so the memory
    modules train."""
    presence = {"presence_loss_weight": recipe.presence_loss_weight}
    seg = [str(files["segmentation"]), str(files["segmentation-3d"])] if "segmentation-3d" in files else []
    return [
        Part(
            "stage3_volumes", f"stage 3: volumes and clips beside the 2-D tasks, {recipe.volume_steps} steps",
            lambda model: _stage(
                model, mixed_dataset(files, recipe.volume_mix, recipe.volume_steps * recipe.batch_size),
                work / "stage3-volumes", 3, recipe.volume_steps, recipe.volume_learning_rate, recipe,
                hook_grad_factor=recipe.stage2_hook_grad_factor, train_propagation="per_frame", **presence,
            ),
        ),
        Part(
            "stage4_memory", f"stage 4: seg projector, SAM 2 and its memory modules, {recipe.memory_steps} steps",
            lambda model: _stage(
                model, seg, work / "stage4-memory", 4, recipe.memory_steps, recipe.stage4_learning_rate, recipe,
                point_prompt_probability=recipe.stage4_point_prompt_probability, train_propagation="memory",
                **presence,
            ),
        ),
    ]


def point_fit_part(recipe: BaseRecipe, files: dict[str, Path], work: Path) -> Part:
    """The last part: the point head fitted on the ``[SEG]`` states of the 2-D and 3-D segmentation rows
    (:mod:`citrus_v.train.point_head_fit`), everything else as the part before left it."""
    from ..train.point_head_fit import PointFitOptions, run_point_fit

    rows = [str(files[task]) for task in ("segmentation", "segmentation-3d") if task in files]
    options = PointFitOptions(
        epochs=recipe.point_fit_epochs, learning_rate=recipe.point_fit_learning_rate, seed=recipe.seed
    )
    return Part(
        "point_head", f"the point head fitted on cached [SEG] states, {recipe.point_fit_epochs} epochs",
        lambda model: _fitted(run_point_fit(model, rows, work / "point-head", options), work / "point-head"),
    )


def _fitted(result: PointFitResult, out: Path) -> Path:
    """``out``, once the fit's numbers are said."""
    _say(
        f"      point head: {result.states} [SEG] states of {result.rows} rows; held-out error "
        f"{result.held_out_error_px_before} -> {result.held_out_error_px_after} px"
    )
    return out


def _recipe_record(base: Path) -> Path:
    """``base``'s ``recipe/recipe.json``; a clear error when the folder has none."""
    record = base / "recipe" / "recipe.json"
    if not record.is_file():
        raise BaseRecipeError(f"{record} is missing: --base_from takes a folder written by citrus-v demo --make_base")
    return record


def parts_done(base: Path, names: list[str]) -> list[str]:
    """The parts of the recipe (``names``, in order) a base folder written by :func:`write_base` went through:
    its ``recipe/recipe.json`` lists them; a base written before it did has a log of each in ``recipe/``."""
    listed = json.loads(_recipe_record(base).read_text()).get("parts")
    if listed is not None:
        return list(listed)
    return [name for name in names if (base / "recipe" / f"{name}_logging.jsonl").is_file()]


def continuation_start(base_from: Path, work: Path, seed: int) -> Path:
    """The model the remaining parts start from: ``base_from`` itself when it has SAM 2's memory modules (a base
    that went through a volume part keeps the ones it trained), else a copy of it in ``work`` that gains the
    tiny preset's (:func:`~citrus_v.recipes.presets.add_memory_modules`)."""
    from .presets import add_memory_modules, has_memory_modules

    if has_memory_modules(base_from):
        return base_from
    return add_memory_modules(base_from, work, seed=seed)


def make_base(
    out: str | Path,
    work: str | Path | None = None,
    recipe: BaseRecipe | None = None,
    overwrite: bool = False,
    base_from: str | Path | None = None,
) -> Path:
    """Run the recipe and write the tiny base checkpoint to ``out`` (with its curves in ``out/recipe``), its
    runs in ``work`` (default: ``OUT-work`` next to ``out``). Either folder must be absent or empty unless
    ``overwrite`` is set, which replaces them; both are checked before anything runs.

    ``base_from``: a base this recipe wrote before it had its later parts; the parts it went through (its
    ``recipe/recipe.json``, which must be the first parts of this recipe) are not run again, the others run
    from it, and its records are kept beside theirs. A base without SAM 2's memory modules gains them first
    (:func:`continuation_start`)."""
    from ..data.corpus import write_corpus
    from .output import check_output_dir, prepare_output_dir
    from .presets import build_preset

    recipe = recipe or BaseRecipe()
    out = Path(out)
    work = Path(work) if work is not None else out.parent / f"{out.name}-work"
    if base_from is not None:
        try:
            base_from = resolve_model(base_from)
        except CheckpointError as err:
            raise BaseRecipeError(f"--base_from: {err}") from err
        _recipe_record(Path(base_from))  # before any folder is touched
    check_output_dir(out, overwrite, "--make-base folder")
    prepare_output_dir(work, overwrite, "--make-base folder")
    timings: dict[str, float] = {}
    started = time.monotonic()
    _say(f"synthesising {recipe.images} images, {recipe.volumes} volumes, {recipe.clips} clips (seed "
         f"{recipe.corpus_seed})")
    write_corpus(work / "data", recipe.corpus_options())
    files = split_by_task(work / "data" / "train.jsonl")
    timings["data"] = round(time.monotonic() - started, 1)
    parts = recipe_parts(recipe, files, work)
    names = [part.name for part in parts]
    done = parts_done(Path(base_from), names) if base_from is not None else []
    if done != names[: len(done)]:
        raise BaseRecipeError(
            f"{base_from} went through the parts {done}, which are not the first parts of this recipe ({names}): "
            "make the base from scratch instead"
        )
    if base_from is not None:
        _say(f"continuing from {base_from}, which went through {', '.join(done)}")
        model = continuation_start(Path(base_from), work / "with-memory", recipe.seed)
    else:
        _say("building the tiny preset")
        model = build_preset("tiny", work / "preset", seed=recipe.seed)
    runs: dict[str, Path] = {}
    todo = parts[len(done) :]
    if not todo:
        raise BaseRecipeError(f"{base_from} already went through every part of this recipe: nothing to run")
    for number, part in enumerate(todo, start=1):
        t = time.monotonic()
        _say(f"[{number}/{len(todo)}] {part.name}: {part.what}")
        model = runs[part.name] = part.run(model)
        timings[part.name] = round(time.monotonic() - t, 1)
    timings["total"] = round(time.monotonic() - started, 1)
    write_base(out, runs, recipe, timings, overwrite=overwrite, earlier=Path(base_from) if base_from else None,
               earlier_parts=done)
    _say(f"wrote the tiny base checkpoint to {out} in {timings['total']:.0f} s")
    return out


def _say(message: str) -> None:
    print(message, flush=True)
