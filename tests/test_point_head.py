"""Point prompts in training and the ``[SEG]`` point head (see ``citrus_v.modeling.point_head``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image

from citrus_v.modeling.point_head import PointHead, sample_prompt_points
from citrus_v.objectives.base import interior_points, point_distance_loss
from citrus_v.recipes.demo import MeanSegEmbedding

from .conftest import seg_sample


def _model(tiny, probability: float, point_head: bool = True):
    model, processor = tiny
    model = copy.deepcopy(model)
    model.config.point_prompt_probability = probability
    if not point_head:
        model.config.seg_point_head = False
        model.seg_point_head = None
    return model, processor


def _spy_points(model) -> list:
    """Record the ``points`` every SAM decode of ``model`` receives."""
    seen = []
    original = model.grounding_encoder.decode

    def spy(*args, **kwargs):
        seen.append(kwargs.get("points"))
        return original(*args, **kwargs)

    model.grounding_encoder.decode = spy
    return seen


# --- where the target is ------------------------------------------------------------------------------------
def test_interior_point_is_the_innermost_pixel():
    masks = torch.zeros(3, 64, 64)
    masks[0, 10:21, 30:51] = 1  # a rectangle: its centre
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    ring = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 20**2) & ((yy - 32) ** 2 + (xx - 40) ** 2 > 16**2)
    masks[1] = ring.float()  # a crescent: its centroid lies outside it
    points = interior_points(masks)
    assert points[0].tolist() == [40.0, 15.0]
    x, y = points[1].long().tolist()
    assert bool(ring[y, x])
    assert torch.isnan(points[2]).all()  # empty mask: no point


def test_interior_point_of_a_mask_that_fills_the_image():
    # nothing around it to erode from: every pixel is as inner as any other, so the one nearest the centroid
    masks = torch.ones(2, 64, 64)
    masks[1, :, :8] = 0  # and one with background only on the left: its core is the right edge's middle
    points = interior_points(masks)
    assert points[0].tolist() == [31.0, 31.0]  # of the four central pixels, the first nearest one
    assert points[1].tolist() == [63.0, 31.0]


def test_point_loss_skips_masks_without_a_target():
    predicted = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    target = torch.tensor([[0.5, 0.5], [0.1, 0.3], [math.nan, math.nan]])
    assert float(point_distance_loss(predicted, target, 2)) == pytest.approx((0 + (0.4 + 0.2) / 2) / 2)


def test_the_head_reads_standardised_states():
    torch.manual_seed(0)
    head = PointHead(8, momentum=0.5)
    states = torch.randn(64, 8) * torch.linspace(0.1, 3.0, 8) + 5.0
    head.train()
    for _ in range(30):
        head(states)
    torch.testing.assert_close(head.running_mean, states.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(head.running_var, states.var(0), rtol=1e-4, atol=1e-4)
    # one state alone (a batch with a single [SEG]) and evaluation leave the statistics alone
    before = head.running_mean.clone()
    head(states[:1] + 100.0)
    head.eval()
    head(states + 100.0)
    torch.testing.assert_close(head.running_mean, before)
    # nor does a training step that freezes the head (stage 2 trains the language model under it)
    head.train().requires_grad_(False)
    head(states + 100.0)
    torch.testing.assert_close(head.running_mean, before)
    head.requires_grad_(True)
    head(states + 100.0)
    assert not torch.allclose(head.running_mean, before)
    head.eval()
    # the MLP sees each feature at unit scale
    seen = []
    head.mlp.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    head(states)
    torch.testing.assert_close(seen[0].std(0), torch.ones(8), rtol=0, atol=1e-3)


# --- point prompts while SAM learns ---------------------------------------------------------------------------
def test_points_fall_inside_their_targets(tiny):
    model, _ = _model(tiny, 1.0)
    size = model.mask_size[0]
    scale = model.grounding_encoder.image_size / size
    target = torch.zeros(3, size, size)
    target[0, 10:20, 30:50] = 1  # a rectangle
    target[1, 7, 41] = 1  # a single pixel
    # target[2] is empty: no point can be drawn
    probability, sam_size = model.config.point_prompt_probability, model.grounding_encoder.image_size
    torch.manual_seed(0)
    for _ in range(20):
        points = sample_prompt_points(target, probability, sam_size)
        # back from SAM input pixels to the low-res pixel the point was drawn in
        x, y = ((points[:2] + 0.5) / scale - 0.5).round().long().unbind(dim=1)
        assert bool(target[0, y[0], x[0]]) and (int(y[1]), int(x[1])) == (7, 41)
        assert torch.isnan(points[2]).all()
    assert torch.isnan(sample_prompt_points(target, 0.0, sam_size)).all()


def test_half_the_masks_get_a_point_at_probability_one_half(tiny):
    model, _ = _model(tiny, 0.5)
    target = torch.ones(4000, 4, 4)
    torch.manual_seed(0)
    points = sample_prompt_points(target, model.config.point_prompt_probability, model.grounding_encoder.image_size)
    share = float((~torch.isnan(points[:, 0])).float().mean())
    assert abs(share - 0.5) < 0.03


def test_a_point_changes_the_mask_and_a_missing_point_does_not(tiny):
    model, processor = _model(tiny, 0.0, point_head=False)
    batch = processor([seg_sample(2, seed=1)])
    with torch.no_grad():
        out = model(**batch)
        features = model.grounding_encoder.image_features(batch["sam_pixel_values"]).select(0)
        embeddings = out.seg_embeddings[0]
        plain = model.grounding_encoder.decode(features, embeddings, model.config.multimask_output)
        points = torch.tensor([[60.0, 100.0], [math.nan, math.nan]])
        pointed = model.grounding_encoder.decode(features, embeddings, model.config.multimask_output, points=points)
    assert not torch.allclose(pointed.logits[0], plain.logits[0])
    torch.testing.assert_close(pointed.logits[1], plain.logits[1])


def test_training_prompts_with_points_and_inference_does_not(tiny):
    model, processor = _model(tiny, 1.0, point_head=False)
    batch = processor([seg_sample(2, seed=s) for s in (1, 2)])
    reference, _ = _model(tiny, 0.0, point_head=False)
    model.eval()
    with torch.no_grad():
        # inference: the probability is ignored, masks equal the point-free model's
        for a, b in zip(model(**batch).pred_masks, reference.eval()(**batch).pred_masks, strict=True):
            torch.testing.assert_close(a, b)
    model.train()
    out = model(**batch)
    reference.train()
    with torch.no_grad():
        plain = reference(**batch)
    assert any(not torch.allclose(a, b) for a, b in zip(out.pred_masks, plain.pred_masks, strict=True))
    # the positive-point embedding trains only when points are given
    out.loss.backward()
    point_embed = model.grounding_encoder.prompt_encoder.point_embed.weight
    assert point_embed.grad is not None and point_embed.grad[1].abs().sum() > 0


# --- the point head in the model ------------------------------------------------------------------------------
def test_the_point_loss_trains_the_head_to_find_the_target(tiny):
    model, processor = _model(tiny, 1.0)
    batch = processor([seg_sample(2, seed=s) for s in (1, 2)])
    model.train()
    out = model(**batch)
    seg = batch["input_ids"] == model.seg_token_idx
    hidden = out.last_hidden_state[seg].detach()
    masks = torch.cat(batch["gt_masks"])
    side, size = masks.shape[-1], model.grounding_encoder.image_size
    goal = (interior_points(masks) + 0.5) / side
    # the forward's loss: each predicted point against its target's innermost pixel, as fractions of the side
    predicted = torch.cat(out.predicted_points)
    expected = ((predicted + 0.5) / size - goal).abs().mean(dim=1).sum() / masks.shape[0]
    torch.testing.assert_close(out.aux_losses["point"].detach(), expected.detach())
    out.aux_losses["point"].backward()
    assert model.seg_point_head.mlp[0].weight.grad.abs().sum() > 0
    # minimising it puts every predicted point inside its target
    optimizer = torch.optim.Adam(model.seg_point_head.parameters(), lr=1e-2)
    for _ in range(1000):  # a random language model's [SEG] states lie close together: many small steps
        optimizer.zero_grad()
        loss = point_distance_loss((model.seg_prompts(hidden)[1] + 0.5) / size, goal, masks.shape[0])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        points = model.seg_prompts(hidden)[1]
    pixels = ((points + 0.5) / size * side).floor().long()
    assert all(bool(m[y, x] > 0.5) for m, (x, y) in zip(masks, pixels.tolist(), strict=True)), pixels.tolist()


def test_sam_gets_the_predicted_point_or_in_training_a_real_one(tiny):
    model, processor = _model(tiny, 0.0)
    batch = processor([seg_sample(2, seed=s) for s in (1, 2)])
    seen = _spy_points(model)
    with torch.no_grad():
        out = model.eval()(**batch)
    # inference: the head's points, and the masks are their decoding
    for given, predicted in zip(seen, out.predicted_points, strict=True):
        torch.testing.assert_close(given, predicted)
    features = model.grounding_encoder.image_features(batch["sam_pixel_values"])
    with torch.no_grad():
        again = model.grounding_encoder.decode(
            features.select(0), out.seg_embeddings[0], False, points=out.predicted_points[0]
        )
    torch.testing.assert_close(again.logits, out.pred_masks[0])
    # training with probability 1: every mask gets a real point inside its target instead
    model.config.point_prompt_probability = 1.0
    seen.clear()
    model.train()(**batch)
    scale = model.grounding_encoder.image_size / model.mask_size[0]
    for given, target in zip(seen, batch["gt_masks"], strict=True):
        x, y = ((given + 0.5) / scale - 0.5).round().long().unbind(dim=1)
        assert all(bool(target[k, y[k], x[k]]) for k in range(target.shape[0]))


def test_inference_decodes_with_the_predicted_point(tiny):
    """The predictor hands SAM the head's point: changing only the head changes what SAM receives."""
    from citrus_v.infer.predictor import CitrusVPredictor

    model, processor = _model(tiny, 0.0)
    predictor = CitrusVPredictor(model, processor)
    sample = seg_sample(1, seed=3)
    hidden = torch.randn(1, model.config.text_config.hidden_size)
    seen = _spy_points(model)
    batch = processor([sample])
    predictor._masks(0, [hidden[0]], [Image.fromarray(sample["images"][0])], batch, "lesion [SEG]")
    with torch.no_grad():
        model.seg_point_head.mlp[2].bias.add_(torch.tensor([2.0, -2.0]))
    predictor._masks(0, [hidden[0]], [Image.fromarray(sample["images"][0])], batch, "lesion [SEG]")
    with torch.no_grad():
        expected = model.seg_prompts(hidden)[1]
    assert len(seen) == 2 and not torch.allclose(seen[0], seen[1])
    torch.testing.assert_close(seen[1], expected)


