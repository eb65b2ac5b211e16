"""``CitrusVPredictor``: answers with text, boxes and masks — kept apart from the ``nn.Module``.

One generation pass per batch: the ``[SEG]`` hidden states are captured while generating
(:mod:`citrus_v.infer.seg_capture`), projected, and decoded by SAM 2 on each sample's first image. Each mask
is brought to the original image size as the model's ``mask_postprocess`` says: the low-res logits upsampled
bilinearly then thresholded at sigmoid 0.5, or (upstream's way, the default for its released checkpoints)
thresholded at low resolution then resized with nearest neighbour. The thresholded low-res mask is kept too
(:attr:`~citrus_v.infer.results.MaskResult.low_res`), the form upstream's server sends.

A request may also hold videos (volumes or clips, :mod:`citrus_v.processing.videos`), which the language model
reads through Qwen2.5-VL's video path. Its answer is a :class:`VideoPrediction`: the masks of an image it also
holds as above, the hidden state of every ``[SEG]`` (:attr:`VideoPrediction.seg_states`) with the frames the
model saw, and one mask stack per ``[SEG]`` on every frame of the first video
(:attr:`VideoPrediction.volume_masks`, :mod:`citrus_v.infer.volume_segmentation`): SAM 2 sees every frame of
the source (up to ``max_frames``), by per-frame prompting or memory propagation (``propagation``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, StoppingCriteriaList, StopStringCriteria

from ..modeling.configuration_citrus_v import MASK_POSTPROCESS
from ..modeling.modeling_citrus_v import CitrusV
from ..processing.images import ImageInput, load_image, mask_to_image
from ..processing.processor import CitrusVProcessor, ProcessorError, batch_to
from ..processing.template import TemplateError
from ..processing.videos import LoadedVideo, VideoInput
from ..tokens import ENDOFTEXT, IM_END, SEG_TOKEN
from .inference_layout import column_major_lm_head, linear_patch_embed
from .mask_frames import DEFAULT_MAX_FRAMES, mask_frames
from .results import MaskResult, Prediction, VolumeMask, cut_at_stop, seg_labels
from .sampling import SeededSampling, seeded_generator
from .seg_capture import SegCapture
from .volume_segmentation import VolumeSegmenter

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One question: images (paths, PIL images or arrays) and a prompt, optionally a system prompt and videos
    (volumes or clips: a ``Volume``, a list of frames, or a path; one ``<video>`` each in the prompt, else they
    go before its text)."""

    images: Sequence[ImageInput]
    prompt: str
    system: str | None = None
    history: list[dict] = field(default_factory=list)  # earlier turns, ms-swift message dicts
    videos: Sequence[VideoInput] = ()


@dataclass
class EncodedRequest:
    """A request's images, loaded, and its prompt encoded for generation (no SAM 2 input yet: that is made only
    when the answer holds a ``[SEG]``). Made by :meth:`CitrusVPredictor.encode`, so that a server can encode a
    request when it arrives, off the generation thread."""

    images: list
    row: dict[str, Any]
    videos: list[LoadedVideo] = field(default_factory=list)  # the frames the model sees, per video
    sources: list[VideoInput] = field(default_factory=list)  # the videos as given, read again for SAM 2


@dataclass(eq=False)
class VideoPrediction(Prediction):
    """The answer to a request with videos. ``volume_masks`` holds one :class:`VolumeMask` per ``[SEG]``, in order,
    on the frames of the first video SAM 2 segmented (``masks`` holds 2-D masks only when the request also holds
    an image, on that image, as for any request); ``seg_states`` the last-layer hidden state of each ``[SEG]`` (what
    :meth:`CitrusV.decode_masks` takes), ``videos`` the frames the language model saw, and ``notes`` what a reader
    of the masks should know (SAM 2 saw a sample of the frames, and why)."""

    seg_states: list[torch.Tensor] = field(default_factory=list, repr=False)
    videos: list[LoadedVideo] = field(default_factory=list, repr=False)
    volume_masks: list[VolumeMask] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)


