"""Training on volume and clip rows: SAM 2's training frames and 3-D targets, per-frame mask and presence losses,
the memory modules in stage 4, packing with videos, and the 2-D losses left as they were.

Rows come from the synthetic corpus (``write_corpus``: NIfTI CT/MR volumes with label volumes, an ultrasound cine
clip); the truth is read back from the label volumes with nibabel through ``read_volume``, not from the code under
test.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from citrus_v import CitrusV
from citrus_v.data.collator import CitrusVCollator
from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.dataset import RowDataset
from citrus_v.media import parse_ref, read_volume
from citrus_v.processing.images import mask_target
from citrus_v.processing.processor import ProcessorError
from citrus_v.train.stages import COMPONENTS, STAGES, FreezePlan, describe_components, parameter_table

from .conftest import seg_sample

CORPUS = dict(n=2, seed=3, volumes=2, volume_slices=(8, 10), volume_size=(64, 64), clips=1, clip_frames=(4, 6),
              clip_size=64, absent_share=0.3)  # fmt: skip
SMALL_MEMORY = {"memory_attention_num_layers": 1}
LOSS_FIELDS = ("lm_loss", "mask_bce_loss", "mask_dice_loss", "mask_iou_loss")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus-train3d")
    write_corpus(out, CorpusOptions(**CORPUS))
    return out


@pytest.fixture(scope="module")
def rows(corpus, tiny) -> RowDataset:
    return RowDataset.from_jsonl([corpus / "train.jsonl"], tiny[1])


def _truth(ref: str, base: Path) -> np.ndarray:
    """A 3-D mask reference as the corpus documents it: the label volume's frames, the named values selected."""
    return np.isin(read_volume(ref, base).values, parse_ref(ref, base).label)


def _index(rows: RowDataset, wanted) -> int:
    return next(i for i, record in enumerate(rows.records) if wanted(record.row))


def _partial_target(row: dict) -> bool:
    """A volume row whose one target is on some frames and not on others."""
    if not row.get("videos") or len(row.get("masks") or []) != 1 or row["meta"].get("kind") != "volume":
        return False
    (first, last), frames = row["meta"]["slices"][0], row["meta"]["shape"][0]
    return first > 1 or last < frames - 2


def _items(rows: RowDataset) -> list[dict]:
    """A 2-D segmentation row, a volume segmentation row and an absent-target volume row."""
    picks = (
        lambda r: r["task"] == "segmentation" and r.get("masks"),
        _partial_target,
        lambda r: r.get("videos") and r["meta"].get("absent"),
    )
    return [rows[_index(rows, wanted)] for wanted in picks]


# --- targets ---------------------------------------------------------------------------------------------------------
def test_a_volume_row_gives_sam_frames_with_and_without_the_target_and_its_3d_targets(rows, corpus, tiny):
    _, processor = tiny
    index = _index(rows, _partial_target)
    item = rows[index]
    sample = item["sample"]
    row = rows.records[index].row
    # the dataset resolves the references against the JSONL file's folder, and keeps them references
    assert all(os.path.isabs(str(ref).split("#")[0]) for ref in [*sample["videos"], *sample["masks"]])
    encoded = processor.encode_sample(sample, sam_frames=4, seed=7)
    truth = _truth(row["masks"][0], corpus)  # [N, H, W]
    frames = encoded["sam_video_frames"]
    size = processor.sam_image_size
    assert tuple(encoded["sam_video_pixel_values"].shape) == (4, 3, size, size)
    assert tuple(encoded["gt_video_masks"].shape) == (1, 4, processor.mask_size, processor.mask_size)
    assert encoded["gt_video_present"].dtype == torch.bool and tuple(encoded["gt_video_present"].shape) == (1, 4)
    assert frames == sorted(set(frames)) and all(0 <= k < truth.shape[0] for k in frames)
    on_frame = truth.reshape(truth.shape[0], -1).any(axis=1)
    assert encoded["gt_video_present"][0].tolist() == on_frame[frames].tolist()
    assert encoded["gt_video_present"][0].sum() == 2  # half of the frames without the target, the rest with it
    hw = (processor.mask_size, processor.mask_size)
    for position, k in enumerate(frames):
        assert torch.equal(encoded["gt_video_masks"][0, position], mask_target(truth[k], hw))
    assert encoded["gt_masks"].shape[0] == 0 and encoded["sam_pixel_values"] is None  # no 2-D target
    # the same seed and draw give the same frames; other draws other frames
    assert processor.encode_sample(sample, sam_frames=4, seed=7)["sam_video_frames"] == frames
    draws = {tuple(processor.encode_sample({**sample, "frame_draw": d}, sam_frames=4, seed=7)["sam_video_frames"])
             for d in range(8)}  # fmt: skip
    assert len(draws) > 1
    rows.set_epoch(1)
    assert rows[index]["sample"]["frame_draw"] == len(rows) + index
    rows.set_epoch(0)


