"""The training-only copy-attention loss: targets read from the character map, and the head it supervises."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from citrus_v.data.collator import CitrusVCollator
from citrus_v.data.documents import make_lab_report
from citrus_v.objectives.annotations import class_char
from citrus_v.objectives.copy_attention import CopyAttention, copy_offsets, read_lines, supervised_attention
from citrus_v.train.sft import enable_checkpointing


def _extraction(seed: int, answer: str | None = None) -> dict:
    report = make_lab_report(np.random.default_rng(seed))
    values = json.dumps({r.name: r.text for r in report.results})
    return {
        "messages": [
            {"role": "user", "content": "<image>Extract every test result as JSON."},
            {"role": "assistant", "content": answer if answer is not None else f"```json\n{values}\n```"},
        ],
        "images": [report.image],
        "char_map": report.char_map,
        "report": report,
    }


def _sample(seed: int, answer: str | None = None) -> dict:
    sample = _extraction(seed, answer)
    sample.pop("report")
    return sample


def _pointed(batch, processor, row: int = 0) -> list[tuple[str, str]]:
    """(next answer token, character of the image token its target names) for each target of ``row``."""
    targets = batch["objective_targets"]
    ids, offsets = batch["input_ids"][row], targets["copy_attention"][row]
    image = (batch["input_ids"] == processor.image_token_id).nonzero()
    first = int((image[:, 0] < row).sum())  # image tokens of earlier rows come first in the text-map targets
    positions = (ids == processor.image_token_id).nonzero().flatten().tolist()
    pairs = []
    for p in (offsets > 0).nonzero().flatten().tolist():
        token = positions.index(p - int(offsets[p]))
        char = class_char(int(targets["text_map"][first + token, 0]))
        pairs.append((processor.tokenizer.decode([int(ids[p + 1])]), char))
    return pairs


def test_every_value_character_points_at_the_token_that_prints_it(tiny):
    _, processor = tiny
    extraction = _extraction(3)
    batch = processor([_sample(3)])
    pairs = _pointed(batch, processor)
    assert pairs and all(token == char for token, char in pairs)
    # each value's characters (spaces aside) are all targets: the digits included
    wanted = sum(len(r.text.replace(" ", "")) for r in extraction["report"].results)
    copied_digits = sum(token.isdigit() for token, _ in pairs)
    printed_digits = sum(ch.isdigit() for r in extraction["report"].results for ch in r.text)
    assert copied_digits == printed_digits and len(pairs) >= wanted


def test_text_that_is_not_on_the_page_gets_no_target(tiny):
    _, processor = tiny
    batch = processor([_sample(3, answer="None; all results are within range.")])
    assert int((batch["objective_targets"]["copy_attention"] > 0).sum()) == 0
    # a sample without a character map carries no targets, and a batch of them no key
    plain = _sample(3)
    plain.pop("char_map")
    assert "objective_targets" not in processor([plain])


def _targets(answer: str, lines: list[str]) -> dict[str, int]:
    """Answer character -> image position its target names, for a toy page of 8-column lines."""
    ids = [100] * 20 + list(range(len(answer)))  # 16 image tokens at positions 0-15, the answer from 20 on
    labels = [-100] * 20 + ids[20:]
    offsets = copy_offsets(ids, labels, list(range(16)), lines, lambda t: answer[t] if t < len(answer) else "?")
    return {answer[ids[p + 1]]: p - o for p, o in enumerate(offsets) if o}


def test_ambiguous_or_absent_pieces_get_no_target():
    lines = ["AB 12 mg", "CD 12 mg"]
    # "CD 12" is printed once (line 1, from column 0): its characters point there; "x" is not on the page
    assert _targets("CD 12x", lines) == {"C": 8, "D": 9, "1": 11, "2": 12}
    # "12 mg" is printed twice: which one is meant is unknown, so nothing is pointed at
    assert _targets("12 mg", lines) == {}
    assert read_lines(torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1]]), 1, 2) == ["! "]


def test_targets_survive_left_padding_and_packing(tiny):
    _, processor = tiny
    samples = [_sample(1), _sample(2, answer="Patient ID and date please.")]
    right = processor(samples)
    left = processor(samples, padding_side="left")
    assert _pointed(right, processor) == _pointed(left, processor)
    assert _pointed(right, processor)
    collator = CitrusVCollator(processor, packing=True, max_length=1024)
    packed = collator([{"sample": s, "where": f"test:{i}"} for i, s in enumerate(samples)])
    packed_offsets = packed["objective_targets"]["copy_attention"]
    assert int((packed_offsets > 0).sum()) == int((right["objective_targets"]["copy_attention"] > 0).sum())
    ids, offsets = packed["input_ids"][0], packed_offsets[0]
    for p in (offsets > 0).nonzero().flatten().tolist():
        assert int(ids[p - int(offsets[p])]) == processor.image_token_id


def test_the_loss_is_the_real_attention_of_the_chosen_head(tiny):
    """Our logits, softmaxed, equal the attention weights transformers computes for that head."""
    model, processor = tiny
    model = copy.deepcopy(model).eval()
    model.config.copy_attention_layer, model.config.copy_attention_head = 2, 3
    model.mllm.config.text_config._attn_implementation = "eager"
    model.mllm.model.language_model.config._attn_implementation = "eager"
    batch = processor([_sample(4), _sample(5)])
    offsets = batch["objective_targets"]["copy_attention"]
    attention = supervised_attention(model)
    weights = {}
    hook = attention.register_forward_hook(lambda m, a, out: weights.update(w=out[1]))
    try:
        with torch.no_grad(), CopyAttention().capture(model) as seen:
            model.mllm.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                      "image_grid_thw", "mm_token_type_ids")})
    finally:
        hook.remove()
    rows, queries = (offsets > 0).nonzero(as_tuple=True)
    from citrus_v.objectives import copy_attention as module

    captured = {}

    def keep(logits, keys):
        captured["p"] = logits.softmax(-1)
        return torch.zeros(())

    original = module.F.cross_entropy
    module.F.cross_entropy = keep
    try:
        module.copy_attention_loss(attention, seen, offsets, 3)
    finally:
        module.F.cross_entropy = original
    real = weights["w"][rows, 3, queries]  # [N, L]
    torch.testing.assert_close(captured["p"], real.float(), atol=1e-5, rtol=1e-4)


def test_training_on_the_loss_points_the_head_at_the_characters(tiny):
    model, processor = tiny
    model = copy.deepcopy(model).train()
    assert model.config.copy_attention_loss_weight > 0
    for p in model.parameters():
        p.requires_grad_(True)
    batch = processor([_sample(s) for s in range(4)])
    out = model(**batch)
    assert out.aux_losses["copy"] is not None and torch.isfinite(out.aux_losses["copy"])
    model.zero_grad()
    out.aux_losses["copy"].backward()
    attention = supervised_attention(model)
    assert attention.q_proj.weight.grad.abs().sum() > 0 and attention.k_proj.weight.grad.abs().sum() > 0
    assert model.mllm.lm_head.weight.grad is None  # the loss reaches only what feeds that head's scores
    held_out = processor([_sample(s) for s in range(100, 102)])

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(model(**held_out).aux_losses["copy"])

    before, trained_before = held_out_loss(), float(out.aux_losses["copy"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        optimizer.zero_grad()
        trained = model(**batch).aux_losses["copy"]
        trained.backward()
        optimizer.step()
    # the head learns to look up the characters it was shown, and that carries over to reports it has not seen
    assert float(trained) < 0.65 * trained_before
    assert held_out_loss() < 0.9 * before
    # off when the config gives it no weight, and never without targets
    model.config.copy_attention_loss_weight = 0.0
    with torch.no_grad():
        assert "copy" not in (model(**held_out).aux_losses or {})
    model.config.copy_attention_loss_weight = 1.0
    held_out["objective_targets"].pop("copy_attention")
    with torch.no_grad():
        assert "copy" not in (model(**held_out).aux_losses or {})


def test_the_loss_trains_the_same_under_gradient_checkpointing(tiny):
    """``citrus-v sft --gradient_checkpointing true`` recomputes each layer in the backward pass; the loss reads
    the head's input captured in the forward, so its gradient must not change (nor vanish) under it."""
    model, processor = tiny
    batch = processor([_sample(s) for s in range(2)])

    def copy_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model).train()
        for p in m.parameters():
            p.requires_grad_(True)
        if checkpointing:
            enable_checkpointing(m)
        torch.manual_seed(0)
        m(**batch).aux_losses["copy"].backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain, checkpointed = copy_grads(False), copy_grads(True)
    q_proj = next(n for n, p in model.named_parameters() if p is supervised_attention(model).q_proj.weight)
    assert plain[q_proj].abs().sum() > 0
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_a_head_that_does_not_exist_is_named(tiny):
    model, processor = tiny
    model = copy.deepcopy(model)
    model.config.copy_attention_layer = 9
    with pytest.raises(ValueError, match="copy_attention_layer is 9 but the language model has 4 layers"):
        model(**processor([_sample(0)]))
