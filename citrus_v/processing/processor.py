"""``CitrusVProcessor``: tokenizer + Qwen2-VL image processor + SAM 2 input + mask targets.

Built from transformers' PIL Qwen2-VL image processor and a tokenizer, so it needs no torchvision.
Pixel bounds follow upstream: explicit arguments, else the ``MIN_PIXELS`` / ``MAX_PIXELS`` environment
variables, else the saved values. Videos (a row's ``"videos"``, :mod:`~citrus_v.processing.videos`) follow
ms-swift's video variables (``FPS``, ``FPS_MIN_FRAMES``, ``FPS_MAX_FRAMES``, ``VIDEO_MIN_PIXELS``,
``VIDEO_MAX_PIXELS``, ``VIDEO_TOTAL_PIXELS``), read when the processor is made, or ``video_sampling``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypedDict

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .. import objectives
from ..checkpoint_layout import CheckpointError, resolve_model
from ..media import MedicalImageError
from ..media.frame_sampling import VideoSampling
from ..objectives.annotations import ANNOTATIONS, MASK_ANNOTATIONS
from ..tokens import DEFAULT_SYSTEM, IGNORE_INDEX, SEG_TOKEN
from .boxes import model_size
from .images import ImageInput, MaskInput, load_image, load_mask, mask_target, sam_pixel_values, smart_resized
from .template import ChatTemplate, TemplateError, place_images, place_videos
from .tokenizer_builder import add_citrus_tokens
from .video_masks import DEFAULT_SAM_TRAIN_FRAMES, VideoMaskError, VideoTargets, frame_rng, video_targets
from .videos import LoadedVideo, VideoInput, load_video, video_pixel_values

logger = logging.getLogger(__name__)

PROCESSOR_FILE = "citrus_v_processor.json"
DEFAULT_MIN_PIXELS = 200704  # upstream training bounds
DEFAULT_MAX_PIXELS = 1003520
# What SAM 2's input is made from (half of parity mode; the other half is the model's ``mask_postprocess``):
#   "original"      the original image, resized to SAM's square input: SAM sees every pixel there is.
#   "smart_resized" the smart-resized image the vision tower sees (under min/max pixels), resized to SAM's
#                   input, as upstream Citrus-V's template does: the distribution the released SAM 2 was
#                   trained and evaluated on (at upstream's serving MAX_PIXELS=65535, about 256x256 pixels).
SAM_INPUTS = ("original", "smart_resized")
DEFAULT_SAM_INPUT = "original"
UPSTREAM_SAM_INPUT = "smart_resized"
# what a sample with 3-D masks gives the model: SAM 2's training frames and their targets (see video_masks.py)
VIDEO_TARGET_KEYS = ("sam_video_pixel_values", "gt_video_masks", "gt_video_present")


class ProcessorError(ValueError):
    """A processor folder or a sample the processor cannot use, with the fix in the message."""


class Sample(TypedDict, total=False):
    """One conversation: ms-swift rows hold exactly these keys (images and masks may be paths)."""

    messages: list[dict]
    images: list[ImageInput]
    videos: list[VideoInput]  # one per <video> placeholder: a Volume, a list of frames, or a volume/clip path
    # one per [SEG]: 2-D masks of the first image, or (a row with a video and no image) 3-D masks of the first
    # video (label volume references or [N, H, W] arrays, see citrus_v.processing.video_masks)
    masks: list[MaskInput]
    system: str
    frame_draw: int  # optional, training-only: the row's draw number, which seeds the SAM 2 frames of a video row
    # optional, training-only: row annotations (citrus_v.objectives.annotations) such as lesion_points


def _pixels_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as err:
        raise ProcessorError(f"environment variable {name}={value!r} is not an integer number of pixels") from err


def _video_sampling_from_env(saved: dict[str, Any] | None = None) -> VideoSampling:
    """ms-swift's video variables (``FPS``, ``FPS_MAX_FRAMES``, ``VIDEO_MAX_PIXELS``, ...) as they are set now,
    over ``saved`` (a folder's own settings, lower-case names), over qwen_vl_utils' defaults."""
    known = {spec.name for spec in fields(VideoSampling)}
    unknown = sorted(set(saved or {}) - known)
    if unknown:
        raise ProcessorError(
            f"{PROCESSOR_FILE}: unknown video_sampling setting(s) {', '.join(unknown)}; use {', '.join(sorted(known))}"
        )
    try:
        return VideoSampling.from_env(os.environ, base=VideoSampling(**(saved or {})))
    except MedicalImageError as err:
        raise ProcessorError(f"environment variable {err}. Fix: set it to a number or unset it") from err


class CitrusVProcessor:
    """Turns conversations with images and masks into model inputs.

    Args:
        tokenizer: a Qwen2.5 ChatML tokenizer that holds ``[SEG]``.
        image_processor: the Qwen2-VL image processor (smart resize to multiples of patch×merge).
        sam_image_size: side of the square SAM 2 input (1024 for SAM 2 Hiera).
        mask_size: side of the low-res mask targets (``4 × sam_image_size / 16``; 256 for 1024).
        default_system: system prompt used when a sample gives none.
        min_pixels, max_pixels: smart-resize bounds; default ``MIN_PIXELS``/``MAX_PIXELS`` from the
            environment, else the image processor's saved ``size``.
        sam_input: what SAM 2's input is made from, ``"original"`` or ``"smart_resized"`` (see
            :data:`SAM_INPUTS`); a released upstream folder gets ``"smart_resized"``, as upstream does.
        video_sampling: how videos are sampled and sized; default ms-swift's environment variables
            (``FPS_MAX_FRAMES``, ``VIDEO_MAX_PIXELS``, ...) at construction, else qwen_vl_utils' defaults.
            Change it later with :meth:`set_video_sampling`. Settings that differ from qwen_vl_utils' defaults
            are saved with the folder and loaded again under any environment variables set then.
        sam_train_frames: frames of a volume or clip SAM 2 trains on per sample, for a row with 3-D masks (see
            :mod:`~citrus_v.processing.video_masks`); a training setting, not saved with the processor.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Qwen2VLImageProcessorPil,
        sam_image_size: int = 1024,
        mask_size: int = 256,
        default_system: str | None = DEFAULT_SYSTEM,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        sam_input: str = DEFAULT_SAM_INPUT,
        video_sampling: VideoSampling | None = None,
        sam_train_frames: int = DEFAULT_SAM_TRAIN_FRAMES,
    ) -> None:
        if sam_input not in SAM_INPUTS:
            raise ProcessorError(
                f"sam_input {sam_input!r} is not one of {', '.join(SAM_INPUTS)} (set in {PROCESSOR_FILE})"
            )
        if SEG_TOKEN not in tokenizer.get_vocab():
            raise ProcessorError(
                f"the tokenizer has no {SEG_TOKEN} token. Fix: add it with "
                "citrus_v.processing.tokenizer_builder.add_citrus_tokens(tokenizer), or build the model "
                "with `citrus-v build`, which adds it"
            )
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}  # token id -> text, for objectives that match answer text
        self.image_processor = image_processor
        self.sam_image_size = int(sam_image_size)
        self.mask_size = int(mask_size)
        self.default_system = default_system
        self.sam_input = sam_input
        self.template = ChatTemplate(tokenizer, default_system)
        resolve_pixels(image_processor, min_pixels, max_pixels)
        self.video_sampling = video_sampling if video_sampling is not None else _video_sampling_from_env()
        if int(sam_train_frames) < 1:
            raise ProcessorError(f"sam_train_frames must be at least 1, got {sam_train_frames}")
        self.sam_train_frames = int(sam_train_frames)

    # --- ids -------------------------------------------------------------------------------------------
    @property
    def seg_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(SEG_TOKEN))

    @property
    def image_token_id(self) -> int:
        return self.template.image_pad_id

    @property
    def video_token_id(self) -> int | None:
        """``<|video_pad|>``'s id (``None`` for a tokenizer without it, which then encodes no video)."""
        return self.template.video_pad_id

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What Qwen2.5-VL's rotary positions read: 0 for text, 1 for an image token, 2 for a video token."""
        types = (input_ids == self.image_token_id).int()
        if self.video_token_id is not None:
            types = types + 2 * (input_ids == self.video_token_id).int()
        return types

    # --- videos -----------------------------------------------------------------------------------------
    def set_video_sampling(self, **values: float | int) -> None:
        """Change the video knobs by their lower-case ms-swift names, e.g. ``fps_max_frames=12``,
        ``video_max_pixels=50176`` (the others stay as they are)."""
        known = {spec.name for spec in fields(VideoSampling)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ProcessorError(f"unknown video setting(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
        self.video_sampling = replace(self.video_sampling, **values)

    def load_video(self, video: VideoInput) -> LoadedVideo:
        """The frames of one video as the model sees them, under :attr:`video_sampling`."""
        return load_video(video, self.video_sampling)

    @property
    def min_pixels(self) -> int:
        return int(self.image_processor.size.shortest_edge)

    @property
    def max_pixels(self) -> int:
        return int(self.image_processor.size.longest_edge)

    # --- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer, the image processor and ``citrus_v_processor.json`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        settings = {
            "processor_class": type(self).__name__,
            "sam_image_size": self.sam_image_size,
            "mask_size": self.mask_size,
            "default_system": self.default_system,
            "sam_input": self.sam_input,
        }
        # the video knobs that differ from qwen_vl_utils' defaults travel with the folder (the environment
        # variables still win when it is loaded)
        changed = {
            spec.name: getattr(self.video_sampling, spec.name)
            for spec in fields(VideoSampling)
            if getattr(self.video_sampling, spec.name) != getattr(VideoSampling(), spec.name)
        }
        if changed:
            settings["video_sampling"] = changed
        (directory / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **overrides: Any,
    ) -> CitrusVProcessor:
        """Load from a folder written by :meth:`save_pretrained`, a Qwen2.5-VL folder holding ``[SEG]``, or a
        released upstream Citrus-V folder (its tokenizer gets ``[SEG]``, ``<bbox>``, ``</bbox>`` where missing,
        as upstream's loader does; the SAM sizes come from its SAM 2 configuration)."""
        try:
            directory = resolve_model(directory)
        except CheckpointError as err:
            raise ProcessorError(str(err)) from err
        if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
            raise ProcessorError(
                f"{directory / 'tokenizer.json'} is missing: the folder has no tokenizer. Fix: copy the "
                "tokenizer files of the base model into it, or rebuild it with `citrus-v build`"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as err:  # transformers raises many types here; name the folder and the fix
            raise ProcessorError(
                f"cannot load the tokenizer in {directory}: {err}. Fix: check tokenizer.json / "
                "tokenizer_config.json, or rebuild the folder with `citrus-v build`"
            ) from err
        settings: dict[str, Any] = _upstream_settings(directory, tokenizer)
        settings_file = directory / PROCESSOR_FILE
        if settings_file.is_file():
            try:
                settings = json.loads(settings_file.read_text())
            except json.JSONDecodeError as err:
                raise ProcessorError(f"{settings_file} line {err.lineno}: invalid JSON ({err.msg})") from err
        settings.pop("processor_class", None)
        saved_video = settings.pop("video_sampling", None)
        settings.update(overrides)
        if settings.get("video_sampling") is None:
            settings["video_sampling"] = _video_sampling_from_env(saved_video)
        if (directory / "preprocessor_config.json").is_file():
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
        else:
            image_processor = Qwen2VLImageProcessorPil(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS)
        return cls(tokenizer, image_processor, min_pixels=min_pixels, max_pixels=max_pixels, **settings)

    # --- encoding ---------------------------------------------------------------------------------------
    def __call__(
        self,
        samples: Sample | Sequence[Sample],
        add_generation_prompt: bool = False,
        padding_side: str = "right",
        return_labels: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """Encode one or more samples into a padded batch.

        Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
        ``image_grid_thw`` (when there are images), ``pixel_values_videos``, ``video_grid_thw`` and
        ``second_per_grid_ts`` (when there are videos), ``sam_pixel_values`` ``[B, 3, S, S]``,
        ``sam_image_mask`` ``[B]``, and with ``return_labels`` also ``labels`` and ``gt_masks``
        (per sample ``[K_i, h, w]``, one per ``[SEG]`` in the sample's text; a sample with 3-D masks has none
        here but its video targets, see :meth:`collate`). A sample longer than
        ``max_length`` raises (samples are dropped, never cut; see :class:`~.template.SampleTooLongError`).
        """
        if isinstance(samples, dict):
            samples = [samples]
        rows = []
        for index, sample in enumerate(samples):
            try:
                rows.append(self._encode_sample(sample, add_generation_prompt, return_labels, max_length))
            except (TemplateError, ProcessorError, FileNotFoundError, ValueError, TypeError) as err:
                raise ProcessorError(f"sample {index}: {err}") from err
        return self.collate(rows, padding_side, return_labels)

    def encode_sample(
        self,
        sample: Sample,
        add_generation_prompt: bool = False,
        return_labels: bool = True,
        max_length: int | None = None,
        sam_input: bool = True,
        sam_frames: int | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Encode one sample: ``input_ids``/``labels`` lists, ``pixel_values``, ``image_grid_thw``,
        ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` (None without a video),
        ``sam_pixel_values`` (None without an image, or with ``sam_input=False``: inference makes SAM 2's input
        only for an answer that holds a ``[SEG]``) and ``gt_masks`` ``[K, h, w]``.

        A sample with a video, no image and 3-D masks (with ``return_labels``) also gets SAM 2's training frames
        (:mod:`~citrus_v.processing.video_masks`): ``sam_video_pixel_values`` ``[F, 3, S, S]``,
        ``gt_video_masks`` ``[K, F, h, w]``, ``gt_video_present`` ``[K, F]`` and ``sam_video_frames`` (the
        source frame of each); None for every other sample. ``sam_frames`` is F (default
        :attr:`sam_train_frames`), ``seed`` with the sample's ``frame_draw`` seeds the choice.

        The unit that :meth:`collate` pads and :mod:`citrus_v.data.packing` packs. Raises
        :class:`~.template.SampleTooLongError` past ``max_length`` (the sample is dropped, never cut).
        """
        frames = (sam_frames or self.sam_train_frames, seed)
        return self._encode_sample(sample, add_generation_prompt, return_labels, max_length, sam_input, frames)

    def collate(
        self, rows: Sequence[dict[str, Any]], padding_side: str = "right", return_labels: bool = True
    ) -> dict[str, Any]:
        """Pad samples from :meth:`encode_sample` into one batch (the same keys as :meth:`__call__`).

        With ``return_labels``, a batch holding a sample with 3-D masks also gets per sample (None for the
        others) ``sam_video_pixel_values`` ``[F, 3, S, S]``, ``gt_video_masks`` ``[K, F, h, w]`` and
        ``gt_video_present`` ``[K, F]``.
        """
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pixel_values, grids, sam_inputs, sam_flags, gt_masks = [], [], [], [], []
        for encoded in rows:
            if encoded["pixel_values"] is not None:
                pixel_values.append(encoded["pixel_values"])
                grids.append(encoded["image_grid_thw"])
            sam_inputs.append(encoded["sam_pixel_values"])
            sam_flags.append(encoded["sam_pixel_values"] is not None)
            gt_masks.append(encoded["gt_masks"])

        batch = self._pad([r["input_ids"] for r in rows], [r["labels"] for r in rows], padding_side)
        if not return_labels:
            batch.pop("labels")
        batch["mm_token_type_ids"] = self.mm_token_type_ids(batch["input_ids"])
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
            batch["image_grid_thw"] = torch.cat(grids)
        batch.update(_collate_videos(rows))
        if return_labels or any(sam_flags):  # inference rows without SAM 2 input carry none
            size = self.sam_image_size
            batch["sam_pixel_values"] = torch.stack(
                [s if s is not None else torch.zeros(3, size, size) for s in sam_inputs]
            )
            batch["sam_image_mask"] = torch.tensor(sam_flags, dtype=torch.bool)
        if return_labels:
            batch["gt_masks"] = gt_masks
            width, merge = batch["input_ids"].shape[1], int(self.image_processor.merge_size)
            singles = [[index] for index in range(len(rows))]
            targets = objectives.collate_targets(rows, merge, singles, width, padding_side)
            if targets:
                batch["objective_targets"] = targets
            batch.update(_collate_video_targets(rows))
        return batch

    def _encode_sample(
        self,
        sample: Sample,
        add_generation_prompt: bool,
        return_labels: bool,
        max_length: int | None = None,
        sam_input: bool = True,
        frames: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        if not isinstance(sample, dict) or "messages" not in sample:
            raise ProcessorError("each sample must be a dict with a 'messages' list")
        images = [load_image(image) for image in sample.get("images") or []]
        video = self._encode_videos(sample.get("videos") or [])
        loaded = video.pop("loaded")
        messages = place_videos(place_images(sample["messages"], len(images)), len(video["video_tokens"]))
        pixel_values = grid = None
        image_tokens: list[int] = []
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
            merge = int(self.image_processor.merge_size) ** 2
            image_tokens = [int(t * h * w) // merge for t, h, w in grid.tolist()]
        encoded = self.template.encode(
            messages,
            image_tokens,
            system=sample.get("system"),
            add_generation_prompt=add_generation_prompt,
            max_length=max_length,
            video_tokens=video.pop("video_tokens"),
        )
        num_seg = sum(1 for token in encoded.input_ids if token == self.seg_token_id)
        masks = sample.get("masks") or []
        if return_labels and masks and len(masks) != num_seg:
            raise ProcessorError(
                f"{len(masks)} mask(s) for {num_seg} {SEG_TOKEN} token(s): give one mask per {SEG_TOKEN}, in order"
            )
        has_video = video["pixel_values_videos"] is not None
        if num_seg and not images and not has_video:
            raise ProcessorError(f"{num_seg} {SEG_TOKEN} token(s) but no image: a mask needs an image")
        volume_targets = None
        if masks and not images and has_video:  # 3-D masks of the first video
            if return_labels:
                volume_targets = self._video_targets(sample, loaded[0], masks, frames)
            masks = []
        mask_hw = (self.mask_size, self.mask_size)
        binary = [load_mask(mask) for mask in masks]
        if images:
            width, height = images[0].size
            for k, array in enumerate(binary):
                if array.shape != (height, width):
                    raise ProcessorError(
                        f"mask {k} is {array.shape[1]}x{array.shape[0]} but the first image is "
                        f"{width}x{height}: masks must match their image's size"
                    )
        targets = torch.stack([mask_target(b, mask_hw) for b in binary]) if binary else torch.zeros(0, *mask_hw)
        aims = self._objective_targets(sample, images, grid, encoded) if return_labels and images else {}
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
            **video,
            "sam_pixel_values": self.sam_pixel_values(images[0]) if images and sam_input else None,
            "gt_masks": targets,
            "objective_targets": aims,
            "sam_video_pixel_values": None if volume_targets is None else volume_targets.sam_pixel_values,
            "gt_video_masks": None if volume_targets is None else volume_targets.masks,
            "gt_video_present": None if volume_targets is None else volume_targets.present,
            "sam_video_frames": None if volume_targets is None else volume_targets.frames,
        }

    def _video_targets(
        self, sample: Sample, loaded: LoadedVideo, masks: Sequence[Any], frames: tuple[int, int] | None
    ) -> VideoTargets:
        """SAM 2's training frames and the 3-D mask targets of a row whose masks belong to its first video."""
        count, seed = frames if frames is not None else (self.sam_train_frames, 0)
        source = sample["videos"][0]
        rng = frame_rng(seed, int(sample.get("frame_draw") or 0), source)
        mask_hw = (self.mask_size, self.mask_size)
        try:
            return video_targets(source, loaded, masks, count, rng, self.sam_pixel_values, mask_hw)
        except VideoMaskError as err:
            message = f"{len(masks)} mask(s) but no image, so they are 3-D masks of videos[0]: {err}"
            raise ProcessorError(message) from err

    def _encode_videos(self, videos: Sequence[VideoInput]) -> dict[str, Any]:
        """The pixels, grids and seconds per temporal patch of a sample's videos, and the ``<|video_pad|>``
        count of each (``video_tokens``: t·h·w / merge², as transformers' Qwen2.5-VL processor expands them)."""
        if not isinstance(videos, (list, tuple)):
            raise ProcessorError(f'"videos" must be a list (one entry per <video>); got {type(videos).__name__}')
        merge = int(self.image_processor.merge_size) ** 2
        temporal = int(self.image_processor.temporal_patch_size)
        pixels, grids, seconds, loaded_videos = [], [], [], []
        for index, item in enumerate(videos):
            try:
                loaded = self.load_video(item)
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise ProcessorError(f'"videos"[{index}]: {err}') from err
            values, grid = video_pixel_values(self.image_processor, loaded.frames)
            pixels.append(values)
            grids.append(grid)
            seconds.append(loaded.second_per_grid(temporal))
            loaded_videos.append(loaded)
        return {
            "pixel_values_videos": torch.cat(pixels) if pixels else None,
            "video_grid_thw": torch.cat(grids) if grids else None,
            "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32) if seconds else None,
            "video_tokens": [int(t * h * w) // merge for grid in grids for t, h, w in grid.tolist()],
            "loaded": loaded_videos,
        }

    def sam_pixel_values(self, image: Image.Image) -> torch.Tensor:
        """SAM 2's normalised ``[3, S, S]`` input for ``image`` (see :meth:`sam_source`)."""
        return sam_pixel_values(self.sam_source(image), self.sam_image_size)

    def sam_source(self, image: Image.Image) -> Image.Image:
        """The image SAM 2's input is made from: the original, or (``sam_input="smart_resized"``) the
        smart-resized image the vision tower sees."""
        if self.sam_input == "original":
            return image
        size = model_size(
            *image.size,
            self.min_pixels,
            self.max_pixels,
            int(self.image_processor.patch_size),
            int(self.image_processor.merge_size),
        )
        return smart_resized(image, size)

    def _objective_targets(self, sample: Sample, images: list, grid: torch.Tensor, encoded: Any) -> dict[str, Any]:
        """The training-only objectives' targets of one sample, from the annotations it carries."""
        annotations = {
            key: load_mask(sample[key]) if key in MASK_ANNOTATIONS else sample[key]
            for key in ANNOTATIONS
            if sample.get(key) is not None
        }
        if not annotations:
            return {}
        context = objectives.EncodeContext(
            image_size=images[0].size,
            grid=grid,
            merge=int(self.image_processor.merge_size),
            input_ids=encoded.input_ids,
            labels=encoded.labels,
            image_token_id=self.image_token_id,
            token_text=self._token_text,
        )
        targets = {}
        for objective in objectives.with_targets():
            if set(objective.reads) & annotations.keys():
                value = objective.encode(annotations, context)
                if value is not None:
                    targets[objective.name] = value
        return targets

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _pad(self, ids: list[list[int]], labels: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ProcessorError("the tokenizer has no pad token: set tokenizer.pad_token (Qwen uses <|endoftext|>)")
        length = max(len(row) for row in ids)
        return {
            "input_ids": _pad_rows(ids, length, pad_id, side),
            "attention_mask": _pad_rows([[1] * len(row) for row in ids], length, 0, side),
            "labels": _pad_rows(labels, length, IGNORE_INDEX, side),
        }

    def decode(self, token_ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Decode ids to text; ``[SEG]`` stays visible unless ``skip_special_tokens``."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def batch_to(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A collated batch ready for a model on ``device`` in ``dtype``: every tensor on the device, floating ones in
    the dtype but ``second_per_grid_ts`` (video time positions stay float32); other values as they are."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device)
            if value.is_floating_point() and key != "second_per_grid_ts":
                value = value.to(dtype)
        out[key] = value
    return out


def _pad_rows(rows: Sequence[Sequence[int] | None], length: int, fill: int, side: str) -> torch.Tensor:
    """A ``[len(rows), length]`` tensor of ``fill`` with each row written against ``side`` (None: all ``fill``)."""
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        if row is not None:
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            out[index, span] = torch.as_tensor(row, dtype=torch.long)
    return out


def _collate_videos(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The rows' videos in row order, concatenated as images are (nothing when no row has one)."""
    with_videos = [row for row in rows if row.get("pixel_values_videos") is not None]
    if not with_videos:
        return {}
    return {
        key: torch.cat([row[key] for row in with_videos])
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    }


def _collate_video_targets(rows: Sequence[dict[str, Any]]) -> dict[str, list[torch.Tensor | None]]:
    """Per sample, SAM 2's training frames and 3-D mask targets (None for a sample without them); nothing when
    no sample of the batch has them, so that a batch of 2-D rows is what it always was."""
    if all(row.get("gt_video_masks") is None for row in rows):
        return {}
    return {key: [row.get(key) for row in rows] for key in VIDEO_TARGET_KEYS}


def _upstream_settings(directory: Path, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """For a released upstream folder: add the Citrus-V tokens its files lack (saying so at each load) and
    return its SAM sizes; for other folders: nothing."""
    from ..checkpoint_layout import upstream_sam_sizes

    sizes = upstream_sam_sizes(directory)
    if sizes is None:
        return {}
    added = add_citrus_tokens(tokenizer)
    if added:
        logger.warning(
            "%s: the tokenizer files lack %s; added them after the last token (ids %s), as upstream's loader does",
            directory,
            ", ".join(added),
            ", ".join(str(tokenizer.convert_tokens_to_ids(t)) for t in added),
        )
    expected = json.loads((directory / "config.json").read_text()).get("seg_token_idx")
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    if expected is not None and int(expected) != seg_id:
        raise ProcessorError(
            f"{directory / 'config.json'}: seg_token_idx is {expected} but the tokenizer gives {SEG_TOKEN} the id "
            f"{seg_id}. Fix: use the tokenizer files released with these weights"
        )
    return {"sam_image_size": sizes[0], "mask_size": sizes[1], "sam_input": UPSTREAM_SAM_INPUT}


def resolve_pixels(
    image_processor: Qwen2VLImageProcessorPil, min_pixels: int | None = None, max_pixels: int | None = None
) -> None:
    """Apply the pixel bounds: explicit values, else ``MIN_PIXELS``/``MAX_PIXELS``, else what is saved."""
    min_pixels = min_pixels if min_pixels is not None else _pixels_from_env("MIN_PIXELS")
    max_pixels = max_pixels if max_pixels is not None else _pixels_from_env("MAX_PIXELS")
    lo = int(min_pixels) if min_pixels is not None else int(image_processor.size.shortest_edge)
    hi = int(max_pixels) if max_pixels is not None else int(image_processor.size.longest_edge)
    if lo <= 0 or hi < lo:
        raise ProcessorError(f"pixel bounds must satisfy 0 < MIN_PIXELS <= MAX_PIXELS; got {lo} and {hi}")
    image_processor.size = SizeDict(shortest_edge=lo, longest_edge=hi)
