"""The CitrusV module: forward/backward, one mask per [SEG], HookGrad, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from citrus_v.modeling import CitrusV, SegTargetError, hook_grad
from citrus_v.modeling.losses import dice_loss_sum, mask_bce_sum
from citrus_v.objectives.point_loss import PointLoss

from .conftest import seg_sample


def test_forward_backward_all_losses_finite(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    batch = processor([seg_sample(2, seed=1), seg_sample(0, seed=2)])
    out = model(**batch)
    for name in ("loss", "lm_loss", "mask_bce_loss", "mask_dice_loss"):
        value = getattr(out, name)
        assert value is not None and math.isfinite(float(value.detach())), name
    assert float(out.mask_bce_loss) > 0 and float(out.mask_dice_loss) > 0
    expected = out.lm_loss + 2.0 * out.mask_bce_loss + 1.0 * out.mask_dice_loss
    if model.config.multimask_min_loss:  # the tiny preset trains SAM's IoU head too
        expected = expected + model.config.iou_loss_weight * out.mask_iou_loss
    if model.config.seg_point_head:  # and the [SEG] point head's
        expected = expected + PointLoss().weight(model.config) * out.aux_losses["point"]
    assert out.presence_loss is None  # SAM 2's presence loss is off by default, as upstream trains
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    grads = {
        "vision tower": model.mllm.model.visual.blocks[0].attn.qkv.weight.grad,
        "language model": model.mllm.model.language_model.layers[0].mlp.up_proj.weight.grad,
        "seg projector": model.seg_projector[0].weight.grad,
        "seg point head": model.seg_point_head.mlp[0].weight.grad,
        # SAM's image encoder must train: get_image_embeddings() would run it without gradients
        "SAM image encoder": model.grounding_encoder.vision_encoder.backbone.patch_embed.projection.weight.grad,
        "SAM mask decoder": model.grounding_encoder.mask_decoder.iou_token.weight.grad,
    }
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("num_seg", [0, 1, 3])
def test_one_mask_per_seg_token_in_order(tiny, num_seg):
    model, processor = tiny
    batch = processor(seg_sample(num_seg, seed=3))
    with torch.no_grad():
        out = model(**batch)
    h, w = model.mask_size
    assert out.pred_masks[0].shape == (num_seg, h, w)
    assert out.iou_scores[0].shape == (num_seg,)
    assert out.seg_embeddings[0].shape == (num_seg, model.seg_projector.prompt_dim)
    if num_seg:
        # mask k is the decoding of embedding k alone: order is kept and prompts do not mix
        with torch.no_grad():
            features = model.grounding_encoder.image_features(batch["sam_pixel_values"][:1])
            points = out.predicted_points
            for k in range(num_seg):
                single = model.grounding_encoder.decode(
                    features,
                    out.seg_embeddings[0][k : k + 1],
                    model.config.multimask_output,
                    points=None if points is None else points[0][k : k + 1],
                )
                torch.testing.assert_close(single.logits[0], out.pred_masks[0][k], rtol=1e-4, atol=1e-4)
    if num_seg == 3:
        # the three [SEG] tokens sit at different positions, so their embeddings differ
        assert not torch.allclose(out.seg_embeddings[0][0], out.seg_embeddings[0][1])


def test_seg_hidden_state_is_taken_at_the_seg_position(tiny):
    model, processor = tiny
    batch = processor(seg_sample(1, seed=4))
    with torch.no_grad():
        out = model(**batch)
        position = (batch["input_ids"][0] == model.config.seg_token_idx).nonzero()[0, 0]
        expected = model.seg_projector(out.last_hidden_state[0, position][None])
    torch.testing.assert_close(out.seg_embeddings[0], expected)


def _mask_only_grads(model: CitrusV, batch: dict, factor: float) -> dict[str, torch.Tensor]:
    model.config.hook_grad_factor = factor
    model.zero_grad()
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    (out.mask_bce_loss * 2.0 + out.mask_dice_loss).backward()
    named = dict(model.named_parameters())
    keep = {
        "projector": "seg_projector.0.weight",
        "llm": "mllm.model.language_model.layers.3.mlp.down_proj.weight",
        "sam_encoder": "grounding_encoder.vision_encoder.backbone.patch_embed.projection.weight",
        "sam_decoder": "grounding_encoder.mask_decoder.upscale_conv1.weight",
    }
    return {k: named[n].grad.detach().clone() for k, n in keep.items()}


def test_hook_grad_scales_projector_and_llm_not_sam(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    model.config.point_prompt_probability = 0.0  # the two passes must prompt SAM alike:
    model.seg_point_head.eval()  # no random points, and the point head's statistics held still
    batch = processor([seg_sample(2, seed=5)])
    full = _mask_only_grads(model, batch, 1.0)
    scaled = _mask_only_grads(model, batch, 0.001)
    for part in ("projector", "llm"):
        assert full[part].abs().sum() > 0
        torch.testing.assert_close(scaled[part], full[part] * 0.001, rtol=1e-4, atol=1e-10)
    for part in ("sam_encoder", "sam_decoder"):
        assert full[part].abs().sum() > 0
        torch.testing.assert_close(scaled[part], full[part], rtol=1e-5, atol=1e-8)


def test_hook_grad_leaves_value_and_lm_loss_untouched(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    batch = processor([seg_sample(1, seed=6)])
    grads = []
    for factor in (1.0, 0.001):
        model.config.hook_grad_factor = factor
        model.zero_grad()
        out = model(**batch)
        out.lm_loss.backward()
        grads.append(model.mllm.model.language_model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    x = torch.randn(4, 3, requires_grad=True)
    y = hook_grad(x, 0.25)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.25))


def test_mask_losses_average_over_the_accumulated_batch(tiny):
    model, processor = tiny
    batch = processor([seg_sample(2, seed=7)])
    batch.pop("labels")
    with torch.no_grad():
        local = model(**batch)
        accumulated = model(**batch, num_masks_in_batch=8)
    torch.testing.assert_close(accumulated.mask_bce_loss, local.mask_bce_loss * 2 / 8)
    torch.testing.assert_close(accumulated.mask_dice_loss, local.mask_dice_loss * 2 / 8)


def test_loss_formulas():
    logits = torch.tensor([[[10.0, -10.0], [10.0, -10.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert float(mask_bce_sum(logits, target)) < 1e-3
    assert float(dice_loss_sum(logits, target)) < 1e-3
    # all wrong: dice = 1 - (0 + 1) / (2 + 2 + 1)
    assert float(dice_loss_sum(-logits, target)) == pytest.approx(1 - 1 / 5, abs=1e-3)


def test_loss_weights_are_configurable(tiny):
    model, processor = tiny
    model = copy.deepcopy(model)
    model.config.loss_mask_config = {"loss_weight": 1.0}
    model.config.loss_dice_config = {"loss_weight": 0.5, "eps": 1.0}
    model.config.iou_loss_weight = 0.25
    model.config.point_loss_weight = 3.0
    model.config.presence_loss_weight = 0.75
    with torch.no_grad():
        out = model(**processor(seg_sample(1, seed=8)))
    point = out.aux_losses["point"]
    torch.testing.assert_close(
        out.loss,
        out.lm_loss + out.mask_bce_loss + 0.5 * out.mask_dice_loss + 0.25 * out.mask_iou_loss + 3.0 * point
        + 0.75 * out.presence_loss,
    )


def test_seg_without_image_is_an_error_in_training_and_a_warning_in_inference(tiny):
    model, processor = tiny
    batch = processor(seg_sample(1, seed=9))
    batch["sam_image_mask"] = torch.tensor([False])
    with pytest.raises(SegTargetError, match=r"\[SEG\] tokens but no image"):
        model(**batch)
    batch.pop("labels")
    batch.pop("gt_masks")
    with pytest.warns(UserWarning, match="no mask is returned"), torch.no_grad():
        out = model(**batch)
    assert out.pred_masks[0].shape[0] == 0


def test_more_seg_tokens_than_masks_is_an_error(tiny):
    model, processor = tiny
    batch = processor(seg_sample(2, seed=10))
    batch["gt_masks"] = [batch["gt_masks"][0][:1]]
    with pytest.raises(SegTargetError, match=r"2 \[SEG\] token\(s\) but 1 ground-truth mask"):
        model(**batch)


def test_device_and_dtype_follow_the_inputs(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).to(torch.float64)
    batch = processor(seg_sample(1, seed=11))
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.dtype == torch.float64
    assert out.pred_masks[0].dtype == torch.float64
