"""Recorded token log-probabilities as OpenAI's ``choices[].logprobs`` object.

Each entry names the token's text, its log-probability, its own bytes (a byte-level BPE token may hold part of
a UTF-8 character: its bytes say which), and the most likely alternatives at that step. A log-probability of
minus infinity (a token the model could not choose) is written as -9999.0, as OpenAI writes it, since JSON has
no infinity. When a stop string cut the answer, the tokens that start after the cut are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from .protocol import ChoiceLogprobs, TokenLogprob, TopLogprob
from .row_sampling import StepLogprobs

UNLIKELY = -9999.0


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet back to bytes (GPT-2's table, which Qwen's tokenizer uses)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenTexts:
    """A tokenizer's token ids as text and bytes, cached per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = type(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)).__name__ == (
            "ByteLevel"
        )
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            cached = self._cache[token_id] = (text, self._bytes(token_id, text))
        return cached

    def _bytes(self, token_id: int, text: str) -> list[int]:
        if self.byte_level and token_id not in self.added:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            decoder = _byte_decoder()
            if isinstance(piece, str) and all(char in decoder for char in piece):
                return [decoder[char] for char in piece]
        return list(text.encode("utf-8"))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else UNLIKELY


def _kept(steps: Sequence[StepLogprobs], texts: TokenTexts, text_length: int) -> Sequence[StepLogprobs]:
    """The steps whose token starts before ``text_length`` characters of the decoded answer."""
    ids = [step.token_id for step in steps]
    full = texts.tokenizer.decode(ids, skip_special_tokens=False)
    if len(full) <= text_length:
        return steps
    kept = 0
    while kept < len(ids) and len(texts.tokenizer.decode(ids[:kept], skip_special_tokens=False)) < text_length:
        kept += 1
    return steps[:kept]


def choice_logprobs(steps: Sequence[StepLogprobs] | None, texts: TokenTexts, text: str) -> ChoiceLogprobs | None:
    """OpenAI's ``logprobs`` object for an answer whose (possibly cut) text is ``text``; ``None`` if not asked."""
    if steps is None:
        return None
    content = []
    for step in _kept(steps, texts, len(text)):
        token, raw = texts(step.token_id)
        alternatives = []
        for token_id, logprob in step.top:
            alt_token, alt_bytes = texts(token_id)
            alternatives.append(TopLogprob(token=alt_token, logprob=_finite(logprob), bytes=alt_bytes))
        content.append(TokenLogprob(token=token, logprob=_finite(step.logprob), bytes=raw, top_logprobs=alternatives))
    return ChoiceLogprobs(content=content)
