"""Per-request sampling inside one batched ``generate``: each row keeps its own settings and random generator.

``generate`` takes one temperature, one ``top_p``, one ``top_k`` and one repetition penalty for the whole batch,
and samples from torch's process-wide random state. A server batches requests that ask for different settings,
so :class:`RowSampling` does the choosing itself, row by row, as a logits processor: it applies the row's
penalties and ``logit_bias`` to the model's logits, then picks greedily or samples (temperature, then top-k,
then nucleus, in ``generate``'s order) with the row's own ``torch.Generator``, and leaves the chosen token the
only finite logit, so that ``generate`` (run greedy) takes it. No process-wide state is touched.

Meanings, as the OpenAI and ms-swift APIs give them:

- ``repetition_penalty`` (ms-swift, transformers): every token already in the row (prompt and answer, padding
  left out) has its logit divided by the penalty when positive, multiplied when negative.
- ``presence_penalty`` / ``frequency_penalty`` (OpenAI): ``logit -= presence·[count > 0] + frequency·count``,
  counting the tokens of the answer so far.
- ``logit_bias`` (OpenAI): added to the named tokens' logits.
- ``top_k`` (ms-swift): keep the ``k`` most likely tokens; 0 or -1 keep all.

It also records, per row, the token it chose at each step and, when asked, its log-probability and the most
likely alternatives under the model's own distribution (the log-softmax of the logits it received, before
penalties, bias and temperature: what ms-swift and vLLM return).

A row that asks for nothing of this (greedy, no penalty, no bias, no log-probabilities: most requests) is left
to ``generate``'s own greedy choice, which is the same token: its logits are not copied, searched or replaced,
and its tokens are read back from ``input_ids`` at the next step. On a large vocabulary that per-step work is a
sizeable part of a small model's decoding step.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens; the defaults choose greedily with nothing changed."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None  # with temperature > 0: the row's generator is seeded with it
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class StepLogprobs:
    """One generated token's log-probability and the ``top`` most likely tokens at that step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def row_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of the row's own, seeded with ``seed`` or with fresh random bits."""
    value = secrets.randbits(64) if seed is None else int(seed)
    return torch.Generator(device="cpu").manual_seed(value)


class RowSampling(LogitsProcessor):
    """Choose each row's next token with that row's :class:`SamplingParams` (see the module docstring).

    ``steps``: the generation's ``max_new_tokens``, when known. A plain row's token of the last step is never read
    back from ``input_ids``, so at that step it is taken from the scores (the same greedy choice).
    """

    def __init__(
        self, params: Sequence[SamplingParams], pad_token_id: int | None = None, steps: int | None = None
    ) -> None:
        self.params = list(params)
        self.pad_token_id = pad_token_id
        self.steps = steps
        self.generators = [None if p.greedy else row_generator(p.seed) for p in self.params]
        self.prompt_length: int | None = None
        self.chosen: list[list[int]] = [[] for _ in self.params]
        self.logprobs: list[list[StepLogprobs] | None] = [[] if p.logprobs else None for p in self.params]
        # rows whose choice is generate's own greedy one: read back, never computed here
        self.plain = [row for row, p in enumerate(self.params) if _plain_greedy(p)]
        self.custom = [row for row, p in enumerate(self.params) if not _plain_greedy(p)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        elif self.plain:  # the token generate took for each plain row at the previous step
            last = input_ids[:, -1].tolist()
            for row in self.plain:
                self.chosen[row].append(last[row])
        if self.plain and self.steps is not None and input_ids.shape[1] - self.prompt_length + 1 >= self.steps:
            for row in self.plain:  # the last step: no later step reads these back
                self.chosen[row].append(int(scores[row].argmax()))
        for row in self.custom:
            params = self.params[row]
            raw = scores[row].float()
            logits = self.adjusted(params, input_ids[row], raw)
            token = self.choose(row, params, logits)
            self.chosen[row].append(token)
            record = self.logprobs[row]
            if record is not None:
                record.append(_step_logprobs(raw, token, params.top_logprobs))
            scores[row] = float("-inf")  # after the reads above: ``raw`` may be this very row
            scores[row, token] = 0.0
        return scores

    def adjusted(self, params: SamplingParams, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """One row's float ``logits`` with its repetition/presence/frequency penalties and bias applied (a copy;
        ``logits`` itself when there is nothing to apply)."""
        if params.repetition_penalty == 1.0 and not (
            params.presence_penalty or params.frequency_penalty or params.logit_bias
        ):
            return logits
        logits = logits.clone()
        if params.repetition_penalty != 1.0:
            seen = ids if self.pad_token_id is None else ids[ids != self.pad_token_id]
            seen = seen.unique()
            picked = logits[seen]
            penalty = params.repetition_penalty
            logits[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
        if params.presence_penalty or params.frequency_penalty:
            answer = ids[(self.prompt_length or ids.shape[0]) :]
            counts = torch.bincount(answer, minlength=logits.shape[0])[: logits.shape[0]].to(logits.dtype)
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
        if params.logit_bias:
            index = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
            bias = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            logits.index_add_(0, index, bias)
        return logits

    def choose(self, row: int, params: SamplingParams, logits: torch.Tensor) -> int:
        """Row ``row``'s token from its adjusted ``logits``: the most likely, or a draw with the row's generator."""
        if params.greedy:
            return int(logits.argmax())
        # float64: a temperature as small as 1e-45 still gives finite logits (and a one-hot softmax)
        logits = logits.double() / params.temperature
        if 0 < params.top_k < logits.shape[0]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = logits.sort(descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - params.top_p
            drop[-1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1).cpu()  # the generator lives on the CPU: a seed draws alike on every device
        return int(torch.multinomial(probs, 1, generator=self.generators[row]))


def _plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing to apply or record: ``generate``'s own choice is this row's choice."""
    return (
        params.greedy
        and params.repetition_penalty == 1.0
        and not (params.presence_penalty or params.frequency_penalty or params.logit_bias or params.logprobs)
    )


def _step_logprobs(raw: torch.Tensor, token: int, top: int) -> StepLogprobs:
    logprobs = torch.log_softmax(raw, dim=-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[0]))
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return StepLogprobs(token, float(logprobs[token]), alternatives)
