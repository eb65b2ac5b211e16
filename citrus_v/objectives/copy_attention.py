"""Copy attention: one attention head of the language model looks at the image token an answer character is
read from.

Reading a printed value means finding its line and copying it character by character. Answer positions
cannot address image positions (with mrope an answer token's offset to an image token depends on how long
the answer already is), so the model must look characters up by content; a 4-layer language model trained
on answers alone does not find that in a CPU budget, although every image token names its character
(the text-map objective teaches that). This loss supervises the attention of one head (config ``copy_attention_layer``,
``copy_attention_head``): at each position whose next token is copied from the image, cross-entropy between
the head's attention logits and the copied token's position. The head still attends as any head does at
inference. Config key ``copy_attention_loss_weight``; it has no head of its own.

Targets, from a row's ``char_map`` annotation and the answer, with nothing else in the row:

1. the map is read one character per merged image token (its first patch's class), one line per token
   row — a page printed one character per token cell, as the synthetic lab reports are, reads exactly;
2. the answer is matched left to right against those lines: the longest run of at least ``min_run``
   characters found exactly once on the page is taken, anything ambiguous or absent is skipped;
3. each single-character answer token inside a run gets, at the position that predicts it, the distance
   back to its image token (``offsets[p] = p - key``; 0 = no target). Distances survive padding and packing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..tokens import IGNORE_INDEX
from .annotations import chars_per_patch, check_map_size, class_char
from .base import EncodeContext, Objective, ObjectiveInputs


def read_lines(chars: torch.Tensor, rows: int, cols: int) -> list[str]:
    """The page as text: one character per merged token (its first patch's class; space for none)."""
    first = chars[: rows * cols, 0].tolist()
    return ["".join(class_char(int(c)) or " " for c in first[r * cols : (r + 1) * cols]) for r in range(rows)]


def _find_runs(answer: str, lines: Sequence[str], min_run: int) -> dict[int, tuple[int, int]]:
    """Answer character index -> (line, column) for the characters inside uniquely found runs."""
    page = "\n".join(lines)  # a run never spans two lines
    width = len(lines[0]) + 1 if lines else 1
    where: dict[int, tuple[int, int]] = {}
    i = 0
    while i < len(answer):
        # the longest piece from i that is on the page (every prefix of a found piece is found too)
        j = i
        while j < len(answer) and answer[i : j + 1] in page:
            j += 1
        start = page.find(answer[i:j]) if j - i >= min_run else -1
        if start < 0 or page.find(answer[i:j], start + 1) >= 0:
            i += 1  # too short, or printed more than once: which one is meant is unknown
            continue
        for k in range(i, j):
            if not answer[k].isspace():
                where[k] = divmod(start + k - i, width)
        i = j
    return where


def _answer_spans(labels: Sequence[int]) -> Iterator[list[int]]:
    """The runs of consecutive positions that carry a label."""
    position = 0
    while position < len(labels):
        if labels[position] == IGNORE_INDEX:
            position += 1
            continue
        span = []
        while position < len(labels) and labels[position] != IGNORE_INDEX:
            span.append(position)
            position += 1
        yield span


def copy_offsets(
    input_ids: Sequence[int],
    labels: Sequence[int],
    image_positions: Sequence[int],
    lines: Sequence[str],
    decode: Callable[[int], str],
    min_run: int = 3,
) -> list[int]:
    """Per position of ``input_ids``, the distance back to the image token its next token copies (0: none).

    Args:
        input_ids, labels: one encoded sample (labels ``-100`` outside answers).
        image_positions: positions of the first image's merged tokens in ``input_ids``, row-major.
        lines: that image read as text (:func:`read_lines`), ``len(image_positions) / len(lines)`` per line.
        decode: token id -> its text.
        min_run: shortest answer piece that is matched against the page.
    """
    offsets = [0] * len(input_ids)
    if not lines or not image_positions:
        return offsets
    cols = len(image_positions) // len(lines)
    for span in _answer_spans(labels):
        pieces = [decode(int(input_ids[p])) for p in span]
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))
        where = _find_runs("".join(pieces), lines, min_run)
        for p, piece, start in zip(span, pieces, starts, strict=False):
            if len(piece) == 1 and start in where and p > 0:
                row, column = where[start]
                key = image_positions[row * cols + column]
                if key < p - 1:
                    offsets[p - 1] = p - 1 - key
    return offsets


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def copy_attention_loss(
    attention: nn.Module, seen: dict[str, Any], offsets: torch.Tensor, head: int
) -> torch.Tensor | None:
    """Mean cross-entropy of head ``head``'s causal attention logits against the copied tokens.

    ``attention`` is a Qwen2.5-VL text attention module, ``seen`` the ``hidden_states`` and
    ``position_embeddings`` it was called with, ``offsets`` ``[B, L]`` the distance back from each position to
    the image token its next token copies (0: none). None when there is nothing to copy. Over a packed row the
    softmax also counts the other samples' keys, which the real attention masks out: a slightly stricter target.
    """
    rows, queries = (offsets > 0).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None
    hidden = seen["hidden_states"]
    cos, sin = seen["position_embeddings"]
    head_dim = attention.head_dim
    kv_head = head // (attention.config.num_attention_heads // attention.config.num_key_value_heads)
    q = attention.q_proj(hidden[rows, queries])[:, head * head_dim : (head + 1) * head_dim]
    q = q * cos[rows, queries] + _rotate_half(q) * sin[rows, queries]
    # keys once per sequence, not once per target: a report answer has dozens of targets
    k = attention.k_proj(hidden)[..., kv_head * head_dim : (kv_head + 1) * head_dim]
    k = k * cos + _rotate_half(k) * sin
    logits = torch.einsum("nd,nkd->nk", q, k[rows]).float() * attention.scaling
    future = torch.arange(logits.shape[1], device=logits.device)[None, :] > queries[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    keys = queries - offsets[rows, queries].to(queries.device)
    return F.cross_entropy(logits, keys)


def supervised_attention(model: nn.Module) -> nn.Module:
    """The language-model attention module whose head the loss supervises (checked against the model)."""
    config = model.config
    layers = model.mllm.model.language_model.layers
    index = getattr(config, "copy_attention_layer", -1)
    if not -len(layers) <= index < len(layers):
        raise ValueError(f"copy_attention_layer is {index} but the language model has {len(layers)} layers")
    heads = config.text_config.num_attention_heads
    head = getattr(config, "copy_attention_head", 0)
    if not 0 <= head < heads:
        raise ValueError(f"copy_attention_head is {head} but layers have {heads} heads")
    return layers[index].self_attn


class CopyAttention(Objective):
    name = "copy_attention"
    log_name = "copy"
    weight_key = "copy_attention_loss_weight"
    layout = "positions"
    reads = ("char_map",)
    preset = {weight_key: 1.0, "copy_attention_layer": -1, "copy_attention_head": 0}

    def encode(self, annotations: dict[str, Any], context: EncodeContext) -> list[int] | None:
        labels = annotations.get("char_map")
        if labels is None:
            return None
        labels = check_map_size("char_map", np.asarray(labels), context.image_size)
        _, h, w = context.grid[0].tolist()
        rows, cols = h // context.merge, w // context.merge
        chars = chars_per_patch(labels, (rows, cols), context.merge)
        ids = context.input_ids
        positions = [p for p, token in enumerate(ids) if token == context.image_token_id][: rows * cols]
        return copy_offsets(ids, context.labels, positions, read_lines(chars, rows, cols), context.token_text)

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, Any]]:
        """Record the ``hidden_states`` and ``position_embeddings`` the supervised attention is called with."""
        seen: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen["position_embeddings"] = kwargs["position_embeddings"]

        attention = supervised_attention(model)
        handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        if not inputs.captured:
            return None
        head = getattr(inputs.model.config, "copy_attention_head", 0)
        return copy_attention_loss(supervised_attention(inputs.model), inputs.captured, inputs.targets, head)
