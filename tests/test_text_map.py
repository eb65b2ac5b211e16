"""The training-only text-map loss (which character each image patch shows) and the rows that feed it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.dataset import RowDataset
from citrus_v.data.documents import make_lab_report
from citrus_v.data.validate import ValidationOptions, validate_files
from citrus_v.modeling.modeling_citrus_v import CitrusV
from citrus_v.objectives.annotations import CHAR_CLASSES, char_class, chars_per_patch, class_char
from citrus_v.processing.processor import ProcessorError

from .conftest import assert_trains_the_vision_tower_alone, phantom


def test_classes_cover_printable_ascii_and_round_trip():
    printable = [chr(c) for c in range(33, 127)]
    assert [class_char(char_class(c)) for c in printable] == printable
    assert sorted(char_class(c) for c in printable) == list(range(1, CHAR_CLASSES))
    assert char_class(" ") == 0 and char_class("é") == 0 and class_char(0) == ""


def test_targets_follow_the_patch_order_of_merged_tokens():
    labels = np.zeros((56, 84), dtype=np.int64)  # 4 x 6 patches of 14 px -> 2 x 3 merged tokens
    labels[14:28, 42:56] = 7  # patch row 1, column 3: token (0, 1), lower-right patch
    labels[28:42, 0:14] = 9  # patch row 2, column 0: token (1, 0), upper-left patch
    target = chars_per_patch(labels, (2, 3), 2)
    assert target.shape == (6, 4)
    expected = torch.zeros(6, 4, dtype=torch.long)
    expected[1, 3] = 7
    expected[3, 0] = 9
    assert torch.equal(target, expected)


def test_lab_report_prints_one_character_per_cell_and_the_map_names_each():
    report = make_lab_report(np.random.default_rng(5), cell=28)
    assert report.image.size == (32 * 28, 8 * 28)
    ink = np.asarray(report.image.convert("L")) < 128
    labelled = report.char_map > 0
    assert labelled.any() and report.char_map.max() < CHAR_CLASSES
    # nearly all ink lies under a label (the rule under the header is the exception), and each label box has ink
    assert (ink & ~labelled).sum() < 0.05 * ink.sum() + report.image.size[0] * 2
    assert (labelled & ink).sum() > 0.3 * ink.sum()
    # reading one character per cell gives the printed lines exactly, spaces included
    cells = report.char_map[14::28, 14::28]
    lines = ["".join(class_char(int(v)) or " " for v in row) for row in cells]
    assert lines[1].strip() == f"Patient {report.patient_id} Date {report.date}"
    for line, result in zip(lines[2:], report.results, strict=False):
        assert line[1 : 1 + len(result.name)] == result.name
        assert line[12 : 12 + len(result.text)] == result.text
    # every cell is one colour: a merged image token of the tiny preset covers exactly one character
    blocks = report.char_map.reshape(8, 28, 32, 28)
    assert (blocks == blocks[:, :1, :, :1]).all()


def test_lab_report_rejects_cells_too_small_to_print():
    with pytest.raises(ValueError, match="cell must be at least 8"):
        make_lab_report(np.random.default_rng(0), cell=4)


def _doc_sample(seed: int, with_map: bool = True) -> dict:
    report = make_lab_report(np.random.default_rng(seed))
    sample = {
        "messages": [
            {"role": "user", "content": "<image>What is the patient ID?"},
            {"role": "assistant", "content": report.patient_id},
        ],
        "images": [report.image],
    }
    if with_map:
        sample["char_map"] = report.char_map
    return sample


def _scan_sample() -> dict:
    return {
        "messages": [{"role": "user", "content": "<image>Is there a lesion?"}, {"role": "assistant", "content": "yes"}],
        "images": [phantom(0).image],
    }


def test_processor_lines_targets_up_with_image_tokens(tiny):
    _, processor = tiny
    batch = processor([_doc_sample(0), _scan_sample(), _doc_sample(1, with_map=False)])
    targets = batch["objective_targets"]["text_map"]
    merge = processor.image_processor.merge_size
    tokens = int(batch["image_grid_thw"].prod(dim=-1).sum()) // merge**2
    assert targets.shape == (tokens, merge * merge)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == tokens
    first = int(batch["image_grid_thw"][0].prod()) // merge**2
    assert (targets[:first] >= 0).all() and (targets[:first] > 0).sum() > 50
    assert (targets[first:] == -1).all()
    assert "objective_targets" not in processor([_scan_sample()])
    wrong = _doc_sample(2)
    wrong["char_map"] = np.zeros((10, 10), dtype=np.int64)
    with pytest.raises(ProcessorError, match="char_map is 10x10 but the first image is 896x224"):
        processor(wrong)


def test_loss_trains_the_vision_tower_and_the_head_learns_characters(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    assert model.config.text_map_loss_weight > 0 and model.text_map_head is not None
    batch = processor([_doc_sample(s) for s in range(4)])
    out = model(**batch)
    assert out.aux_losses["text_map"] is not None
    assert_trains_the_vision_tower_alone(model, out.aux_losses["text_map"])
    # a few steps on this loss alone lower it on reports the model has not seen
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_out = processor([_doc_sample(s) for s in range(100, 102)])

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(model(**held_out).aux_losses["text_map"])

    before = held_out_loss()
    for _ in range(10):
        optimizer.zero_grad()
        model(**batch).aux_losses["text_map"].backward()
        optimizer.step()
    assert held_out_loss() < 0.7 * before
    batch["objective_targets"].pop("text_map")
    batch["objective_targets"].pop("lesion_map", None)
    with torch.no_grad():
        plain = model(**batch)
    assert "text_map" not in (plain.aux_losses or {})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text_corpus")
    write_corpus(out, CorpusOptions(n=20, seed=4, documents=0.5))
    return out


def test_document_rows_carry_text_maps_that_load_and_validate(corpus, tiny):
    _, processor = tiny
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    docs = [r for r in rows if r["task"] == "document"]
    assert docs and all("char_map" in r for r in docs)
    assert all("char_map" not in r for r in rows if r["task"] != "document")
    assert validate_files([corpus / "train.jsonl"], ValidationOptions(decode=True)).rejected == 0
    dataset = RowDataset.from_jsonl([corpus / "train.jsonl"], processor)
    item = next(dataset[i] for i in range(len(dataset)) if dataset.records[i].row["task"] == "document")
    labels = item["sample"]["char_map"]
    assert labels.shape == (224, 896) and labels.max() > 1


def test_a_text_map_that_is_not_a_label_image_is_named(corpus, tiny, tmp_path):
    _, processor = tiny
    row = next(
        json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines() if '"document"' in line
    )
    Image.new("RGB", (896, 224)).save(tmp_path / "colour.png")
    row["images"] = [str(corpus / row["images"][0])]
    row["char_map"] = str(tmp_path / "colour.png")
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    dataset = RowDataset.from_jsonl([tmp_path / "rows.jsonl"], processor)
    skipped = dataset[0]
    assert "char_map" in str(skipped.issue.message) and "one channel" in str(skipped.issue.message)
    assert skipped.issue.line == 1


def test_a_checkpoint_saved_without_the_head_loads_with_a_fresh_one(tiny, tmp_path):
    model, _ = tiny
    plain = copy.deepcopy(model)
    plain.config.text_map_loss_weight = 0.0
    plain.text_map_head = None
    plain.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_map_loss_weight"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = CitrusV.from_pretrained(tmp_path)
    assert loaded.text_map_head is not None
    torch.testing.assert_close(loaded.seg_projector[0].weight, model.seg_projector[0].weight)
