"""SAM's own objective for a random-init SAM 2 (the best of its candidates trains, the IoU head learns each
candidate's IoU) and the single-mask output the tiny preset uses."""

from __future__ import annotations

import copy

import torch

from citrus_v.modeling.losses import dice_loss_sum, mask_bce_sum

from .conftest import seg_sample


def _batch(processor, seeds=(1, 2, 3)):
    return processor([seg_sample(2, seed=s) for s in seeds])


def _points(out, i: int):
    """Sample ``i``'s predicted ``[SEG]`` points (None for a model without the point head)."""
    return None if out.predicted_points is None else out.predicted_points[i]


def test_loss_goes_to_the_best_candidate_and_the_iou_head(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    assert model.config.multimask_min_loss
    model.config.multimask_output = True  # upstream's three candidates
    model.config.point_prompt_probability = 0.0  # no random points: the decode below must match
    batch = _batch(processor)
    out = model(**batch)
    with torch.no_grad():
        features = model.grounding_encoder.image_features(batch["sam_pixel_values"])
    best_bce = best_dice = 0.0
    count = sum(m.shape[0] for m in batch["gt_masks"])
    for i, target in enumerate(batch["gt_masks"]):
        with torch.no_grad():
            decoded = model.grounding_encoder.decode(
                features.select(i), out.seg_embeddings[i], True, points=_points(out, i)
            )
        assert decoded.candidates.shape[:2] == (target.shape[0], 3)
        for k in range(target.shape[0]):
            costs = [
                2.0 * float(mask_bce_sum(c[None], target[k : k + 1])) + float(dice_loss_sum(c[None], target[k : k + 1]))
                for c in decoded.candidates[k]
            ]
            pick = decoded.candidates[k, int(torch.tensor(costs).argmin())][None]
            best_bce += float(mask_bce_sum(pick, target[k : k + 1]))
            best_dice += float(dice_loss_sum(pick, target[k : k + 1]))
    assert abs(float(out.mask_bce_loss) - best_bce / count) < 1e-4
    assert abs(float(out.mask_dice_loss) - best_dice / count) < 1e-4
    assert out.mask_iou_loss is not None and float(out.mask_iou_loss) > 0
    model.zero_grad()
    out.mask_iou_loss.backward()
    head = model.grounding_encoder.mask_decoder.iou_prediction_head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_upstream_objective_is_unchanged_when_off(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    model.config.multimask_min_loss = False
    model.config.multimask_output = True
    batch = _batch(processor)
    out = model(**batch)
    assert out.mask_iou_loss is None
    target = torch.cat(batch["gt_masks"])
    chosen = torch.cat(out.pred_masks)
    torch.testing.assert_close(out.mask_bce_loss, mask_bce_sum(chosen, target) / target.shape[0])
    aux = out.aux_losses or {}
    assert set(aux) <= {"lesion_map", "point"}
    weights = {o.log_name: o.weight(model.config) for o in model.objectives}
    torch.testing.assert_close(out.loss, out.lm_loss + 2.0 * out.mask_bce_loss + out.mask_dice_loss
                               + weights["lesion_map"] * aux.get("lesion_map", 0.0)
                               + weights["point"] * aux.get("point", 0.0))
    assert out.presence_loss is None


def test_iou_head_learns_to_rank_the_candidates(tiny):
    """A few steps bring the predicted IoU of every candidate towards its real IoU (so inference's "keep the
    highest predicted IoU" keeps a good mask)."""
    model, processor = tiny
    model = copy.deepcopy(model).train()
    batch = _batch(processor, seeds=(1, 2, 3, 4))
    optimizer = torch.optim.Adam(model.grounding_encoder.mask_decoder.iou_prediction_head.parameters(), lr=3e-3)

    def iou_error() -> float:
        with torch.no_grad():
            return float(model(**batch).mask_iou_loss)

    before = iou_error()
    for _ in range(25):
        optimizer.zero_grad()
        out = model(**batch)
        out.mask_iou_loss.backward()
        optimizer.step()
    assert iou_error() < 0.5 * before


def test_single_mask_output_gives_one_candidate_the_preset_trains_and_serves(tiny):
    """The tiny preset asks SAM for its single-mask output: one candidate, no selection to get wrong."""
    model, processor = tiny
    assert model.config.multimask_output is False
    batch = _batch(processor, seeds=(5,))
    with torch.no_grad():
        out = model(**batch)
        features = model.grounding_encoder.image_features(batch["sam_pixel_values"])
        points = _points(out, 0)
        decoded = model.grounding_encoder.decode(features, out.seg_embeddings[0], False, points=points)
        three = model.grounding_encoder.decode(features, out.seg_embeddings[0], True, points=points)
    assert decoded.candidates.shape[1] == 1 and three.candidates.shape[1] == 3
    torch.testing.assert_close(out.pred_masks[0], decoded.logits)
    assert not torch.allclose(decoded.logits, three.logits)
    # the predictor decodes the same way: test_predictor compares its masks with this forward pass