def test_a_clip_with_fewer_frames_than_asked_trains_on_every_frame(rows, corpus, tiny):
    _, processor = tiny
    index = _index(rows, lambda r: r["meta"].get("kind") == "clip" and r.get("masks"))
    row = rows.records[index].row
    encoded = processor.encode_sample(rows[index]["sample"], sam_frames=16)
    count = row["meta"]["shape"][0]
    assert encoded["sam_video_frames"] == list(range(count))
    truth = _truth(row["masks"][0], corpus)
    assert encoded["gt_video_present"][0].tolist() == truth.reshape(count, -1).any(axis=1).tolist()


def test_video_masks_that_do_not_fit_are_refused_with_the_shapes(rows, tiny):
    _, processor = tiny
    sample = rows[_index(rows, _partial_target)]["sample"]
    frames = read_volume(sample["videos"][0]).num_frames
    with pytest.raises(ProcessorError, match=rf"masks\[0\] is {frames + 1} frame\(s\) of 64x64 but videos\[0\] is "
                       rf"{frames} frame\(s\) of 64x64"):  # fmt: skip
        processor([{**sample, "masks": [np.ones((frames + 1, 64, 64), bool)]}])
    with pytest.raises(ProcessorError, match=r"3-D masks of videos\[0\]: a video's mask must be \[frames, H, W\]"):
        processor([{**sample, "masks": [np.ones((64, 64), bool)]}])


# --- losses --------------------------------------------------------------------------------------------------------
def test_one_step_on_image_volume_and_absent_rows_trains_the_projector_from_the_volume(rows, tiny):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    model.config.presence_loss_weight = 1.0  # as a volume recipe sets it (off by default, as upstream trains)
    batch = CitrusVCollator(processor, sam_train_frames=4)(_items(rows))
    assert not batch.skipped and batch["gt_video_masks"][0] is None and batch["gt_video_masks"][2] is None
    model.train()
    out = model(**dict(batch))
    for name in (*LOSS_FIELDS, "video_mask_bce_loss", "video_mask_dice_loss", "presence_loss", "loss"):
        value = getattr(out, name)
        assert value is not None and torch.isfinite(value), name
    assert out.pred_masks[1].shape[0] == 0 and tuple(out.pred_video_masks[1].shape[:2]) == (1, 4)
    assert out.pred_video_masks[0] is None and out.pred_video_masks[2] is None  # the absent row has no [SEG]
    # the volume row's mask losses alone reach the seg projector (through HookGrad) and SAM 2's decoder
    (out.video_mask_bce_loss + out.video_mask_dice_loss).backward(retain_graph=True)
    projector = [p.grad for p in model.seg_projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in projector)
    model.zero_grad()
    out.presence_loss.backward()
    head = model.grounding_encoder.mask_decoder.pred_obj_score_head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_the_point_head_learns_where_a_volumes_target_is_on_its_largest_training_frame(rows, tiny):
    """Inference gives SAM 2 a volume [SEG]'s one point on every frame: the point loss trains it towards the
    target's innermost pixel on the training frame where the target is largest."""
    from citrus_v.objectives.base import ObjectiveInputs
    from citrus_v.objectives.point_loss import PointLoss

    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    masks = torch.zeros(1, 3, 16, 16)
    masks[0, 0, 2:4, 2:4] = 1  # small, top left
    masks[0, 1, 9:14, 5:10] = 1  # largest: 5 x 5 around (7, 11)
    predicted = torch.tensor([[0.0, 0.0]], requires_grad=True)  # SAM input pixels
    inputs = ObjectiveInputs(model, None, video_seg_points=[predicted], video_masks=[masks], num_video_masks=1)
    size = model.grounding_encoder.image_size
    expected = ((0.5 / size - 7.5 / 16) + (0.5 / size - 11.5 / 16)) / 2  # L1 in side fractions, x and y averaged
    assert PointLoss().loss(inputs).item() == pytest.approx(-expected, abs=1e-6)
    # end to end: a volume row alone sends the point loss into the point head
    batch = CitrusVCollator(processor, sam_train_frames=4)(_items(rows)[1:2])
    model.train()
    out = model(**dict(batch))
    assert out.aux_losses["point"] > 0
    out.aux_losses["point"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.seg_point_head.parameters())


