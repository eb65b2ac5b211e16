"""Seeded sampling with a generator of its own, so that a request's seed touches no process-wide state.

``generate`` samples from torch's global random state, and seeding that state for one request would reseed
the whole server. Instead a seeded request samples here: a logits processor draws the next token with the
request's own ``torch.Generator`` (temperature, then nucleus filtering, as ``generate`` does) and leaves that
token the only finite logit, so that ``generate`` runs greedy and picks it.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class SeededSampling(LogitsProcessor):
    """Sample each row's next token with ``generator`` at ``temperature`` and ``top_p``."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator) -> None:
        if temperature <= 0:
            raise ValueError(f"seeded sampling needs a temperature > 0, got {temperature}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # float64: a temperature as small as 1e-45 still gives finite logits (and a one-hot softmax)
        logits = scores.double() / self.temperature
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - self.top_p
            drop[..., -1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        # the generator lives on the CPU so that a seed gives the same draws on every device
        chosen = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen, 0.0)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator of its own for one request."""
    return torch.Generator(device="cpu").manual_seed(int(seed))