def test_the_control_replaces_both_by_their_means(tiny):
    model, _ = _model(tiny, 0.0)
    control = MeanSegEmbedding(model)
    hidden = torch.randn(5, model.config.text_config.hidden_size)
    try:
        with torch.no_grad():
            embeddings, _ = model.seg_prompts(hidden)
            logits = model.seg_point_head(hidden)
            assert control.freeze() == 5
            mean_embeddings, mean_points = model.seg_prompts(torch.randn(3, hidden.shape[1]))
    finally:
        control.remove()
    torch.testing.assert_close(mean_embeddings, embeddings.mean(0).expand(3, -1))
    size = model.grounding_encoder.image_size
    torch.testing.assert_close(mean_points, (logits.mean(0).sigmoid() * size - 0.5).expand(3, -1))


def test_a_checkpoint_without_the_head_loads_with_it_fresh(tiny, tmp_path):
    model, processor = _model(tiny, 0.0, point_head=False)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    from citrus_v.modeling import CitrusV, CitrusVConfig

    config = CitrusVConfig.from_pretrained(tmp_path)
    config.seg_point_head = True
    loaded = CitrusV.from_pretrained(tmp_path, config=config)
    assert loaded.seg_point_head is not None
    assert all(torch.isfinite(p).all() for p in loaded.seg_point_head.parameters())
    # and a checkpoint with the head keeps it
    loaded.save_pretrained(tmp_path / "with")
    again = CitrusV.from_pretrained(tmp_path / "with")
    torch.testing.assert_close(again.seg_point_head.mlp[0].weight, loaded.seg_point_head.mlp[0].weight)
