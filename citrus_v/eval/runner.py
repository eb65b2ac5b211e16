"""One evaluation run: load, check, select, ask the backend, score, write the results.

Steps: read every ``--data`` set; keep the requested tasks; ``--limit N`` keeps N samples per task, drawn
with ``--seed`` (the same N samples every time, in dataset order); check every kept sample's ground truth
before the model runs (image readable, masks of the image's size, boxes inside the image, a volume's mask
stacks on its grid, from headers); answer and score
each sample, appending its record to ``predictions.jsonl`` as soon as it is scored (so an interrupted run
keeps its work); then rewrite ``predictions.jsonl`` in sample order and write ``metrics.json``,
``report.md`` and the figure. ``--resume`` keeps the records of samples already scored (``ok`` or
``unparsable``) and asks only the rest — failed samples are asked again; it refuses a folder whose run had
other settings.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from . import prompts
from .backends import Backend, GenerationOptions
from .loaders import LoadOptions, load_data
from .references import check_sample, load_images
from .report import write_figure, write_metrics, write_report
from .samples import ALL_TASKS, EvalDataError, EvalSample
from .scoring import failed_record, score
from .summary import sample_size_warnings, summarize
from .volume_references import check_volume_sample

PREDICTIONS = "predictions.jsonl"
RUN_FILE = "run.json"
# Answers are short except reports and reasoning; a random or runaway model stops here. An absent target may be
# asked as a detection question: it gets a detection answer's room.
DEFAULT_MAX_NEW_TOKENS = {"seg": 64, "det": 128, "vqa": 32, "report": 256, "doc": 256, "cot": 512, "seg3d": 64,
                          "absent": 128}
# Settings that must match for --resume to reuse earlier records.
RESUME_KEYS = ("tasks", "data", "split", "limit", "seed", "max_new_tokens", "temperature")


@dataclass
class EvalConfig:
    """What ``citrus-v eval`` was asked to do."""

    tasks: list[str]
    data: list[str]
    out: Path
    split: str = "test"
    image_root: Path | None = None
    limit: int | None = None
    seed: int = 0
    resume: bool = False
    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS per task
    temperature: float = 0.0
    progress: bool = True

    def tokens_for(self, task: str) -> int:
        return int(self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task])


@dataclass
class EvalResult:
    """What a run wrote and its numbers."""

    out: Path
    tasks: dict[str, dict[str, Any]]
    run: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """Lines about tasks without samples or with too few (also at the top of ``report.md``)."""
        return list(self.run.get("warnings", []))


def parse_tasks(text: str) -> list[str]:
    """``"seg,det"`` -> ``["seg", "det"]`` (``all`` for every task); unknown names are an error."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(ALL_TASKS)
    unknown = [n for n in names if n not in ALL_TASKS]
    if unknown or not names:
        raise EvalDataError(f"--tasks {text!r}: unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)} or all")
    return list(dict.fromkeys(names))


def select(samples: Sequence[EvalSample], tasks: Sequence[str], limit: int | None, seed: int) -> list[EvalSample]:
    """The samples of ``tasks``; with ``limit``, a seeded draw of ``limit`` per task kept in dataset order."""
    chosen: list[EvalSample] = []
    for index, task in enumerate(ALL_TASKS):
        if task not in tasks:
            continue
        pool = [s for s in samples if s.task == task]
        if limit is not None and len(pool) > limit:
            keep = sorted(np.random.default_rng([seed, index]).choice(len(pool), size=limit, replace=False).tolist())
            pool = [pool[k] for k in keep]
        chosen += pool
    return chosen


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run: that sample is asked again
    return records