def test_presence_is_the_only_new_term_of_a_batch_of_images(tiny):
    """On 2-D rows the losses are those of the image path: with the presence weight 0 the loss is exactly theirs,
    and the presence term (every [SEG] present) is what a weight of 1 adds."""
    processor = tiny[1]
    batch = processor([seg_sample(2, seed=1), seg_sample(1, seed=2), seg_sample(0, seed=3)])
    assert "gt_video_masks" not in batch
    outputs = {}
    for weight in (0.0, 1.0):
        model = copy.deepcopy(tiny[0])
        model.config.presence_loss_weight = weight
        with torch.no_grad():
            outputs[weight] = model(**batch)
    plain, with_presence = outputs[0.0], outputs[1.0]
    assert plain.presence_loss is None and with_presence.presence_loss is not None
    for name in LOSS_FIELDS:
        assert torch.equal(getattr(plain, name), getattr(with_presence, name)), name
    assert torch.equal(with_presence.loss, plain.loss + 1.0 * with_presence.presence_loss)
    # the presence term: SAM 2's object score of every [SEG] against "present", averaged over the 3 masks
    grounding = tiny[0].grounding_encoder
    with torch.no_grad():
        features = grounding.image_features(batch["sam_pixel_values"])
        scores = torch.cat([
            grounding.decode(features.select(i), emb, tiny[0].config.multimask_output,
                             points=None if pts is None else pts).object_scores
            for i, (emb, pts) in enumerate(zip(plain.seg_embeddings, plain.predicted_points, strict=True))
            if emb.shape[0]
        ])  # fmt: skip
    expected = torch.nn.functional.softplus(-scores.float()).sum() / 3
    torch.testing.assert_close(with_presence.presence_loss, expected)


# --- stages --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memory_model(tiny_dir) -> CitrusV:
    from citrus_v.modeling import CitrusVConfig

    config = CitrusVConfig.from_pretrained(tiny_dir)
    config.sam2_memory_config = SMALL_MEMORY
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CitrusV.from_pretrained(tiny_dir, config=config)


def test_stage_4_alone_trains_the_memory_modules_and_the_object_score_head_trains_with_the_decoder(memory_model):
    model = copy.deepcopy(memory_model)
    memory = [name for name, _ in model.named_parameters() if name.startswith("propagator.")]
    head = [name for name, _ in model.named_parameters() if "pred_obj_score_head" in name or "obj_score_token" in name]
    assert memory and head
    for stage in (1, 2, 3, 4, None):
        FreezePlan(stage=stage).apply(model)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert all((name in trainable) == (stage == 4) for name in memory), stage
        assert all((name in trainable) == (stage in (3, 4, None)) for name in head), stage
    FreezePlan(stage=3, trainable_parameters=["propagator"]).apply(model)
    assert all(p.requires_grad for p in model.propagator.parameters())
    FreezePlan(stage=4).apply(model)
    table = parameter_table(model)
    memory_row = next(line for line in table.splitlines() if line.startswith("sam memory"))
    assert int(memory_row.split()[2].replace(",", "")) == sum(p.numel() for p in model.propagator.parameters())
    assert describe_components(STAGES[3][0]) == "everything but sam memory"
    assert describe_components(set(COMPONENTS)) == "everything"


