"""Packing: a packed batch gives the same losses as the same samples padded; dataset + collator end to end."""

from __future__ import annotations

import inspect
import json
import logging

import numpy as np
import pytest
import torch

from citrus_v.data.collator import CitrusVCollator
from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.dataset import RowDataset, SkippedRow
from citrus_v.data.packing import pack_encoded, packed_stats, padded_stats, plan_packs, rope_positions
from citrus_v.processing.template import SampleTooLongError

from .conftest import phantom, seg_sample


def _samples() -> list[dict]:
    wide = np.full((300, 200), 60, dtype=np.uint8)  # a non-square image: a 3-D rope grid that is not square
    wide[100:150, 50:120] = 200
    return [
        seg_sample(1, seed=1),
        {"messages": [{"role": "user", "content": "<image>Is there a lesion?"},
                      {"role": "assistant", "content": "yes"}],
         "images": [phantom(2).image]},
        seg_sample(2, seed=3),
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
                      {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye."}]},
        {"messages": [{"role": "user", "content": "<image>Locate the lesion."},
                      {"role": "assistant",
                       "content": '```json\n[{"bbox_2d": [50,100,120,150],"label": "lesion"}]```'}],
         "images": [wide]},
    ]


def _losses(out) -> list[float]:
    return [float(out.loss), float(out.lm_loss), float(out.mask_bce_loss), float(out.mask_dice_loss)]


def test_packed_loss_equals_unpacked_loss(tiny):
    model, processor = tiny
    samples = _samples()
    collator = CitrusVCollator(processor, packing=True, max_length=400)
    with torch.no_grad():
        reference = model(**processor(samples))
        batch = collator(samples)
        packed = model(**batch)
    assert batch["input_ids"].shape[0] < len(samples)  # really packed
    assert "attention_mask" not in batch and batch["position_ids"].shape[0] == 4
    assert batch.stats.efficiency > padded_stats([len(r) for r in processor(samples)["input_ids"]], 5).efficiency - 1
    np.testing.assert_allclose(_losses(packed), _losses(reference), rtol=1e-5, atol=1e-6)
    # the same masks, in [SEG] order, one SAM image per packed row
    assert sum(m.shape[0] for m in batch["gt_masks"]) == 3
    # negative controls: without per-sample positions the loss changes (the test can fail)
    broken = dict(batch)
    length = batch["input_ids"].shape[1]
    broken["position_ids"] = torch.arange(length).view(1, 1, -1).expand(4, batch["input_ids"].shape[0], -1).clone()
    with torch.no_grad():
        assert abs(float(model(**broken).lm_loss) - float(reference.lm_loss)) > 1e-3
    leaky = dict(batch)
    leaky["position_ids"] = batch["position_ids"].clone()
    leaky["position_ids"][0] = torch.arange(length)  # 3-D rope per sample, but attention spans the row
    with torch.no_grad():
        assert abs(float(model(**leaky).lm_loss) - float(reference.lm_loss)) > 1e-3


def test_rope_positions_match_transformers_on_a_single_sample(tiny):
    model, processor = tiny
    encoded = processor.encode_sample(_samples()[4])
    ids = torch.tensor(encoded["input_ids"]).view(1, -1)
    expected, _ = model.mllm.model.get_rope_index(
        ids, mm_token_type_ids=(ids == processor.image_token_id).int(), image_grid_thw=encoded["image_grid_thw"]
    )
    ours = rope_positions(ids[0], processor.image_token_id, encoded["image_grid_thw"], 2)
    assert torch.equal(ours, expected[:, 0])
    image = ids[0] == processor.image_token_id
    span = [int(ours[axis][image].max() - ours[axis][image].min()) for axis in (1, 2)]
    assert span[0] != span[1]  # 300x200 image: the height and width grids differ


def test_plan_packs_respects_length_and_one_seg_sample_per_row():
    lengths = [500, 300, 200, 900, 100, 1000, 60]
    has_seg = [True, True, False, False, True, False, False]
    packs = plan_packs(lengths, 1000, has_seg)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    for pack in packs:
        assert sum(lengths[i] for i in pack) <= 1000 and sum(has_seg[i] for i in pack) <= 1
    stats = packed_stats(lengths, packs, 1000)
    assert stats.real_tokens == sum(lengths) and stats.efficiency == pytest.approx(sum(lengths) / (1000 * len(packs)))
    with pytest.raises(ValueError, match="drop it before packing"):
        plan_packs([1200], 1000)


def test_two_seg_samples_in_one_row_is_refused(tiny):
    _, processor = tiny
    encoded = [processor.encode_sample(seg_sample(1, seed=k)) for k in range(2)]
    with pytest.raises(ValueError, match="max_seg_samples=1"):
        pack_encoded(encoded, [[0, 1]], 0, processor.image_token_id, 2, processor.sam_image_size, processor.mask_size)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("packcorpus")
    write_corpus(out, CorpusOptions(n=12, seed=5))
    return out


def test_dataset_and_collator_end_to_end(tiny, small_corpus, caplog):
    model, processor = tiny
    path = small_corpus / "train.jsonl"
    dataset = RowDataset.from_jsonl([path], processor)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(dataset) == len(rows) and dataset.skips.total == 0
    items = [dataset[i] for i in range(len(dataset))]
    # predicted token lengths equal the encoded ones
    encoded_lengths = [len(processor.encode_sample(item["sample"])["input_ids"]) for item in items]
    assert encoded_lengths == dataset.lengths
    seg = next(i for i, r in enumerate(rows) if r.get("masks"))
    assert items[seg]["sample"]["masks"][0].dtype == bool and items[seg]["where"] == f"{path}:{seg + 1}"
    padded = CitrusVCollator(processor)(items[:6])
    packed = CitrusVCollator(processor, packing=True, max_length=1024)(items[:6])
    assert padded.num_samples == packed.num_samples == 6 and packed["input_ids"].shape[0] < 6
    with torch.no_grad():
        np.testing.assert_allclose(_losses(model(**packed)), _losses(model(**padded)), rtol=1e-5, atol=1e-6)
    plain = [k for k, r in enumerate(rows) if not r.get("masks")][:8]
    fixed = CitrusVCollator(processor, packing=True, max_length=1024, pad_to_max_length=True)([items[k] for k in plain])
    assert fixed["input_ids"].shape[1] == 1024 and fixed["input_ids"].shape[0] < len(plain)
    assert fixed.stats.real_tokens == sum(dataset.lengths[k] for k in plain)
    assert fixed.stats.padded_tokens == fixed["input_ids"].numel()
    # over-long samples are dropped with a counted, logged reason, never cut
    shortest = sorted(dataset.lengths[:6])[2]  # keeps at least three of the six
    collator = CitrusVCollator(processor, max_length=shortest)
    with caplog.at_level(logging.WARNING, logger="citrus_v.data"):
        batch = collator(items[:6])
    assert batch is not None and batch.num_samples == sum(n <= shortest for n in dataset.lengths[:6])
    assert collator.skips.counts["too_long"] == 6 - batch.num_samples > 0
    assert "too_long" in caplog.text and str(path) in caplog.text
    trimmed = RowDataset.from_jsonl([path], processor, max_length=shortest)
    assert len(trimmed) + trimmed.skips.counts["too_long"] == len(rows)
    with pytest.raises(SampleTooLongError, match="dropped, not cut"):
        processor.encode_sample(items[0]["sample"], max_length=10)


def test_collator_counts_rows_that_fail_to_load(tiny, small_corpus, tmp_path):
    _, processor = tiny
    rows = [json.loads(line) for line in (small_corpus / "train.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["images"][0].endswith(".png"))
    good = dict(row, images=[str(small_corpus / row["images"][0])], masks=[])
    good["messages"] = [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "A scan."}]
    gone = dict(good, images=[str(tmp_path / "gone.png")])
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(gone) + "\n")
    dataset = RowDataset.from_jsonl([path], processor)
    assert len(dataset) == 1 and dataset.skips.counts == {"missing_file": 1}
    # a file that disappears after validation is caught when loading
    (tmp_path / "copy.png").write_bytes((small_corpus / row["images"][0]).read_bytes())
    path.write_text(json.dumps(dict(good, images=["copy.png"])) + "\n")
    dataset = RowDataset.from_jsonl([path], processor)
    (tmp_path / "copy.png").unlink()
    item = dataset[0]
    assert isinstance(item, SkippedRow) and item.issue.reason == "missing_file" and item.issue.line == 1
    collator = CitrusVCollator(processor)
    assert collator([item]) is None and collator.skips.summary() == "skipped 1 row(s): missing_file 1"


def test_several_seg_samples_per_row_carry_one_sam_image_per_seg(tiny):
    model, processor = tiny
    samples = _samples()
    encoded = [processor.encode_sample(s) for s in samples]
    collator = CitrusVCollator(processor, packing=True, max_length=2048, max_seg_samples=8)
    batch = collator(samples)
    assert batch["input_ids"].shape[0] == 1  # everything fits one row
    assert batch["sam_pixel_values"].shape[0] == 2 and "sam_image_mask" not in batch
    # [SEG] k of the row points at the SAM image of the sample it came from, masks in the same order
    assert batch["seg_image_index"][0].tolist() == [0, 1, 1]
    assert torch.equal(batch["sam_pixel_values"][0], encoded[0]["sam_pixel_values"])
    assert torch.equal(batch["sam_pixel_values"][1], encoded[2]["sam_pixel_values"])
    assert torch.equal(batch["gt_masks"][0], torch.cat([encoded[0]["gt_masks"], encoded[2]["gt_masks"]]))
    if "seg_image_index" not in inspect.signature(model.forward).parameters:
        pytest.skip("the model does not read seg_image_index yet; the padded equivalence test covers packing")
    with torch.no_grad():
        np.testing.assert_allclose(_losses(model(**batch)), _losses(model(**processor(samples))), rtol=1e-5, atol=1e-6)
