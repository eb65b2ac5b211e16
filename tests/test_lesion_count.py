"""The training-only lesion-count loss: its targets, the corpus rows that carry them, and the head."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.dataset import load_sample
from citrus_v.data.rows import RowRecord
from citrus_v.data.validate import ValidationOptions, validate_files
from citrus_v.media import read_mask
from citrus_v.objectives.lesion_count import LesionCountHead, lesion_count_target
from citrus_v.processing.processor import ProcessorError

from .conftest import assert_trains_the_vision_tower_alone


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("count_corpus")
    write_corpus(out, CorpusOptions(n=60, seed=23))
    return out


def _records(corpus: Path, split: str = "train") -> list[RowRecord]:
    path = corpus / f"{split}.jsonl"
    return [RowRecord(path, k, json.loads(line)) for k, line in enumerate(path.read_text().splitlines(), 1)]


def _count_question(record: RowRecord) -> bool:
    return record.row["messages"][0]["content"].endswith("How many lesions are there in this image?")


def test_targets_count_centres_per_cell():
    # two centres in the top-left cell, one on the far edge of the last cell
    target = lesion_count_target([[3.0, 4.0], [20.5, 27.9], [223.9, 223.9]], (224, 224), (8, 8))
    expected = torch.zeros(64)
    expected[0], expected[63] = 2, 1
    torch.testing.assert_close(target, expected)
    # a 2:1 image: columns and rows scale separately
    target = lesion_count_target([[300.0, 10.0]], (448, 224), (8, 16))
    assert target.nonzero().flatten().tolist() == [10]
    assert lesion_count_target([], (224, 224), (8, 8)).sum() == 0


def test_corpus_rows_point_at_the_lesions_the_answers_count(corpus):
    records = _records(corpus) + _records(corpus, "test")
    scans = [r.row for r in records if r.row["task"] != "document"]
    assert scans and all("lesion_points" in row for row in scans)
    assert all("lesion_points" not in r.row for r in records if r.row["task"] == "document")
    counted = [r.row for r in records if _count_question(r)]
    assert {len(row["lesion_points"]) for row in counted} >= {0, 1, 2}
    for row in counted:
        assert len(row["lesion_points"]) == int(row["messages"][1]["content"])
        union = read_mask(row["lesion_mask"], corpus)
        for x, y in row["lesion_points"]:
            assert union[int(round(y)), int(round(x))], "a lesion's centre lies in the lesion map"
        xs = [x for x, _ in row["lesion_points"]]
        assert xs == sorted(xs)  # numbered left to right, as the answers number them


def test_corpus_lesions_are_apart_so_the_count_is_in_the_picture(corpus):
    """Touching lesions read as one blob; every two lesions of a slice keep LESION_GAP between them."""
    from citrus_v.data.phantoms import LESION_GAP

    several = [r.row for r in _records(corpus) if len(r.row.get("masks", [])) > 1]
    assert several
    for row in several:
        masks = [read_mask(m, corpus) for m in row["masks"]]
        pixels = [np.argwhere(m).astype(float) for m in masks]
        side = masks[0].shape[0]
        for i in range(len(pixels)):
            for j in range(i + 1, len(pixels)):
                gaps = np.sqrt(((pixels[i][:, None] - pixels[j][None]) ** 2).sum(-1))
                assert gaps.min() >= LESION_GAP * side - 1.5  # pixel centres, not edges


def test_processor_lines_targets_up_with_image_tokens(corpus, tiny):
    _, processor = tiny
    options = ValidationOptions.for_processor(processor)
    record = next(r for r in _records(corpus) if _count_question(r) and len(r.row["lesion_points"]) >= 2)
    sample = load_sample(record, options)
    plain = {k: v for k, v in sample.items() if k not in ("lesion_points", "lesion_mask")}
    two_images = {**sample, "images": sample["images"] * 2}
    two_images["messages"] = copy.deepcopy(sample["messages"])
    two_images["messages"][0]["content"] = "<image>" + two_images["messages"][0]["content"]
    batch = processor([sample, plain, two_images])
    targets = batch["objective_targets"]["lesion_count"]
    assert targets.shape == (4 * 64,)
    points = len(record.row["lesion_points"])
    assert float(targets[:64].sum()) == points and float(targets[128:192].sum()) == points
    assert (targets[64:128] == -1).all() and (targets[192:] == -1).all()
    assert "objective_targets" not in processor([plain])
    outside = {**sample, "lesion_points": [[10.0, 500.0]]}
    with pytest.raises(ProcessorError, match=r"lesion_points \[\[10.0, 500.0\]\] lie outside the first image"):
        processor(outside)


def test_validation_names_a_bad_point(corpus):
    rows = [r.row for r in _records(corpus) if r.row["task"] != "document"][:3]
    rows[1] = {**rows[1], "lesion_points": [[12.0, 9999.0]]}
    rows[2] = {**rows[2], "lesion_points": [[1.0]]}
    path = corpus / "bad_points.jsonl"  # next to the corpus, whose relative image paths it keeps
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = validate_files([path])
    assert report.ok == 1 and report.rejected == 2
    issues = {issue.line: issue for issue in report.skips.issues}
    assert issues[2].reason == "point_outside" and "lesion_points[0] = [12.0, 9999.0]" in issues[2].message
    assert issues[3].reason == "schema" and "'lesion_points' must be a list of [x, y]" in issues[3].message


def test_loss_trains_the_vision_tower_and_only_when_targets_are_given(corpus, tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    assert model.config.lesion_count_loss_weight > 0 and model.lesion_count_head is not None
    options = ValidationOptions.for_processor(processor)
    samples = [load_sample(r, options) for r in _records(corpus) if _count_question(r)][:3]
    for sample in samples:
        sample.pop("lesion_mask")
    batch = processor(samples)
    out = model(**batch)
    count_loss = out.aux_losses["lesion_count"]
    assert count_loss is not None and float(count_loss.detach()) > 0
    weight = model.config.lesion_count_loss_weight
    torch.testing.assert_close(out.loss, out.lm_loss + weight * count_loss)
    assert_trains_the_vision_tower_alone(model, count_loss)
    batch["objective_targets"].pop("lesion_count")
    with torch.no_grad():
        assert "lesion_count" not in (model(**batch).aux_losses or {})


def test_head_learns_the_counts_of_its_images(corpus, tiny):
    """Steps on the count loss alone bring the head's counts (its cells' probabilities summed) to the
    images' numbers of lesions: the targets carry a signal the vision tower can follow."""
    model, processor = tiny
    model = copy.deepcopy(model).train()
    options = ValidationOptions.for_processor(processor)
    records, images = [], set()
    for record in _records(corpus):
        if record.row["task"] != "document" and record.row["images"][0] not in images:
            images.add(record.row["images"][0])
            records.append(record)
    records = records[:12]
    batch = processor([load_sample(r, options) for r in records])
    counts = torch.tensor([float(len(r.row["lesion_points"])) for r in records])
    assert len(set(counts.tolist())) > 1

    def count_error() -> float:
        with torch.no_grad():
            tokens = model.mllm.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            read = torch.stack([model.lesion_count_head.count(t) for t in tokens.split(64)])
        return float((read - counts).abs().mean())

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = count_error()
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch).aux_losses["lesion_count"].backward()
        optimizer.step()
    assert count_error() < 0.3 * before


def test_loss_refuses_targets_from_another_processor():
    head = LesionCountHead(8)
    with pytest.raises(ValueError, match="lesion_count targets have 5 entries but the images gave 4"):
        head.loss(torch.zeros(4, 8), torch.zeros(5), [4])
    assert head.loss(torch.zeros(4, 8), torch.full((4,), -1.0), [4]) is None


def test_numpy_points_are_plain_lists_in_rows(corpus):
    row = next(r.row for r in _records(corpus) if r.row["task"] != "document" and r.row["lesion_points"])
    assert all(isinstance(v, float) for point in row["lesion_points"] for v in point)
    assert np.asarray(row["lesion_points"]).shape[1] == 2