def test_memory_propagation_trains_the_memory_modules_in_stage_4(rows, memory_model, tiny):
    model = copy.deepcopy(memory_model)
    model.config.train_propagation = "memory"
    FreezePlan(stage=4).apply(model)
    items = [rows[_index(rows, _partial_target)]]
    batch = CitrusVCollator(tiny[1], sam_train_frames=4)(items)
    model.train()
    out = model(**dict(batch))
    assert torch.isfinite(out.loss) and out.video_object_scores[0].shape == (1, 4)
    out.loss.backward()
    grads = [p.grad for name, p in model.propagator.named_parameters() if "memory_attention" in name]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    plain = copy.deepcopy(tiny[0])
    plain.config.train_propagation = "memory"
    with pytest.raises(ValueError, match="needs SAM 2's memory modules.*Fix: train with per_frame"):
        plain(**dict(batch))


# --- packing -------------------------------------------------------------------------------------------------------
def test_a_packed_batch_with_a_volume_row_trains_with_each_samples_own_positions(rows, tiny):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    items = _items(rows)
    tokens_per_second = model.config.vision_config.tokens_per_second
    packed = CitrusVCollator(processor, packing=True, max_length=4096, max_seg_samples=64,
                             tokens_per_second=tokens_per_second)(items)  # fmt: skip
    padded = CitrusVCollator(processor)(items)
    assert packed["input_ids"].shape[0] == 1 and packed["seg_video_index"][0].tolist() == [-1, 0]
    assert (packed["mm_token_type_ids"] == 2).sum() == (padded["mm_token_type_ids"] == 2).sum() > 0
    # the volume sample's rotary positions are the ones the model gives it alone
    video = processor.encode_sample(items[1]["sample"])
    ids = torch.as_tensor(video["input_ids"])[None]
    alone, _ = model.mllm.model.get_rope_index(
        ids, mm_token_type_ids=processor.mm_token_type_ids(ids), video_grid_thw=video["video_grid_thw"],
        second_per_grid_ts=video["second_per_grid_ts"],
    )  # fmt: skip
    start = len(processor.encode_sample(items[0]["sample"])["input_ids"])
    assert torch.equal(packed["position_ids"][1:, 0, start : start + ids.shape[1]], alone[:, 0])
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out_packed = model(**dict(packed))
    out_packed.loss.backward()
    assert torch.isfinite(out_packed.loss) and out_packed.video_mask_bce_loss is not None
    with torch.no_grad():
        out_padded = model(**dict(padded))
    torch.testing.assert_close(out_packed.lm_loss, out_padded.lm_loss, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="tokens_per_second"):
        CitrusVCollator(processor, packing=True, max_length=4096, max_seg_samples=64)(items)


# --- sft -----------------------------------------------------------------------------------------------------------
def test_sft_stage_4_with_memory_logs_the_volume_losses_and_changes_the_memory(tmp_path, corpus, memory_model, tiny):
    from safetensors.torch import load_file

    from citrus_v.train.arguments import SftArguments
    from citrus_v.train.sft import SftError, run_sft

    folder = tmp_path / "with-memory"
    memory_model.save_pretrained(folder)
    tiny[1].save_pretrained(folder)
    dataset = corpus / "mix.jsonl"
    picked = [r for r in (json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines())
              if r["task"] in ("segmentation", "segmentation-3d")]  # fmt: skip
    dataset.write_text("".join(json.dumps(r) + "\n" for r in picked))
    common = dict(model=str(folder), dataset=[str(dataset)], max_steps=2, per_device_train_batch_size=4,
                  learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=["none"], max_length=4096,
                  train_propagation="memory", sam_train_frames=3, presence_loss_weight=1.0)  # fmt: skip
    with pytest.raises(SftError, match="which this run freezes.*Fix: --stage 4"):
        run_sft(SftArguments(**common, output_dir=str(tmp_path / "stage3"), stage=3))
    out = tmp_path / "stage4"
    run_sft(SftArguments(**common, output_dir=str(out), stage=4))
    logged = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "presence" in entry]
    assert steps and all(np.isfinite(entry["presence"]) for entry in steps)
    assert any("video_mask_bce" in entry for entry in steps)
    before, after = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    memory = [name for name in before if name.startswith("propagator.")]
    assert memory and any(not torch.equal(before[name], after[name]) for name in memory)
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith("mllm."))