def _check_resume(out: Path, run: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = [key for key in RESUME_KEYS if previous.get(key) != run.get(key)]
    old_backend, new_backend = previous.get("backend", {}), run.get("backend", {})
    for key in ("backend", "model", "api", "served_model_name"):
        if old_backend.get(key) != new_backend.get(key):
            changed.append(f"backend.{key}")
    if changed:
        details = "; ".join(
            f"{key}: {previous.get(key, old_backend.get(key.split('.')[-1]))!r} -> "
            f"{run.get(key, new_backend.get(key.split('.')[-1]))!r}"
            for key in changed
        )
        raise EvalDataError(
            f"--resume: {out} holds a run with other settings ({details}); resume with the same settings or "
            "use another --out"
        )


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _answer(backend: Backend, chunk: list[EvalSample], config: EvalConfig) -> list[dict[str, Any]]:
    """Ask the backend for one chunk and score each answer; any failure marks only what it touched."""
    images, ready, records = [], [], {}
    for sample in chunk:
        try:
            images.append(load_images(sample))
            ready.append(sample)
        except Exception as err:  # noqa: BLE001 - an unreadable image fails that sample only
            records[sample.id] = failed_record(sample, err)
    if ready:
        options = GenerationOptions(config.tokens_for(ready[0].task), config.temperature, config.seed)
        try:
            outputs = backend.predict(ready, images, options)
        except Exception as err:  # noqa: BLE001 - the backend gave up: these samples failed, the run goes on
            outputs = [err] * len(ready)
        for sample, output in zip(ready, outputs, strict=True):
            if isinstance(output, Exception):
                records[sample.id] = failed_record(sample, output)
                continue
            try:
                records[sample.id] = score(sample, output)
            except Exception as err:  # noqa: BLE001 - e.g. a mask of the wrong size from an endpoint
                records[sample.id] = failed_record(sample, err)
    return [records[s.id] for s in chunk]


def _chunks(samples: Sequence[EvalSample], size: int) -> list[list[EvalSample]]:
    """Consecutive chunks of one task each (one generation length per batch)."""
    chunks: list[list[EvalSample]] = []
    for sample in samples:
        if chunks and len(chunks[-1]) < size and chunks[-1][0].task == sample.task:
            chunks[-1].append(sample)
        else:
            chunks.append([sample])
    return chunks


def run_eval(config: EvalConfig, backend: Backend) -> EvalResult:
    """Run the evaluation described by ``config`` on ``backend`` and write its results to ``config.out``."""
    loaded = load_data(config.data, LoadOptions(config.split, config.image_root))
    samples = [s for result in loaded for s in result.samples]
    selected = select(samples, config.tasks, config.limit, config.seed)
    for sample in selected:
        check_sample(sample)
        check_volume_sample(sample)
    skipped = {f"{r.name}={r.path}": dict(r.skipped) for r in loaded if r.skipped}
    templates = sorted({s.template or "row" for s in selected})
    run: dict[str, Any] = {
        "citrus_v": __version__,
        "tasks": list(config.tasks),
        "data": [f"{r.name}={r.path}" for r in loaded],
        "split": config.split,
        "limit": config.limit,
        "seed": config.seed,
        "max_new_tokens": {task: config.tokens_for(task) for task in config.tasks},
        "temperature": config.temperature,
        "backend": backend.describe(),
        "prompts": {name: prompts.TEMPLATES[name] for name in templates},
        "samples": dict(Counter(s.task for s in selected)),
        "skipped": skipped,
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / PREDICTIONS
    wanted = {s.id for s in selected}
    done: dict[str, dict[str, Any]] = {}
    if config.resume:
        _check_resume(out, run)
        for record in _read_records(predictions):
            if record.get("id") in wanted and record.get("status") in ("ok", "unparsable"):
                done[record["id"]] = record
    (out / RUN_FILE).write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _write_jsonl(predictions, [done[s.id] for s in selected if s.id in done])
    pending = [s for s in selected if s.id not in done]
    started = time.monotonic()
    records = dict(done)
    from tqdm.auto import tqdm

    with open(predictions, "a", encoding="utf-8") as sink, tqdm(
        total=len(selected), initial=len(done), desc="citrus-v eval", unit="sample", disable=not config.progress
    ) as bar, ThreadPoolExecutor(max_workers=backend.workers) as pool:
        chunks = iter(_chunks(pending, backend.batch_size))
        running: set[Future] = set()

        def top_up() -> None:
            while len(running) < backend.workers * 2:
                chunk = next(chunks, None)
                if chunk is None:
                    return
                running.add(pool.submit(_answer, backend, chunk, config))

        top_up()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                running.discard(future)
                for record in future.result():
                    records[record["id"]] = record
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bar.update(1)
                sink.flush()
            failed = sum(1 for r in records.values() if r["status"] == "failed")
            bar.set_postfix(failed=failed, refresh=False)
            top_up()
    ordered = [records[s.id] for s in selected if s.id in records]
    _write_jsonl(predictions, ordered)
    run["seconds"] = round(time.monotonic() - started, 1)
    (out / RUN_FILE).write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tasks = summarize(ordered, config.tasks)
    run["warnings"] = sample_size_warnings(tasks, config.limit)
    figure = None
    if "seg" in tasks:
        figure = write_figure(out, [r for r in ordered if r["task"] == "seg"], tasks["seg"])
    files = {"predictions": predictions, "metrics": write_metrics(out, run, tasks), "run": out / RUN_FILE}
    files["report"] = write_report(out, run, tasks, figure)
    if figure is not None:
        files["figure"] = figure
    return EvalResult(out, tasks, run, files)
