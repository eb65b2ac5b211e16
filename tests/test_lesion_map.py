"""The training-only lesion-map loss, the corpus rows that feed it, and per-task mixing with FILE#N."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.validate import ValidationOptions, validate_files
from citrus_v.media import read_mask
from citrus_v.objectives.lesion_map import lesion_map_target
from citrus_v.processing.processor import ProcessorError
from citrus_v.recipes.tiny_base import mixed_dataset, split_by_task

from .conftest import assert_trains_the_vision_tower_alone, phantom


def _sample(seed: int = 0, with_map: bool = True, images: int = 1) -> dict:
    p = phantom(seed)
    sample = {
        "messages": [
            {"role": "user", "content": "<image>" * images + "Is there a lesion?"},
            {"role": "assistant", "content": "yes"},
        ],
        "images": [p.image] * images,
    }
    if with_map:
        sample["lesion_mask"] = p.masks["lesion"]
    return sample


def test_targets_follow_the_merged_token_grid():
    mask = np.zeros((224, 224), dtype=bool)
    mask[0:5, 0:5] = True  # top-left cell
    mask[200:224, 60:70] = True  # bottom row, cells 2 (x 56-83)
    target = lesion_map_target(mask, (8, 8))
    assert target.shape == (64,)
    expected = torch.zeros(64)
    expected[0] = 1
    expected[7 * 8 + 2] = 1
    torch.testing.assert_close(target, expected)


def test_processor_lines_targets_up_with_image_tokens(tiny):
    _, processor = tiny
    batch = processor([_sample(0), _sample(1, with_map=False), _sample(2, images=2)])
    targets = batch["objective_targets"]["lesion_map"]
    merge = processor.image_processor.merge_size
    tokens = int(batch["image_grid_thw"].prod(dim=-1).sum()) // merge**2
    assert targets.shape == (tokens,)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == tokens
    # sample 0 and the first image of sample 2 carry maps; sample 1 and sample 2's second image are ignored
    assert (targets[64:128] == -1).all() and (targets[256:] == -1).all()
    assert set(targets[:64].tolist()) == {0.0, 1.0}
    # no map anywhere: no key, so plain batches are unchanged
    assert "objective_targets" not in processor([_sample(0, with_map=False)])
    wrong = _sample(0)
    wrong["lesion_mask"] = np.zeros((10, 10), dtype=bool)
    with pytest.raises(ProcessorError, match="lesion_mask is 10x10 but the first image is 224x224"):
        processor(wrong)


def test_loss_trains_the_vision_tower_and_only_when_targets_are_given(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    assert model.config.lesion_map_loss_weight > 0 and model.lesion_map_head is not None
    batch = processor([_sample(0), _sample(3)])
    out = model(**batch)
    lesion_loss = out.aux_losses["lesion_map"]
    assert lesion_loss is not None and float(lesion_loss.detach()) > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.lesion_map_loss_weight * lesion_loss)
    # the map's gradient alone reaches the vision tower's first block
    assert_trains_the_vision_tower_alone(model, lesion_loss)
    # without targets (inference, or rows without a map) the head is not used
    batch.pop("objective_targets")
    with torch.no_grad():
        plain = model(**batch)
    assert "lesion_map" not in (plain.aux_losses or {})
    torch.testing.assert_close(plain.loss, plain.lm_loss)


def test_head_learns_where_the_lesion_is(tiny):
    """A few steps on the head's loss alone lower it on held-out phantoms: the targets carry real signal."""
    model, processor = tiny
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    train = processor([_sample(s) for s in range(6)])
    held_out = processor([_sample(s) for s in range(100, 104)])

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(model(**held_out).aux_losses["lesion_map"])

    before = held_out_loss()
    for _ in range(12):
        optimizer.zero_grad()
        model(**train).aux_losses["lesion_map"].backward()
        optimizer.step()
    assert held_out_loss() < 0.8 * before


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lesion_corpus")
    write_corpus(out, CorpusOptions(n=40, seed=11))
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_rows_carry_lesion_maps_and_number_lesions_left_to_right(corpus):
    rows = [r for s in ("train", "val", "test") for r in _rows(corpus / f"{s}.jsonl")]
    scans = [r for r in rows if r["task"] != "document"]
    assert scans and all("lesion_mask" in r for r in scans)
    assert all("lesion_mask" not in r for r in rows if r["task"] == "document")
    several = [r for r in rows if r["task"] == "segmentation" and len(r.get("masks", [])) > 1]
    assert several, "the corpus should hold 'segment every lesion' rows"
    for row in several:
        assert "from left to right" in row["messages"][1]["content"]
        base = corpus
        masks = [read_mask(m, base) for m in row["masks"]]
        centres = [float(np.nonzero(m)[1].mean()) for m in masks]
        assert centres == sorted(centres)
        union = read_mask(row["lesion_mask"], base)
        assert all((m & ~union).sum() == 0 for m in masks)  # every lesion mask lies inside the map
    report = validate_files([corpus / "train.jsonl"], ValidationOptions(decode=True))
    assert report.rejected == 0


def test_documents_are_slips_of_one_character_per_merged_token(corpus, tiny):
    from PIL import Image

    _, processor = tiny
    docs = [r for r in _rows(corpus / "train.jsonl") if r["task"] == "document"]
    assert docs
    image = Image.open(corpus / docs[0]["images"][0])
    assert image.size == (896, 224)
    # the tiny processor keeps that size: 8 x 32 merged tokens of 28 px, one per printed character
    grid = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 16, 64]]


def test_file_hash_n_repeats_a_file_to_set_the_task_mix(corpus, tiny_dir, tmp_path):
    from citrus_v.processing.processor import CitrusVProcessor
    from citrus_v.train.arguments import SftArguments
    from citrus_v.train.data import build_train_dataset

    files = split_by_task(corpus / "train.jsonl")
    assert set(files) >= {"segmentation", "detection", "document"}
    counts = {t: len(_rows(f)) for t, f in files.items()}
    assert sum(counts.values()) == len(_rows(corpus / "train.jsonl"))
    wanted = 3 * counts["document"] + 2
    entries = mixed_dataset(files, {"document": 1.0, "detection": 1.0}, 2 * wanted)
    assert entries == [f"{files['document']}#{wanted}", f"{files['detection']}#{wanted}"]
    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    args = SftArguments(model=str(tiny_dir), dataset=entries, output_dir=str(tmp_path))
    dataset, _, _ = build_train_dataset(args, processor)
    tasks = [record.row["task"] for record in dataset.records]
    assert tasks.count("document") == wanted and tasks.count("detection") == wanted
    # every document row appears three times, two of them a fourth time
    lines = [record.line for record in dataset.records if record.row["task"] == "document"]
    assert sorted(np.unique(lines, return_counts=True)[1].tolist()) == [3] * (counts["document"] - 2) + [4, 4]
    with pytest.raises(ValueError, match="no rows for task"):
        mixed_dataset(files, {"nonexistent": 1.0}, 10)
