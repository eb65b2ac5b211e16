"""A whole-volume answer on the page: the picture of any slice with that slice's masks, the legend with each
target's volume, the answer with its chips, the three orthogonal planes through each mask (a strip of frames for
a clip, drawn by :mod:`citrus_v.infer.volume_pictures`, as ``citrus-v infer`` draws them) and the 3-D mask files.

The page keeps a :class:`VolumeResult` while the slider moves, so that the answer, which is about every slice,
stays; :meth:`VolumeResult.fits` says when it no longer belongs to what is shown.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..media import Volume
from .answer_chips import answer_html, answer_notes, notes_html
from .client import Reply
from .display import display_factors, display_overlay, enlarge
from .downloads import write_volume_downloads
from .measurements import measure_masks
from .planes_picture import answer_picture
from .scan import Scan, View
from .volume_answer import VolumeAnswer, decode_volume_grounding, view_masks
from .volume_legend import volume_legend_html
from .window_menu import FILE_WINDOW

COMPARE_LABEL = (
    "Left: slice shown · right: the whole-volume answer's masks on it (move the slider: the answer stays; "
    "scroll to zoom, drag to pan)"
)
PLANES_LABEL = "The masks on three orthogonal planes (a clip: its frames with mask)"


@dataclass
class VolumeResult:
    """A whole-volume answer, kept (in the page's state) while the slider moves through the volume."""

    path: str
    t: int
    answer: VolumeAnswer
    noun: str  # what the frames are: "axial slices", "slices", "frames"
    clip: bool

    def fits(self, path: str | None, view: View) -> bool:
        """Whether the answer is about the volume ``view`` shows (same file, whole-volume mode, time point)."""
        return bool(path) and str(path) == self.path and view.whole and view.t == self.t


def frames_noun(scan: Scan, volume: Volume) -> str:
    """What the frames of ``volume`` are called on the page."""
    if volume.kind == "clip":
        return "frames"
    return "axial slices" if scan.kind == "nifti" else "slices"


def volume_picture_and_legend(
    scan: Scan, view: View, answer: VolumeAnswer, noun: str, clip: bool
) -> tuple[Any, str]:
    """The viewer's value (the slice beside the slice with its masks) and the legend for ``view``."""
    import gradio as gr

    picture = scan.render(view)
    spacing = scan.pixel_spacing(view.axis)
    factors = display_factors(*picture.size, spacing)
    masks = view_masks(answer, scan, view)
    overlay = display_overlay(picture, masks, [], factors)
    legend = volume_legend_html(answer, measure_masks(masks, spacing), spacing, noun, clip)
    return gr.update(value=(enlarge(picture, factors), overlay), label=COMPARE_LABEL), legend


def volume_results(
    scan: Scan, view: View, volume: Volume, reply: Reply, query: str, out_dir: Path
) -> tuple[Any, ...]:
    """Everything the page shows for a fresh whole-volume answer: viewer, answer, legend, downloads, reasoning,
    grounding, the three planes, and the :class:`VolumeResult` to keep (``ValueError`` for a grounding that does
    not fit ``volume``)."""
    import gradio as gr

    answer = decode_volume_grounding(reply.grounding, volume.num_frames, volume.frame_shape)
    noun, clip = frames_noun(scan, volume), volume.kind == "clip"
    result = VolumeResult(str(scan.path), view.t, answer, noun, clip)
    viewer, legend = volume_picture_and_legend(scan, view, answer, noun, clip)
    planes = _planes(scan, view, volume, answer)
    files = write_volume_downloads(scan, volume, answer, planes, out_dir)
    text = _answer_text(scan, volume, answer, reply, query, files.problems, noun)
    planes_update = gr.update(value=planes, visible=planes is not None, label=PLANES_LABEL)
    reasoning = reply.reasoning or "(no reasoning in this answer)"
    file_list = [str(p) for p in files.files] or None
    return viewer, text, legend, file_list, reasoning, reply.grounding, planes_update, result


def _planes(scan: Scan, view: View, volume: Volume, answer: VolumeAnswer) -> Image.Image | None:
    """Three planes through each mask present (a strip for a clip), in the view's CT window; ``None`` when no
    target is present."""
    window = view.window if scan.ct and view.window != FILE_WINDOW else None
    return answer_picture(volume, answer, window)


def _answer_text(
    scan: Scan, volume: Volume, answer: VolumeAnswer, reply: Reply, query: str, problems: list[str], noun: str
) -> str:
    """The answer's header, text with chips, and the lines about what does not add up."""
    absent = {k for k, t in enumerate(answer.targets) if not t.present}
    notes = answer_notes(reply.content, answer.targets, "segment" in query.lower(), check_empty=False)
    notes += [f"The server notes: {line}" for line in answer.notes]
    if answer.frameless_boxes:
        notes.append(
            f"The server returned {answer.frameless_boxes} box(es) that name no frame of the volume: not drawn."
        )
    header = (
        f'<p class="answer-source">Answer about {html.escape(scan.path.name)}, the whole volume '
        f"({volume.num_frames} {noun}) to “{html.escape(query.strip())}”</p>"
    )
    return header + answer_html(reply.content, answer.targets, absent) + notes_html(notes + problems)
