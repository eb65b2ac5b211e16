"""Training logits at label positions only: same losses and gradients as the full head, less work."""

from __future__ import annotations

import copy

import pytest
import torch

from .conftest import seg_sample


@pytest.fixture(scope="module")
def model_and_batch(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    # every pass must prompt SAM alike: no random training points, the point head's statistics held still
    model.config.point_prompt_probability = 0.0
    model.seg_point_head.eval()
    # two samples of different lengths (padding in the batch), one with [SEG] and its mask
    batch = processor([seg_sample(1, seed=0), seg_sample(0, seed=1)])
    return model, batch


def _loss_and_grads(model, batch, narrow: bool, num_items: torch.Tensor | None):
    model.zero_grad(set_to_none=True)
    outputs = model(**batch, num_items_in_batch=num_items, label_logits_only=narrow)
    outputs.loss.backward()
    head = model.mllm.get_output_embeddings().weight.grad.clone()
    embed = model.mllm.get_input_embeddings().weight.grad.clone()
    return outputs, head, embed


@pytest.mark.parametrize("normaliser", ["count", "mean"])
def test_same_loss_and_gradients_as_the_full_head(model_and_batch, normaliser):
    model, batch = model_and_batch
    targets = int((batch["labels"][:, 1:] != -100).sum())
    num_items = torch.tensor(targets) if normaliser == "count" else None
    full, full_head, full_embed = _loss_and_grads(model, batch, narrow=False, num_items=num_items)
    narrow, narrow_head, narrow_embed = _loss_and_grads(model, batch, narrow=True, num_items=num_items)
    assert torch.allclose(narrow.lm_loss, full.lm_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(narrow.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(narrow_head, full_head, rtol=1e-4, atol=1e-7)
    assert torch.allclose(narrow_embed, full_embed, rtol=1e-4, atol=1e-7)
    # the head ran on the target positions only
    assert full.logits.shape[:2] == batch["input_ids"].shape
    assert narrow.logits.shape == (targets, full.logits.shape[-1])
    # the mask branch is untouched
    for a, b in zip(narrow.pred_masks, full.pred_masks, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_without_labels_the_flag_changes_nothing(model_and_batch):
    model, batch = model_and_batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        outputs = model(**inputs, label_logits_only=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape and outputs.lm_loss is None

