"""A training-only loss that points one attention head of the language model at the image token an answer
character is read from.

Reading a printed value means finding its line and copying it character by character. Answer positions
cannot address image positions (with mrope an answer token's offset to an image token depends on how long
the answer already is), so the model must look characters up by content; a 4-layer language model trained
on answers alone does not find that in a CPU budget, although every image token names its character
(:mod:`.text_map`). This loss supervises the attention of one head (``copy_attention_layer``,
``copy_attention_head``): at each position whose next token is copied from the image, cross-entropy between
the head's attention logits and the copied token's position (targets: :mod:`citrus_v.processing.copy_targets`).
The head still attends as any head does at inference; generation never computes the loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@contextmanager
def capture_attention_input(attention: nn.Module):
    """While open, record the ``hidden_states`` and ``position_embeddings`` an attention module is called with
    (the dict it yields holds them after the forward)."""
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["position_embeddings"] = kwargs["position_embeddings"]

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def copy_attention_loss(
    attention: nn.Module, seen: dict[str, Any], offsets: torch.Tensor, head: int
) -> torch.Tensor | None:
    """Mean cross-entropy of head ``head``'s causal attention logits against the copied tokens.

    ``attention`` is a Qwen2.5-VL text attention module, ``seen`` what :func:`capture_attention_input`
    recorded, ``offsets`` ``[B, L]`` the distance back from each position to the image token its next token
    copies (0: none). None when there is nothing to copy. Over a packed row the softmax also counts the
    other samples' keys, which the real attention masks out: a slightly stricter target.
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
