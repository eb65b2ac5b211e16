"""``VolumeSegmenter``: the ``[SEG]`` tokens of an answer about a volume or clip -> one mask stack each.

The frames are those :mod:`~citrus_v.infer.mask_frames` chooses: every frame of the source, each at its own
resolution, up to ``max_frames`` — not only the sample the language model saw. Each frame is drawn as the
language model's frames are (one display window for the stack), made SAM 2's input by the processor
(``sam_pixel_values``: the original frame, or the smart-resized one in parity mode), and encoded a chunk of
frames per pass through SAM 2's image encoder (:func:`~citrus_v.modeling.propagation.encode_frames`). Every
``[SEG]`` prompt — the projected embedding (and point) a 2-D image gets — then gives a mask per frame:

- ``"per_frame"``: the prompt on every frame on its own, exactly as on a 2-D image; frames are encoded and
  decoded a chunk at a time, so the features of the whole volume are never held at once;
- ``"memory"`` (needs the model's ``propagator``, SAM 2's memory modules): the prompt on the frame with the
  highest object score, then SAM 2's memory carries the mask forward and back through the rest.

SAM 2's object score decides each frame: a negative score gets no mask, and a ``[SEG]`` whose best score over
all frames is negative is not present (an empty stack, ``present=False``). The low-res logits are brought to
each frame's size as ``config.mask_postprocess`` says, by the predictor's own ``postprocess_masks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from ..media import Volume
from ..modeling.configuration_citrus_v import CitrusVConfig
from ..modeling.modeling_citrus_v import CitrusV
from ..modeling.propagation import PROPAGATION_MODES, PropagatedMasks, encode_frames, prompt_frames
from ..processing.processor import CitrusVProcessor
from .results import VolumeMask

# frames encoded and decoded together in per-frame mode: bounds the SAM 2 features held at once
FRAMES_PER_CHUNK = 8

Postprocess = Callable[[torch.Tensor, tuple[int, int]], tuple[np.ndarray, np.ndarray]]


def default_propagation(config: CitrusVConfig) -> str:
    """The mode a checkpoint's config records (``propagation``), else ``"memory"`` when it has SAM 2's memory
    modules (``sam2_memory_config``), else ``"per_frame"``."""
    if config.propagation is not None:
        return config.propagation
    return "memory" if config.sam2_memory_config is not None else "per_frame"


def check_propagation(model: CitrusV, propagation: str) -> str:
    """``propagation`` once it is a mode the model can run; a clear error naming the fix otherwise."""
    if propagation not in PROPAGATION_MODES:
        raise ValueError(f"propagation {propagation!r} is not one of {', '.join(PROPAGATION_MODES)}")
    if propagation == "memory" and model.propagator is None:
        raise ValueError(
            "propagation 'memory' needs SAM 2's memory modules, and this checkpoint has none (config.json has no "
            "sam2_memory_config). Fix: use per_frame, or a checkpoint with the memory modules"
        )
    return propagation


class VolumeSegmenter:
    """Runs SAM 2 on every frame of a volume or clip for the ``[SEG]`` states of one answer."""

    def __init__(
        self,
        model: CitrusV,
        processor: CitrusVProcessor,
        postprocess: Postprocess,
        propagation: str | None = None,
        frames_per_chunk: int = FRAMES_PER_CHUNK,
        frames_per_pass: int | None = None,
    ) -> None:
        """``frames_per_pass``: frames through SAM 2's image encoder at once (default: the chunk)."""
        self.model = model
        self.processor = processor
        self.postprocess = postprocess
        self.propagation = check_propagation(model, propagation or default_propagation(model.config))
        self.frames_per_chunk = max(int(frames_per_chunk), 1)
        self.frames_per_pass = max(int(frames_per_pass or self.frames_per_chunk), 1)

    def segment(self, states: Sequence[torch.Tensor], volume: Volume, labels: Sequence[str | None]) -> list[VolumeMask]:
        """One :class:`VolumeMask` per ``[SEG]`` state (``[hidden]`` each), in order, on ``volume``'s frames."""
        if not states:
            return []
        count, (height, width) = len(states), volume.frame_shape
        stacks = np.zeros((count, volume.num_frames, height, width), dtype=bool)
        scores = np.zeros((count, volume.num_frames), dtype=np.float32)
        key_frames = [0] * count
        with torch.no_grad():
            prompts, points = self.model.seg_prompts(torch.stack(list(states)))
            for start, results in self._decoded(volume, prompts, points):
                for k, result in enumerate(results):
                    stop = start + result.masks.shape[0]
                    scores[k, start:stop] = result.object_scores.float().cpu().numpy()
                    stacks[k, start:stop] = self._full_size(result, (width, height))
                    key_frames[k] = start + result.key_frame
        return [self._volume_mask(k, stacks[k], scores[k], key_frames[k], labels, volume) for k in range(count)]

    # --- steps ---------------------------------------------------------------------------------------------
    def _decoded(
        self, volume: Volume, prompts: torch.Tensor, points: torch.Tensor | None
    ) -> Iterator[tuple[int, list[PropagatedMasks]]]:
        """``(first frame, one result per prompt)``: per chunk of frames in per-frame mode, once for every frame
        with memory (SAM 2's memory needs the features of every frame)."""
        grounding, multimask = self.model.grounding_encoder, self.model.config.multimask_output
        window = volume.display_window()
        if self.propagation == "memory":
            features = []
            for start in range(0, volume.num_frames, self.frames_per_chunk):
                features += encode_frames(grounding, self._pixels(volume, start, window), self.frames_per_pass)
            yield 0, self.model.propagator.propagate(features, prompts, points, "memory", multimask)
            return
        for start in range(0, volume.num_frames, self.frames_per_chunk):
            features = encode_frames(grounding, self._pixels(volume, start, window), self.frames_per_pass)
            yield start, prompt_frames(grounding, features, prompts, points, multimask)

    def _pixels(self, volume: Volume, start: int, window) -> torch.Tensor:
        """SAM 2's inputs ``[c, 3, S, S]`` of one chunk of frames, each drawn at its own size."""
        stop = min(start + self.frames_per_chunk, volume.num_frames)
        pixels = [self.processor.sam_pixel_values(volume.frame_image(k, window)) for k in range(start, stop)]
        parameter = next(self.model.parameters())
        return torch.stack(pixels).to(parameter.device, parameter.dtype)

    def _full_size(self, result: PropagatedMasks, size: tuple[int, int]) -> np.ndarray:
        """The result's masks at the frames' ``(width, height)``, a chunk at a time; none on an absent frame."""
        out = []
        for start in range(0, result.masks.shape[0], self.frames_per_chunk):
            logits = result.masks[start : start + self.frames_per_chunk]
            out.append(self.postprocess(logits, size)[0])
        masks = np.concatenate(out)
        masks &= result.present.cpu().numpy()[:, None, None]
        return masks

    def _volume_mask(
        self,
        k: int,
        stack: np.ndarray,
        scores: np.ndarray,
        key_frame: int,
        labels: Sequence[str | None],
        volume: Volume,
    ) -> VolumeMask:
        present = bool(scores.max() > 0)
        if not present:
            stack[:] = False
        return VolumeMask(
            mask=stack,
            object_scores=scores,
            # memory: the frame it prompted; per frame, chunk by chunk: the highest score of all
            key_frame=key_frame if self.propagation == "memory" else int(scores.argmax()),
            mode=self.propagation,
            present=present,
            label=labels[k] if k < len(labels) else None,
            index=k,
            volume=volume,
        )
