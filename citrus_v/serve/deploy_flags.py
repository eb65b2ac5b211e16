"""Upstream's deploy line, read here: what each ``swift deploy`` flag and ms-swift environment variable does.

Upstream Citrus-V's README deploys with::

    MAX_PIXELS=65535 VIDEO_MAX_PIXELS=50176 FPS_MAX_FRAMES=12 swift deploy --model M \\
        --served_model_name CitrusV_8B --template citrus_v_infer --infer_backend pt --torch_dtype bfloat16 --port 8000

and the same line with ``citrus-v deploy`` in place of ``swift deploy`` runs here. Each flag maps to ours or is
honoured; the environment variables that ms-swift hands to ``qwen_vl_utils`` are honoured, read by the
processor when the model loads: the image pixel bounds, and the video settings that choose and size the frames
of a volume or clip the language model sees (:mod:`citrus_v.media.frame_sampling`). ``MAX_RATIO`` is accepted
and named as unused. A backend other than ``pt`` is refused with the reason. :func:`environment_notes` and
:func:`flag_notes` give the one line per variable or flag that the server prints at start, with the value in
effect.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

INFER_BACKENDS = ("pt", "vllm", "sglang", "lmdeploy")
TEMPLATES = ("citrus_v_infer", "citrus_v")
TORCH_DTYPES = ("bfloat16", "float16", "float32")

PIXEL_VARIABLES = ("MIN_PIXELS", "MAX_PIXELS")
# ms-swift's qwen_vl_utils video variables (swift/llm/model/model/qwen.py, patch_qwen_vl_utils): what each does to
# a volume or clip in a request, with the value in effect (the processor's video sampling, by lower-case name)
VIDEO_VARIABLES = {
    "VIDEO_MIN_PIXELS": "the fewest pixels a frame of a volume or clip is resized to for the language model (in "
    "effect: {video_min_pixels})",
    "VIDEO_MAX_PIXELS": "the most pixels a frame of a volume or clip is resized to for the language model (in "
    "effect: {video_max_pixels}); SAM 2 still segments each frame at its own size",
    "VIDEO_TOTAL_PIXELS": "the pixels of all frames of one video the language model sees together: a frame gets at "
    "most this x FRAME_FACTOR / frames (in effect: {video_total_pixels})",
    "FPS": "the rate a clip is sampled at for the language model (in effect: {fps:g} frames per second); a volume's "
    "slices have no rate and are all kept up to FPS_MAX_FRAMES",
    "FPS_MIN_FRAMES": "the fewest frames of a clip the language model sees (in effect: {fps_min_frames})",
    "FPS_MAX_FRAMES": "the most frames of a clip, or slices of a volume, the language model sees, evenly spaced (in "
    "effect: {fps_max_frames}); SAM 2 still segments every frame",
    "FRAME_FACTOR": "the frames the language model sees are a multiple of this (in effect: {frame_factor}); the "
    "vision tower takes them in pairs",
}
# accepted, and named as changing nothing here
UNUSED_VARIABLES = {
    "MAX_RATIO": "accepted, not used: transformers' smart resize refuses aspect ratios over 200, as qwen_vl_utils does",
}
FLOAT_VARIABLES = ("FPS",)


class DeployLineError(ValueError):
    """A flag or environment variable of the deploy line that cannot be honoured; the message says why."""


def check_backend(name: str) -> None:
    """Only ``pt`` serves this model: refuse the others with the reason."""
    if name != "pt":
        raise DeployLineError(
            f"--infer_backend {name} is not supported: the [SEG] hidden states are captured and SAM 2 decodes the "
            "masks inside PyTorch's generation loop, which vLLM, SGLang and LMDeploy do not expose; use "
            "--infer_backend pt (it batches requests itself: --max_batch_size)"
        )


def read_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The ms-swift variables set in ``environ``, each checked to be a number; raises :class:`DeployLineError`."""
    known = (*PIXEL_VARIABLES, "IMAGE_FACTOR", *VIDEO_VARIABLES, *UNUSED_VARIABLES)
    found = {name: environ[name] for name in known if environ.get(name) not in (None, "")}
    for name, value in found.items():
        kind = float if name in FLOAT_VARIABLES else int
        try:
            number = kind(value)
        except ValueError as err:
            raise DeployLineError(f"{name}={value!r} is not a{'' if kind is int else ' decimal'} number") from err
        if number <= 0:
            raise DeployLineError(f"{name}={value!r} must be above 0")
    return found


def check_image_factor(found: Mapping[str, str], processor) -> None:
    """``IMAGE_FACTOR`` must be the checkpoint's own patch × merge (28 for Qwen2.5-VL): it is not a setting."""
    if "IMAGE_FACTOR" not in found:
        return
    factor = int(processor.image_processor.patch_size) * int(processor.image_processor.merge_size)
    if int(found["IMAGE_FACTOR"]) != factor:
        raise DeployLineError(
            f"IMAGE_FACTOR={found['IMAGE_FACTOR']} does not match this checkpoint's patch size × merge size "
            f"({factor}), which fixes it; unset IMAGE_FACTOR"
        )


def environment_notes(found: Mapping[str, str], processor, environ: Mapping[str, str]) -> list[str]:
    """One line per ms-swift variable that is set (and ``CUDA_VISIBLE_DEVICES``), saying what it does here."""
    lines = []
    for name, value in found.items():
        if name in PIXEL_VARIABLES:
            lines.append(
                f"{name}={value}: the vision tower's smart-resize bound, as ms-swift reads it (in effect: "
                f"{processor.min_pixels} to {processor.max_pixels} pixels per image)"
            )
        elif name == "IMAGE_FACTOR":
            lines.append(f"IMAGE_FACTOR={value}: the checkpoint's own patch × merge size, as required")
        elif name in VIDEO_VARIABLES:
            lines.append(f"{name}={value}: {VIDEO_VARIABLES[name].format(**asdict(processor.video_sampling))}")
        else:
            lines.append(f"{name}={value}: {UNUSED_VARIABLES[name]}")
    devices = environ.get("CUDA_VISIBLE_DEVICES")
    if devices:
        lines.append(
            f"CUDA_VISIBLE_DEVICES={devices}: torch sees these devices; the model runs whole on one of them "
            "(--device, default the first), not split across them"
        )
    return lines


_FLAG_MEANINGS = {
    "served_model_name": "clients send model={value!r}",
    "infer_backend": "PyTorch generation, the only backend (it batches requests: --max_batch_size)",
    "torch_dtype": "the model is loaded in torch.{value}",
    "template": "upstream's template name: the checkpoint's own chat template (ChatML; SAM 2 reads image 0)",
    "api_key": "requests must send 'Authorization: Bearer <key>'",
}


def flag_notes(args: argparse.Namespace, flags: Sequence[tuple[Sequence[str], dict[str, Any]]]) -> list[str]:
    """One line per flag given a value other than its default: what it maps to (else its help)."""
    lines = []
    for names, options in flags:
        dest = options.get("dest") or names[0].lstrip("-")
        value = getattr(args, dest, None)
        if value is None or value == options.get("default"):
            continue
        meaning = _FLAG_MEANINGS[dest].format(value=value) if dest in _FLAG_MEANINGS else options.get("help", "")
        shown = "<set>" if dest == "api_key" else value
        lines.append(f"{names[0]} {shown}: {meaning}")
    return lines
