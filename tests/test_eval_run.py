"""End to end: the runner on the synthetic corpus (oracle, failing and resumed backends), and the tiny model
in-process and through ``citrus-v deploy`` giving the same numbers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from citrus_v.cli import main
from citrus_v.eval.backends import Backend, ModelOutput
from citrus_v.eval.references import first_image_size, reference_masks
from citrus_v.eval.runner import EvalConfig, run_eval
from citrus_v.eval.samples import TASKS, EvalDataError

from .test_serve_support import deploy_process

ALL = ",".join(TASKS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from citrus_v.data.corpus import CorpusOptions, write_corpus

    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, CorpusOptions(n=30, seed=0))
    tasks = Counter(json.loads(line)["task"] for line in (out / "test.jsonl").read_text().splitlines())
    assert set(tasks) == {"segmentation", "detection", "vqa-closed", "vqa-open", "report", "cot", "document"}, tasks
    return out


class Oracle(Backend):
    """Answers every sample with its own ground truth; counts the samples it was asked."""

    def __init__(self, fail: set[str] = frozenset()):
        self.asked: list[str] = []
        self.fail = set(fail)

    def predict(self, samples, images, options):
        outputs = []
        for sample in samples:
            self.asked.append(sample.id)
            if sample.id in self.fail:
                raise ConnectionError(f"endpoint down for {sample.id}")
            outputs.append(self._answer(sample))
        return outputs

    def _answer(self, sample):
        if sample.task == "seg":
            width, height = first_image_size(sample)
            masks = reference_masks(sample, (width, height))
            return ModelOutput(" ".join("[SEG]" for _ in masks), masks=masks)
        if sample.task == "det":
            return ModelOutput("boxes", boxes=[list(b) for b in sample.reference])
        if sample.task == "cot":
            return ModelOutput(f"<think>I looked.</think><answer>{sample.reference}</answer>")
        return ModelOutput(sample.reference)

    def describe(self):
        return {"backend": "oracle", "model": "ground truth"}


def _config(corpus: Path, out: Path, **kw) -> EvalConfig:
    return EvalConfig(tasks=list(TASKS), data=[str(corpus)], out=out, progress=False, **kw)


def test_ground_truth_answers_score_perfectly(corpus, tmp_path):
    result = run_eval(_config(corpus, tmp_path), Oracle())
    tasks = result.tasks
    assert tasks["seg"]["overall"]["dice"] == 1.0 and tasks["seg"]["overall"]["iou"] == 1.0
    det = tasks["det"]["overall"]
    assert det["n_single"] + det["n_multi"] == tasks["det"]["counts"]["samples"]
    assert det["acc_iou50"] in (None, 1.0) and det["ap50"] in (None, pytest.approx(1.0))
    vqa = tasks["vqa"]["overall"]
    assert vqa["closed_accuracy"] == 1.0 and vqa["open_recall"] == 1.0 and vqa["open_f1"] == 1.0
    report = tasks["report"]["overall"]
    assert [report[f"bleu{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4)
    assert report["rouge_l"] == pytest.approx(1.0) and report["meteor"] > 0.99 and report["cider"] > 9.99
    doc = tasks["doc"]["overall"]
    assert doc["cer"] == 0.0 and doc["anls"] == 1.0 and doc["field_em"] in (None, 1.0)
    assert tasks["cot"]["overall"]["accuracy"] == 1.0 and tasks["cot"]["overall"]["format_share"] == 1.0
    for summary in tasks.values():
        assert summary["counts"]["unparsable"] == 0 and summary["counts"]["failed"] == 0

    # the files: one record per sample, traceable; the figure is a PNG; the report has a table per task
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == sum(s["counts"]["samples"] for s in tasks.values()) == len({r["id"] for r in records})
    for record in records:
        assert {"id", "task", "prompt", "output", "parsed", "scores", "status"} <= set(record)
        assert record["prompt"].startswith("<image>")
    assert (tmp_path / "seg_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_md = (tmp_path / "report.md").read_text()
    for title in (
        "Segmentation",
        "Detection",
        "Visual question answering",
        "Report generation",
        "Documents",
        "Chain-of-thought",
    ):
        assert f"## {title}" in report_md
    assert "| all |" in report_md and "seg_dice.png" in report_md
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run"]["prompts"] and metrics["run"]["backend"]["backend"] == "oracle"
    assert metrics["tasks"]["seg"]["groups"]["modality"]


def test_failed_samples_are_counted_listed_and_resumed(corpus, tmp_path):
    reference = run_eval(_config(corpus, tmp_path / "clean", limit=3, seed=1), Oracle())
    records = [json.loads(line) for line in (tmp_path / "clean" / "predictions.jsonl").read_text().splitlines()]
    doomed = {r["id"] for r in records if r["task"] == "vqa"}
    flaky = Oracle(fail=doomed)
    result = run_eval(_config(corpus, tmp_path / "run", limit=3, seed=1), flaky)
    vqa = result.tasks["vqa"]
    assert vqa["counts"]["failed"] == len(doomed) and vqa["counts"]["scored"] == 0
    assert {f["id"] for f in vqa["failed"]} == doomed and "endpoint down" in vqa["failed"][0]["error"]
    assert result.tasks["seg"]["overall"]["dice"] == 1.0  # the run went on
    assert "Failed samples:" in (tmp_path / "run" / "report.md").read_text()

    resumed_backend = Oracle()
    resumed = run_eval(_config(corpus, tmp_path / "run", limit=3, seed=1, resume=True), resumed_backend)
    assert sorted(resumed_backend.asked) == sorted(doomed)  # only the failed ones were asked again
    assert resumed.tasks == reference.tasks

    with pytest.raises(EvalDataError, match="other settings.*seed"):
        run_eval(_config(corpus, tmp_path / "run", limit=3, seed=2, resume=True), Oracle())


def test_limit_and_seed_draw_fixed_subsets(corpus, tmp_path):
    from citrus_v.eval.loaders import load_data
    from citrus_v.eval.runner import select

    samples = load_data([str(corpus)])[0].samples
    first = [s.id for s in select(samples, TASKS, 2, seed=5)]
    assert first == [s.id for s in select(samples, TASKS, 2, seed=5)]
    assert Counter(s.task for s in select(samples, TASKS, 2, seed=5)) == {t: 2 for t in TASKS}
    assert any(first != [s.id for s in select(samples, TASKS, 2, seed=k)] for k in range(6, 12))


@pytest.fixture
def deploy(tiny_dir):
    """``citrus-v deploy`` of the tiny checkpoint on 127.0.0.1 (one request per generation pass)."""
    flags = ("--served_model_name", "tiny", "--max_batch_size", "1", "--log_level", "warning", "--device", "cpu")
    with deploy_process(tiny_dir, *flags) as url:
        yield url


def test_tiny_model_in_process_and_through_the_api_give_the_same_numbers(tiny_dir, corpus, deploy, tmp_path, capsys):
    common = [
        "eval",
        "--tasks",
        ALL,
        "--data",
        str(corpus),
        "--limit",
        "2",
        "--seed",
        "0",
        "--max_new_tokens",
        "12",
        "--no_progress",
    ]
    assert main(common + ["--model", str(tiny_dir), "--device", "cpu", "--out", str(tmp_path / "local")]) == 0
    assert (
        main(
            common
            + ["--api", deploy, "--served_model_name", "tiny", "--concurrency", "2", "--out", str(tmp_path / "api")]
        )
        == 0
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert "seg: dice" in printed and "wrote" in printed
    # two samples per task: each task's numbers come with a warning on stderr (and in report.md)
    assert "citrus-v eval: warning: seg: only 2 sample(s) (--limit 2), under 30" in captured.err
    assert "- **Warning:** seg: only 2 sample(s)" in (tmp_path / "local" / "report.md").read_text()

    for folder in ("local", "api"):
        for name in ("metrics.json", "report.md", "seg_dice.png", "predictions.jsonl", "run.json"):
            assert (tmp_path / folder / name).is_file(), (folder, name)
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    api = json.loads((tmp_path / "api" / "metrics.json").read_text())
    assert local["run"]["backend"]["backend"] == "in-process" and api["run"]["backend"]["backend"] == "openai-api"
    for summary in local["tasks"].values():
        assert summary["counts"]["samples"] == 2 and summary["counts"]["failed"] == 0, summary["failed"]
    assert api["tasks"] == local["tasks"]

    def records(folder):
        lines = (tmp_path / folder / "predictions.jsonl").read_text().splitlines()
        return {r["id"]: r for r in map(json.loads, lines)}

    local_records, api_records = records("local"), records("api")
    assert local_records.keys() == api_records.keys()
    for key, record in local_records.items():
        other = api_records[key]
        assert (record["output"], record["parsed"], record["scores"]) == (
            other["output"],
            other["parsed"],
            other["scores"],
        ), key
    # random tiny weights answer poorly, but every answer was produced, parsed and scored
    assert all(isinstance(r["output"], str) for r in local_records.values())
    assert np.isfinite(local["tasks"]["seg"]["overall"]["dice"])


def test_masks_and_boxes_travel_the_same_way_in_both_backends(tiny, corpus, tmp_path):
    """Scripted answers ([SEG] masks from SAM 2, a JSON box, a reasoning answer) through both backends."""
    from citrus_v.eval.backends import InProcessBackend, OpenAIBackend
    from citrus_v.serve.server import ServerSettings, create_app

    from .test_serve_support import ScriptedPredictor, running_server

    predictor = ScriptedPredictor(*tiny)
    config = dict(tasks=["seg", "det", "cot"], data=[str(corpus)], progress=False, max_new_tokens=64)
    local = run_eval(EvalConfig(out=tmp_path / "local", **config), InProcessBackend(predictor))
    app = create_app(predictor, ServerSettings(served_model_name="scripted", max_batch_size=1))
    with running_server(app) as url:
        api = run_eval(EvalConfig(out=tmp_path / "api", **config), OpenAIBackend(url, "scripted", concurrency=3))
    assert api.tasks == local.tasks
    seg = [json.loads(line) for line in (tmp_path / "api" / "predictions.jsonl").read_text().splitlines()]
    seg = [r for r in seg if r["task"] == "seg"]
    assert all(r["parsed"]["num_masks"] == 2 for r in seg) and any(r["parsed"]["area"] > 0 for r in seg)
    assert local.tasks["det"]["counts"]["unparsable"] == 0  # every answer had its box, in original pixels
    assert local.tasks["cot"]["overall"]["format_share"] == 1.0
    assert 0.0 <= local.tasks["seg"]["overall"]["dice"] <= 1.0
