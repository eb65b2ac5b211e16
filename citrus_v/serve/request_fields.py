"""Every field of a chat request takes effect, is accepted as metadata, or is refused with a 400 naming it.

- **Taking effect**: ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``presence_penalty``,
  ``frequency_penalty``, ``logit_bias``, ``seed``, ``stop``, ``max_tokens`` / ``max_completion_tokens``, ``n``,
  ``logprobs`` / ``top_logprobs``, ``stream`` / ``stream_options`` (see :func:`sampling_params`).
- **Metadata**, accepted and not used, as OpenAI documents them or because they change nothing in the answer:
  ``user``, ``safety_identifier``, ``metadata``, ``prompt_cache_key``, ``prompt_cache_retention``,
  ``prompt_cache_options``, ``service_tier``, ``prediction``, ``parallel_tool_calls``.
- **Neutral values only** (:data:`NEUTRAL`): what ms-swift's own client sends by default and what means "off"
  (``tools: []``, ``tool_choice: "none"``, ``response_format: {"type": "text"}``, ``num_beams: 1``,
  ``images: []``...). Anything else asks for something this server does not do and is refused.
- **Unknown fields** are refused too, instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .protocol import ChatCompletionRequest
from .row_sampling import SamplingParams

# A vanishing temperature overflows the softmax; it means "deterministic", so it is served greedily.
MIN_TEMPERATURE = 1e-5
# torch.manual_seed takes [-2**63, 2**64); any JSON integer maps into it, so no seed is refused.
SEED_MODULUS = 2**64


class FieldRefused(ValueError):
    """A request field this server will not honour; ``field`` names it, the message says why and what works."""

    def __init__(self, field: str, message: str, code: str = "unsupported_parameter") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.code = code


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _text_format(value: Any) -> bool:
    return value is None or value == {"type": "text"}


_NO_TOOLS = "this model does not call tools; leave it out"
# field -> (is the value neutral?, why another value is refused)
NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "store": (lambda v: v in (None, False), "this server keeps no completions; leave it out or send false"),
    "tools": (_empty, _NO_TOOLS),
    "functions": (_empty, _NO_TOOLS),
    "tool_choice": (lambda v: v in (None, "none", "auto"), _NO_TOOLS),
    "function_call": (lambda v: v in (None, "none", "auto"), _NO_TOOLS),
    "response_format": (_text_format, "only text answers are produced (no JSON mode or schema-constrained decoding)"),
    "modalities": (lambda v: v in (None, ["text"]), "answers are text only"),
    "audio": (lambda v: v is None, "answers are text only"),
    "reasoning_effort": (lambda v: v is None, "the model has no reasoning-effort setting; leave it out"),
    "verbosity": (lambda v: v is None, "the model has no verbosity setting; leave it out"),
    "web_search_options": (lambda v: v is None, "this server does not search the web"),
    "moderation": (lambda v: v is None, "this server does not moderate; leave it out"),
    "num_beams": (lambda v: v in (None, 1), "beam search is not served (its rows could not keep per-request limits)"),
    "length_penalty": (lambda v: v in (None, 1, 1.0), "it applies to beam search only, which is not served"),
    "images": (_empty, "send images as content parts ({'type': 'image', 'image': ...} or image_url)"),
    "audios": (_empty, "the model takes no audio"),
    "videos": (_empty, "the model takes no video (not yet served)"),
    "objects": (_empty, "grounding objects are training-data fields; ask in the message text"),
}


def check_fields(body: ChatCompletionRequest) -> None:
    """Raise :class:`FieldRefused` for the first unknown field, or known field outside its neutral values."""
    for name in body.model_extra or {}:
        raise FieldRefused(
            name,
            "this server does not know this field, and does not drop fields silently; remove it (the fields "
            "are OpenAI's chat-completion fields plus ms-swift's top_k and repetition_penalty)",
            "unknown_parameter",
        )
    for name, (neutral, reason) in NEUTRAL.items():
        if not neutral(getattr(body, name)):
            raise FieldRefused(name, f"{getattr(body, name)!r} is not supported: {reason}")
    if body.best_of is not None and body.best_of != body.n:
        raise FieldRefused("best_of", "only best_of equal to n is served (no hidden extra samples); use n")
    if body.top_logprobs is not None and not body.logprobs:
        raise FieldRefused("top_logprobs", "it needs logprobs: true", "invalid_value")


def _logit_bias(body: ChatCompletionRequest, vocab_size: int) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        token = key.strip()
        if not token.lstrip("-").isdigit() or not 0 <= int(token) < vocab_size:
            raise FieldRefused(
                "logit_bias",
                f"the key {key!r} is not a token id of this model's tokenizer (0 to {vocab_size - 1})",
                "invalid_value",
            )
        bias[int(token)] = float(value)
    return bias


def sampling_params(body: ChatCompletionRequest, defaults, vocab_size: int, choice: int = 0) -> SamplingParams:
    """The :class:`SamplingParams` of choice ``choice`` of ``body``: its own fields, else ``defaults``
    (a :class:`~citrus_v.serve.generation_defaults.GenerationDefaults`). Choice ``i`` of a seeded request is
    seeded with ``seed + i``, so that the choices differ and each is reproducible."""
    temperature = body.temperature if body.temperature is not None else defaults.temperature
    top_k = body.top_k if body.top_k is not None else defaults.top_k
    seed = (body.seed + choice) % SEED_MODULUS if body.seed is not None else None
    return SamplingParams(
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=max(top_k, 0),
        repetition_penalty=(
            body.repetition_penalty if body.repetition_penalty is not None else defaults.repetition_penalty
        ),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_logit_bias(body, vocab_size),
        seed=seed,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
    )