@dataclass
class GenerationSettings:
    """Sampling settings, named as in the OpenAI API."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        sample = self.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens), "do_sample": sample}
        if sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


class CitrusVPredictor:
    """Runs a CitrusV model on requests and returns :class:`Prediction` objects.

    For volumes and clips: ``propagation`` is how a ``[SEG]`` becomes a mask on every frame (``"memory"``:
    SAM 2's memory from the most certain frame, the default when the model has the memory modules;
    ``"per_frame"``: the prompt on each frame alone, the default otherwise), ``max_frames`` the most frames SAM 2
    segments per video (more are segmented on that many evenly spaced ones, and the prediction notes it).
    """

    def __init__(
        self,
        model: CitrusV,
        processor: CitrusVProcessor,
        mask_threshold: float = 0.5,
        propagation: str | None = None,
        max_frames: int = DEFAULT_MAX_FRAMES,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.mask_threshold = mask_threshold
        if int(max_frames) < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        self.max_frames = int(max_frames)
        self.volume_segmenter = VolumeSegmenter(model, processor, self.postprocess_masks, propagation)
        tokenizer = processor.tokenizer
        self.seg_token_id = processor.seg_token_id
        self.eos_token_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
        if model.config.mask_postprocess not in MASK_POSTPROCESS:
            raise ValueError(
                f"config.json: mask_postprocess is {model.config.mask_postprocess!r}; use one of "
                f"{', '.join(MASK_POSTPROCESS)}"
            )
        if model.config.seg_token_idx != self.seg_token_id:
            raise ValueError(
                f"model config seg_token_idx={model.config.seg_token_idx} but the tokenizer's [SEG] is "
                f"{self.seg_token_id}: model and processor come from different folders"
            )
        if self.device.type == "cpu" and self.dtype == torch.float32:
            column_major_lm_head(self.model)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **settings: Any,
    ) -> CitrusVPredictor:
        """Load model and processor from one folder (written by ``citrus-v build`` or training); ``settings``
        are the constructor's (``propagation``, ``max_frames``, ``mask_threshold``). The model is the
        predictor's own, so its patch embedding runs as one matrix product (:func:`linear_patch_embed`, the same
        features to float rounding); a model handed to the constructor is left computing as it did."""
        model = CitrusV.from_pretrained(directory, dtype=dtype)
        if device is not None:
            model = model.to(device)
        linear_patch_embed(model)
        return cls(model, CitrusVProcessor.from_pretrained(directory), **settings)

    @property
    def propagation(self) -> str:
        """How a ``[SEG]`` about a volume or clip becomes a mask on every frame: ``"memory"`` or ``"per_frame"``."""
        return self.volume_segmenter.propagation

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- public API --------------------------------------------------------------------------------------
    def predict(
        self,
        images: ImageInput | Sequence[ImageInput] | None,
        prompt: str,
        system: str | None = None,
        videos: Sequence[VideoInput] = (),
        **generation,
    ) -> Prediction:
        """Answer ``prompt`` about ``images`` (one image or a list; ``None`` for text only) and ``videos``."""
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        request = Request(images=images, prompt=prompt, system=system, videos=videos)
        return self.predict_batch([request], **generation)[0]

    def encode(self, request: Request) -> EncodedRequest:
        """Load ``request``'s images and videos and encode its prompt; raises ``ProcessorError`` for one that
        cannot be."""
        if request.videos:
            self._check_video_token()
        images = [load_image(image) for image in request.images]
        try:
            videos = [self.processor.load_video(video) for video in request.videos]
            row = self.processor.encode_sample(
                self._sample(request, images, videos), add_generation_prompt=True, return_labels=False,
                sam_input=False,
            )
        except (TemplateError, ProcessorError, FileNotFoundError, ValueError, TypeError) as err:
            raise ProcessorError(str(err)) from err
        return EncodedRequest(images=images, row=row, videos=videos, sources=list(request.videos))

    @torch.inference_mode()
    def predict_batch(
        self,
        requests: Sequence[Request],
        logits_processor: LogitsProcessorList | None = None,
        encoded: Sequence[EncodedRequest] | None = None,
        **generation,
    ) -> list[Prediction]:
        """Answer several requests in one batched generation pass (``encoded``: the requests already passed
        through :meth:`encode`, in order)."""
        if not requests:
            return []
        settings = GenerationSettings(**generation)
        if encoded is None:
            encoded = [self.encode(request) for request in requests]
        loaded = [item.images for item in encoded]
        batch = self.processor.collate([item.row for item in encoded], padding_side="left", return_labels=False)
        batch = batch_to(batch, self.device, self.dtype)
        prompt_length = batch["input_ids"].shape[1]
        generate_kwargs = settings.generate_kwargs()
        if settings.seed is not None and settings.temperature > 0:
            # the request's own generator: no process-wide reseeding (see sampling.py)
            sampler = SeededSampling(settings.temperature, settings.top_p, seeded_generator(settings.seed))
            logits_processor = LogitsProcessorList([*(logits_processor or []), sampler])
            generate_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if settings.stop:
            generate_kwargs["stopping_criteria"] = StoppingCriteriaList(
                [StopStringCriteria(self.processor.tokenizer, list(settings.stop))]
            )
        with SegCapture(self.seg_token_id, len(requests)).attach(self.model.mllm) as capture, torch.no_grad():
            vision = {k: batch[k] for k in _VISION_KEYS if k in batch}
            sequences = self.model.mllm.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                mm_token_type_ids=batch["mm_token_type_ids"],
                **vision,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                logits_processor=logits_processor,
                **generate_kwargs,
            )
        generated = sequences[:, prompt_length:]
        states = self._complete_states(capture.states, sequences, batch, prompt_length)
        predictions = []
        for row, (images, item) in enumerate(zip(loaded, encoded, strict=True)):
            tokens = self._strip(generated[row].tolist())
            text = self.processor.tokenizer.decode(tokens, skip_special_tokens=False)
            kind, extra = (VideoPrediction, {"videos": item.videos}) if item.videos else (Prediction, {})
            prediction = kind(
                text=text,
                image_size=images[0].size if images else None,
                num_seg_tokens=sum(1 for t in tokens if t == self.seg_token_id),
                **extra,
            )
            row_states = states[row][: prediction.num_seg_tokens]
            prediction.masks = self._masks(row, row_states, images, batch, text, warn=not item.videos)
            prediction.boxes = self._boxes(text, images)
            prediction = cut_at_stop(prediction, settings.stop)[0]
            if isinstance(prediction, VideoPrediction):
                prediction.seg_states = row_states[: prediction.num_seg_tokens]
                self._volume_masks(prediction, item)
            predictions.append(prediction)
        return predictions

    # --- helpers -----------------------------------------------------------------------------------------
    def _check_video_token(self) -> None:
        """The model finds video tokens by ``config.video_token_id``: it must be the tokenizer's ``<|video_pad|>``."""
        expected = getattr(self.model.mllm.config, "video_token_id", None)
        if expected is not None and expected != self.processor.video_token_id:
            raise ValueError(
                f"model config video_token_id={expected} but the tokenizer's <|video_pad|> is "
                f"{self.processor.video_token_id}: model and processor come from different folders"
            )

    def _sample(self, request: Request, images: list, videos: Sequence[LoadedVideo] = ()) -> dict:
        messages = list(request.history) + [{"role": "user", "content": request.prompt}]
        sample: dict[str, Any] = {"messages": messages, "images": images}
        if videos:
            sample["videos"] = list(videos)
        if request.system is not None:
            sample["system"] = request.system
        return sample


    def _strip(self, tokens: list[int]) -> list[int]:
        """Generated ids up to (not including) the first end-of-turn or padding token."""
        for index, token in enumerate(tokens):
            if token in self.eos_token_ids:
                return tokens[:index]
        return tokens

    def _complete_states(
        self, states: list[list[torch.Tensor]], sequences: torch.Tensor, batch: dict, prompt_length: int
    ) -> list[list[torch.Tensor]]:
        """A ``[SEG]`` generated as the very last token was never consumed: one forward pass fills it in."""
        completed = []
        for row, captured in enumerate(states):
            tokens = self._strip(sequences[row, prompt_length:].tolist())
            expected = sum(1 for t in tokens if t == self.seg_token_id)
            if len(captured) >= expected:
                completed.append(captured)
                continue
            ids = sequences[row : row + 1, : prompt_length + len(tokens)]
            attention = torch.ones_like(ids)
            attention[:, :prompt_length] = batch["attention_mask"][row : row + 1]
            with torch.no_grad():
                output = self.model.mllm.model(
                    input_ids=ids,
                    attention_mask=attention,
                    pixel_values=self._row_pixels(batch, row),
                    image_grid_thw=self._row_grid(batch, row),
                    mm_token_type_ids=self.processor.mm_token_type_ids(ids),
                    use_cache=False,
                    **self._row_videos(batch, row),
                )
            positions = (ids[0, prompt_length:] == self.seg_token_id).nonzero()[:, 0] + prompt_length
            completed.append([output.last_hidden_state[0, p] for p in positions.tolist()])
        return completed

    def _row_pixels(self, batch: dict, row: int) -> torch.Tensor | None:
        grid = batch.get("image_grid_thw")
        if grid is None:
            return None
        counts = self._images_per_row(batch)
        first = sum(counts[:row])
        patches = grid.prod(dim=1).tolist()
        start = int(sum(patches[:first]))
        end = start + int(sum(patches[first : first + counts[row]]))
        return batch["pixel_values"][start:end] if end > start else None

    def _row_grid(self, batch: dict, row: int) -> torch.Tensor | None:
        grid = batch.get("image_grid_thw")
        if grid is None:
            return None
        counts = self._images_per_row(batch)
        first = sum(counts[:row])
        return grid[first : first + counts[row]] if counts[row] else None

    def _images_per_row(self, batch: dict) -> list[int]:
        return self._blocks_per_row(batch, self.processor.image_token_id)

    def _blocks_per_row(self, batch: dict, pad_id: int | None) -> list[int]:
        """Per row, how many vision blocks hold ``pad_id`` (images: ``<|image_pad|>``, videos: ``<|video_pad|>``):
        the vision starts followed by that pad."""
        ids = batch["input_ids"]
        starts = ids[:, :-1] == self.processor.template.vision_start_id
        return (starts & (ids[:, 1:] == pad_id)).sum(dim=1).tolist()

    def _row_videos(self, batch: dict, row: int) -> dict[str, torch.Tensor]:
        """The videos of batch row ``row``: their pixels, grids and seconds per temporal patch (empty without)."""
        grid = batch.get("video_grid_thw")
        if grid is None:
            return {}
        counts = self._blocks_per_row(batch, self.processor.video_token_id)
        first, count = sum(counts[:row]), counts[row]
        if not count:
            return {}
        patches = grid.prod(dim=1).tolist()
        start = int(sum(patches[:first]))
        end = start + int(sum(patches[first : first + count]))
        return {
            "pixel_values_videos": batch["pixel_values_videos"][start:end],
            "video_grid_thw": grid[first : first + count],
            "second_per_grid_ts": batch["second_per_grid_ts"][first : first + count],
        }

    def _masks(
        self, row: int, states: list[torch.Tensor], images: list, batch: dict, text: str, warn: bool = True
    ) -> list[MaskResult]:
        if not states:
            return []
        if not images and not warn:  # a video request: the states are returned instead (VideoPrediction)
            return []
        if not images:
            warnings.warn(
                f"the answer has {len(states)} [SEG] token(s) but the request has no image: no mask returned",
                stacklevel=3,
            )
            return []
        with torch.no_grad():
            pixels = self.processor.sam_pixel_values(images[0])[None].to(self.device, self.dtype)
            decoded = self.model.decode_masks([torch.stack(states)], pixels)
        masks, low_res = self.postprocess_masks(decoded.masks[0], images[0].size)
        labels = seg_labels(text, SEG_TOKEN)
        return [
            MaskResult(
                mask=masks[k],
                score=float(decoded.scores[0][k]),
                label=labels[k] if k < len(labels) else None,
                index=k,
                low_res=low_res[k],
            )
            for k in range(len(states))
        ]

    def _volume_masks(self, prediction: VideoPrediction, item: EncodedRequest) -> None:
        """Fill ``prediction.volume_masks``: each ``[SEG]`` on every frame of the request's first video."""
        if not prediction.seg_states:
            return
        source = item.sources[0] if item.sources else None
        frames = mask_frames(source, item.videos[0], self.max_frames)
        if frames.note:
            prediction.notes.append(frames.note)
        labels = seg_labels(prediction.text, SEG_TOKEN)
        prediction.volume_masks = self.volume_segmenter.segment(prediction.seg_states, frames.volume, labels)

    def postprocess_masks(self, logits: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Low-res mask logits ``[K, h, w]`` -> boolean masks ``[K, H, W]`` of the ``(width, height)`` image and
        the thresholded low-res masks ``[K, h, w]``, as ``config.mask_postprocess`` says."""
        logits = logits.detach().float()
        low_res = (logits.sigmoid() > self.mask_threshold).cpu().numpy()
        width, height = size
        if self.model.config.mask_postprocess == "threshold_low_res":
            full = [mask_to_image(mask, (width, height)) for mask in low_res]
            return np.stack(full) if full else np.zeros((0, height, width), dtype=bool), low_res
        upsampled = F.interpolate(logits[:, None], size=(height, width), mode="bilinear")
        return (upsampled[:, 0].sigmoid() > self.mask_threshold).cpu().numpy(), low_res

    def _boxes(self, text: str, images: list) -> list:
        try:
            from ..processing import boxes as box_module
        except ImportError:  # the box parser ships with the data package
            return []
        if not images:
            return []
        return box_module.parse_boxes_to_original(text, images[0].size, self.processor)


# what generate takes besides the ids: the images' and the videos' pixels and grids
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def masks_to_array(prediction: Prediction) -> np.ndarray:
    """All masks of a prediction stacked ``[K, H, W]`` (``K`` may be 0)."""
    if not prediction.masks:
        width, height = prediction.image_size or (0, 0)
        return np.zeros((0, height, width), dtype=bool)
    return np.stack([m.mask for m in prediction.masks])
