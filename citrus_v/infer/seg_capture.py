"""Collect the ``[SEG]`` hidden states during generation, in the same pass.

Two hooks watch the language model while ``generate`` runs: a pre-hook on the multimodal model notes each
step's input ids, a hook on the text model keeps the last-layer hidden state wherever that input is a
``[SEG]`` token. So each ``[SEG]``'s state comes from the step that consumes it — the same state a second
full forward pass over the finished answer would give — without generating twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SegCapture:
    """Hidden states of generated ``[SEG]`` tokens, per batch row, in generation order."""

    seg_token_id: int
    batch_size: int
    states: list[list[torch.Tensor]] = field(default_factory=list)
    _calls: int = 0
    _step_ids: torch.Tensor | None = None
    _handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.states = [[] for _ in range(self.batch_size)]

    def attach(self, mllm: nn.Module) -> SegCapture:
        """Register the hooks on a ``Qwen2_5_VLForConditionalGeneration``."""
        self._handles.append(mllm.register_forward_pre_hook(self._note_ids, with_kwargs=True))
        self._handles.append(mllm.model.language_model.register_forward_hook(self._keep_states))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> SegCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _note_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        self._step_ids = ids

    def _keep_states(self, module: nn.Module, args: tuple, output) -> None:
        ids = self._step_ids
        self._calls += 1
        if self._calls == 1:  # the prefill step: a [SEG] in the prompt is not part of the answer
            return
        if ids is None or ids.shape[1] != output.last_hidden_state.shape[1]:
            return
        rows, cols = (ids == self.seg_token_id).nonzero(as_tuple=True)
        hidden = output.last_hidden_state
        for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
            self.states[row].append(hidden[row, col].detach())
