"""The tiny stage-1/2 checkpoint shipped with the package, and the command that makes it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.recipes.demo import shipped_base
from citrus_v.recipes.tiny_base import BaseRecipe, make_base
from citrus_v.train.stages import component_of

# every part at a few steps, on a corpus with two volumes and one clip
SMALL_RECIPE = dict(
    images=30, stage2_steps=3, reading_steps=3, refresh_steps=2, stage4_point_steps=2, stage4_steps=2,
    save_steps=1000, batch_size=2, reading_learning_rate=4e-4, refresh_learning_rate=3e-4, closed_steps=2,
    volumes=2, clips=1, volume_steps=2, memory_steps=2, point_fit_epochs=3,
)
FIRST_PARTS = ["stage2", "stage2_reading", "stage2_refresh", "stage4_points", "stage4", "stage2_closed"]
PARTS = [*FIRST_PARTS, "stage3_volumes", "stage4_memory", "point_head"]


@pytest.fixture(scope="module")
def fresh_rows(tmp_path_factory):
    """Rows of a corpus seed the base never trained on."""
    out = tmp_path_factory.mktemp("fresh")
    write_corpus(out, CorpusOptions(n=24, seed=4242))
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    return out, rows


def test_the_shipped_base_answers_in_every_task_format(fresh_rows):
    from citrus_v.infer import CitrusVPredictor, Request
    from citrus_v.processing.boxes import parse_boxes

    base = shipped_base()
    assert base is not None, "citrus_v/weights/tiny-base is missing: run citrus-v demo --make-base"
    recipe = json.loads((base / "recipe" / "recipe.json").read_text())
    assert recipe["recipe"]["stage2_steps"] > 0 and recipe["recipe"]["stage4_steps"] > 0
    assert (base / "recipe" / "loss_stage2.png").is_file()
    out, rows = fresh_rows
    predictor = CitrusVPredictor.from_pretrained(base)
    picked = {}
    for row in rows:
        task = row["task"]
        if task in ("detection", "segmentation", "vqa-closed") and task not in picked:
            if task == "segmentation" and not row.get("masks"):
                continue
            picked[task] = row
    requests = [
        Request(images=[str(out / r["images"][0])], prompt=r["messages"][0]["content"].replace("<image>", ""))
        for r in picked.values()
    ]
    answers = dict(zip(picked, predictor.predict_batch(requests, max_new_tokens=96), strict=True))
    # a random-weight model answers none of these in format: the shipped weights are trained
    assert parse_boxes(answers["detection"].text), answers["detection"].text
    assert "[SEG]" in answers["segmentation"].text and answers["segmentation"].masks
    assert answers["segmentation"].masks[0].mask.any()
    assert answers["vqa-closed"].text.strip() in {"yes", "no", "0", "1", "2", "3", "left", "right"}


def test_make_base_runs_the_recipe_end_to_end(tmp_path):
    """The command that made the shipped base, at a few steps: every stage runs and the folder is complete."""
    recipe = BaseRecipe(**SMALL_RECIPE)
    out = make_base(tmp_path / "base", tmp_path / "work", recipe)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    notes = json.loads((out / "recipe" / "recipe.json").read_text())
    assert notes["recipe"]["stage2_steps"] == 3 and notes["parts"] == PARTS and set(notes["timings_s"]) >= set(PARTS)
    logged = (out / "recipe" / "stage2_logging.jsonl").read_text()
    assert '"lesion_map"' in logged and '"lesion_count"' in logged  # the auxiliary losses ran
    # stage 2 in three parts: the scans alone, then the lab reports join and the reading losses run, then the
    # scans again with fewer reports
    reports = (tmp_path / "work" / "data" / "train.document.jsonl").as_posix()
    scans_args = json.loads((tmp_path / "work" / "stage2" / "sft_args.json").read_text())
    reading_args = json.loads((tmp_path / "work" / "stage2-reading" / "sft_args.json").read_text())
    first, second = scans_args["dataset"], reading_args["dataset"]
    # each part at its own rate
    assert scans_args["learning_rate"] == recipe.stage2_learning_rate
    assert reading_args["learning_rate"] == recipe.reading_learning_rate
    assert not any(entry.startswith(reports) for entry in first)
    assert any(entry.startswith(reports) for entry in second)
    assert '"copy"' in (out / "recipe" / "stage2_reading_logging.jsonl").read_text()
    refresh_args = json.loads((tmp_path / "work" / "stage2-refresh" / "sft_args.json").read_text())
    assert refresh_args["model"] == str(tmp_path / "work" / "stage2-reading")
    assert refresh_args["learning_rate"] == recipe.refresh_learning_rate
    assert any(entry.startswith(reports) for entry in refresh_args["dataset"])
    stage4_args = json.loads((tmp_path / "work" / "stage4-points" / "sft_args.json").read_text())
    assert stage4_args["model"] == str(tmp_path / "work" / "stage2-refresh")
    # stage 4 in two parts: a real point on every mask, then the recipe's share; the point head learns in both
    points = json.loads((tmp_path / "work" / "stage4-points" / "config.json").read_text())
    assert points["point_prompt_probability"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["point_prompt_probability"] == recipe.stage4_point_prompt_probability
    assert config["seg_point_head"] is True
    for part in ("stage4_points", "stage4"):
        assert '"point"' in (out / "recipe" / f"{part}_logging.jsonl").read_text()
    # last, the closed questions alone with the tower frozen: the shipped weights are that part's, with the
    # vision tower and the seg modules exactly as stage 4 left them and the language model trained further
    closed_args = json.loads((tmp_path / "work" / "stage2-closed" / "sft_args.json").read_text())
    assert closed_args["model"] == str(tmp_path / "work" / "stage4")
    assert closed_args["dataset"] == [(tmp_path / "work" / "data" / "train.vqa-closed.jsonl").as_posix()]
    assert closed_args["freeze_vit"] is True and closed_args["stage"] == 2
    assert closed_args["learning_rate"] == recipe.closed_learning_rate
    assert (out / "recipe" / "stage2_closed_logging.jsonl").is_file()
    closed = load_file(tmp_path / "work" / "stage2-closed" / "model.safetensors")
    before = load_file(tmp_path / "work" / "stage4" / "model.safetensors")
    assert closed.keys() == before.keys()
    frozen = {"vision encoder", "seg projector", "sam image encoder", "sam prompt encoder", "sam mask decoder"}
    kept = [k for k in closed if component_of(k) in frozen]
    assert {component_of(k) for k in kept} == frozen
    assert all(torch.equal(closed[k], before[k]) for k in kept)
    trained = [k for k in closed if component_of(k) == "llm"]
    assert trained and any(not torch.equal(closed[k], before[k]) for k in trained)
    # then the volumes, SAM 2's memory modules among the shipped weights; last the point head, fitted on the
    # [SEG] states of the 2-D and 3-D segmentation rows: the shipped weights are the memory part's but for it
    shipped = load_file(out / "model.safetensors")
    assert any(component_of(k) == "sam memory" for k in shipped)
    memory = load_file(tmp_path / "work" / "stage4-memory" / "model.safetensors")
    changed = {k for k in shipped if not torch.equal(shipped[k], memory[k])}
    assert changed and all(k.startswith("seg_point_head.mlp.") for k in changed)
    fit = json.loads((out / "recipe" / "point_head_fit.json").read_text())
    assert fit["states"] > 0 and fit["options"]["epochs"] == recipe.point_fit_epochs
    assert (out / "recipe" / "loss_point_head.png").is_file() and not (out / "point_fit.json").exists()
    assert json.loads((out / "config.json").read_text())["propagation"] == recipe.propagation


def test_with_documents_gives_the_reports_their_share_and_rejects_a_share_outside_0_1():
    from citrus_v.recipes.tiny_base import SCAN_MIX, with_documents

    mix = with_documents(SCAN_MIX, 0.25)
    assert mix["document"] == 0.25 and sum(mix.values()) == pytest.approx(1.0)
    assert mix["detection"] / mix["vqa-closed"] == pytest.approx(SCAN_MIX["detection"] / SCAN_MIX["vqa-closed"])
    with pytest.raises(ValueError, match=r"documents' share must be in \[0, 1\), got 1"):
        with_documents(SCAN_MIX, 1)


def _earlier_base(folder, tiny_dir, parts: list[str] | None):
    """A base folder as the recipe wrote it before it had the volume parts: the tiny model (no memory modules)
    with a log per part in ``recipe/`` and, when ``parts`` is given, the parts listed in ``recipe.json``."""
    import shutil

    shutil.copytree(tiny_dir, folder)
    (folder / "recipe").mkdir()
    for part in FIRST_PARTS:
        (folder / "recipe" / f"{part}_logging.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    record = {"recipe": {}, "timings_s": {part: 1.0 for part in FIRST_PARTS}}
    if parts is not None:
        record["parts"] = parts
    (folder / "recipe" / "recipe.json").write_text(json.dumps(record))
    return folder


def test_make_base_continues_a_base_that_went_through_the_first_parts(tmp_path, tiny_dir):
    """--base_from: only the parts the earlier base did not go through run, from it, memory modules added."""
    earlier = _earlier_base(tmp_path / "earlier", tiny_dir, parts=None)  # parts read from its logs
    # the earlier base's own history stays in the record, one level down
    record = json.loads((earlier / "recipe" / "recipe.json").read_text())
    history = {"parts": ["stage2"], "timings_s": {"stage2": 2.0}}
    (earlier / "recipe" / "recipe.json").write_text(json.dumps({**record, "continued_from": history}))
    out = make_base(tmp_path / "base", tmp_path / "work", BaseRecipe(**SMALL_RECIPE), base_from=earlier)
    ran = sorted(p.name for p in (tmp_path / "work").iterdir() if (p / "sft_args.json").is_file())
    assert ran == ["stage3-volumes", "stage4-memory"]
    volumes_args = json.loads((tmp_path / "work" / "stage3-volumes" / "sft_args.json").read_text())
    assert volumes_args["model"] == str(tmp_path / "work" / "with-memory") and volumes_args["stage"] == 3
    assert any("train.segmentation-3d.jsonl" in entry for entry in volumes_args["dataset"])
    memory_args = json.loads((tmp_path / "work" / "stage4-memory" / "sft_args.json").read_text())
    assert memory_args["train_propagation"] == "memory" and memory_args["presence_loss_weight"] == 1.0
    notes = json.loads((out / "recipe" / "recipe.json").read_text())
    assert notes["parts"] == PARTS and notes["continued_from"]["parts"] == FIRST_PARTS
    assert notes["continued_from"]["continued_from"] == history
    assert set(notes["timings_s"]) >= {"stage3_volumes", "stage4_memory", "point_head"}
    assert "stage2" not in notes["timings_s"]
    assert (out / "recipe" / "stage2_logging.jsonl").is_file() and (out / "recipe" / "stage4_memory_logging.jsonl")
    grown = load_file(tmp_path / "work" / "with-memory" / "model.safetensors")
    shipped = load_file(out / "model.safetensors")
    memory = [name for name in shipped if component_of(name) == "sam memory"]
    # the memory modules added to the earlier base are the ones the volume parts trained on (that stage 4 changes
    # them on volume rows: tests/test_train_volumes.py)
    assert memory and sorted(memory) == sorted(n for n in grown if component_of(n) == "sam memory")
    # a folder listing other parts is refused before anything trains
    odd = _earlier_base(tmp_path / "odd", tiny_dir, parts=["stage2", "stage4"])
    with pytest.raises(ValueError, match="not the first parts of this recipe"):
        make_base(tmp_path / "b2", tmp_path / "w2", BaseRecipe(**SMALL_RECIPE), base_from=odd)
    with pytest.raises(ValueError, match="recipe.json is missing"):
        make_base(tmp_path / "b3", tmp_path / "w3", BaseRecipe(**SMALL_RECIPE), base_from=tiny_dir)


def test_a_continued_base_keeps_the_memory_modules_it_has_and_gains_them_only_without(tmp_path, tiny_dir):
    """A base that went through a volume part continues with the memory modules it trained; one from before the
    volume parts gains the preset's, its other weights unchanged."""
    from citrus_v.recipes.presets import build_preset, has_memory_modules
    from citrus_v.recipes.tiny_base import continuation_start

    with_memory = build_preset("tiny", tmp_path / "with", seed=3)
    assert continuation_start(with_memory, tmp_path / "w1", seed=0) == with_memory
    assert not (tmp_path / "w1").exists()  # nothing copied, nothing re-drawn

    assert not has_memory_modules(tiny_dir)
    grown = continuation_start(tiny_dir, tmp_path / "w2", seed=0)
    assert grown == tmp_path / "w2" and has_memory_modules(grown)
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(grown / "model.safetensors")
    assert any(component_of(name) == "sam memory" for name in after)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_write_base_writes_a_tokenizer_that_loads_offline(tmp_path, tiny_dir):
    """The tokenizer saves the local_files_only it was loaded with; the written base always says true."""
    import shutil

    from citrus_v.recipes.tiny_base import write_base

    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run)
    tokenizer = json.loads((run / "tokenizer_config.json").read_text())
    (run / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "local_files_only": False}))
    write_base(tmp_path / "base", {"stage2": run}, BaseRecipe(), {"total": 1.0})
    written = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    assert written == {**tokenizer, "local_files_only": True}
