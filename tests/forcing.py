"""Test helpers that force what a random tiny model would otherwise leave to chance: its answer, SAM 2's object
score."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class ForceAnswer(LogitsProcessor):
    """Makes generation emit fixed tokens, so the [SEG] path runs through real decoding steps."""

    def __init__(self, token_ids: list[int], prompt_length: int) -> None:
        self.token_ids, self.prompt_length = token_ids, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = min(input_ids.shape[1] - self.prompt_length, len(self.token_ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_ids[step]] = 0.0
        return forced


class ObjectScores:
    """Every object score SAM 2's head gives is ``value`` while this is open: the target is found on every frame
    (> 0) or on none (< 0)."""

    def __init__(self, model, value: float) -> None:
        self.head = model.grounding_encoder.mask_decoder.pred_obj_score_head
        self.value = value

    def __enter__(self) -> ObjectScores:
        self.handle = self.head.register_forward_hook(lambda m, a, out: torch.full_like(out, self.value))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
