"""What the page does on each event: a new upload, a new view (frame, slice, axis, time point, window), the
question mode (one picture, or the whole volume), a question.

Every change of the input returns the results cleared (answer, legend, downloads, reasoning, grounding, the
three planes, the volume answer kept for the slider), also when the new file cannot be read, so that no answer
is ever shown next to another picture than the one it was given; the page also cancels a question still in
flight when the input changes, and clears the previous answer before it sends a new question.

A whole-volume answer is about every slice: moving through the slices, along any NIfTI axis, or changing the
window keeps it and draws the masks of the picture shown. A new upload, the other question mode, or another
time point of a 4-D file clears it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from PIL import Image

from ..media import MedicalImageError
from .answer_chips import answer_html, answer_notes, notes_html
from .client import ApiClient, Reply
from .display import display_factors, display_overlay, enlarge
from .downloads import DownloadFolder, Downloads, write_downloads
from .legend import legend_html
from .measurements import measure_masks
from .scan import AXES, Scan, View, open_scan
from .volume_request import volume_data_url
from .volume_view import VolumeResult, volume_picture_and_legend, volume_results
from .window_menu import FILE_WINDOW, window_choices

DEFAULT_AXIS = "axial"
# Gradio's ``gr.update(value=None, visible=False)`` (a plain dict, so that this module imports without Gradio)
PLANES_HIDDEN: dict[str, Any] = {"__type__": "update", "value": None, "visible": False}
# answer, legend, downloads, reasoning, grounding, three planes, the volume answer kept for the slider
CLEARED_RESULTS: tuple[Any, ...] = ("", "", None, "", None, PLANES_HIDDEN, None)
VIEWER_LABEL = "Image sent (scroll to zoom, drag to pan)"
COMPARE_LABEL = "Left: image sent · right: masks and boxes (drag the handle to compare; scroll to zoom, drag to pan)"
UNREADABLE = (MedicalImageError, OSError, ValueError)


def make_view(
    frame: float | None, axis_name: str | None, t: float | None, window: str | None, whole: bool = False
) -> View:
    """The view the controls name (sliders are 1-based, views 0-based)."""
    return View(
        index=max(int(frame or 1) - 1, 0),
        axis=AXES.get(axis_name or DEFAULT_AXIS, 2),
        t=max(int(t or 1) - 1, 0),
        window=window or FILE_WINDOW,
        whole=bool(whole),
    )


class PageHandlers:
    """The page's event handlers, bound to one server client and one download folder."""

    def __init__(self, client: ApiClient, downloads: DownloadFolder | None = None) -> None:
        self.client = client
        self.downloads = downloads or DownloadFolder()

    # --- input changes: each returns the results cleared, also when the file cannot be read -------------------
    def upload(self, path: str | None) -> tuple[Any, ...]:
        """Controls for the new file (frame/slice slider, axis, time point, CT window menu) and its picture."""
        import gradio as gr

        hidden = gr.update(visible=False)
        if not path:
            return (hidden, hidden, hidden, hidden, gr.update(value=None, label=VIEWER_LABEL), *CLEARED_RESULTS)
        try:
            scan = open_scan(path)
            middle = scan.default_view(AXES[DEFAULT_AXIS])
            view = View(middle.index, middle.axis, whole=scan.volume_capable)
            picture = self._picture(scan, view)
        except UNREADABLE as err:
            return (hidden, hidden, hidden, hidden, *_unreadable(f"cannot read {Path(path).name}: {err}"))
        count = scan.frame_count(view.axis)
        frame = gr.update(
            visible=count > 1, minimum=1, maximum=max(count, 2), value=view.index + 1, step=1,
            label="Slice" if scan.kind in ("nifti", "series") else "Frame",
        )  # fmt: skip
        axis = gr.update(visible=scan.kind == "nifti", value=DEFAULT_AXIS)
        time = gr.update(visible=scan.time_points > 1, minimum=1, maximum=max(scan.time_points, 2), value=1, step=1)
        choices = window_choices(scan.ct)
        window = gr.update(visible=bool(choices), choices=choices or [FILE_WINDOW], value=FILE_WINDOW)
        return (frame, axis, time, window, picture, *CLEARED_RESULTS)

    def upload_page(self, path: str | None) -> tuple[Any, ...]:
        """:meth:`upload` with the question mode first: "the whole volume", shown and on, for a volume or clip."""
        import gradio as gr

        try:
            capable = bool(path) and open_scan(path).volume_capable
        except UNREADABLE:  # upload() says why
            capable = False
        return (gr.update(visible=capable, value=capable), *self.upload(path))

    def axis(
        self, path: str | None, axis_name: str, t: float, window: str, whole: bool = False,
        state: VolumeResult | None = None,
    ) -> tuple[Any, ...]:  # fmt: skip
        """A new NIfTI axis: the slice slider's range, the middle slice of that axis (a whole-volume answer kept,
        its masks cut along the new axis)."""
        import gradio as gr

        if not path:
            return (gr.update(), None, *CLEARED_RESULTS)
        try:
            scan = open_scan(path)
            view = make_view(None, axis_name, t, window, whole)
            view = View(scan.frame_count(view.axis) // 2, view.axis, view.t, view.window, view.whole)
            shown = self._shown(scan, view, state)
        except UNREADABLE as err:
            return (gr.update(), *_unreadable(f"cannot show {Path(path).name}: {err}"))
        count = scan.frame_count(view.axis)
        frame = gr.update(visible=count > 1, maximum=max(count, 2), value=view.index + 1)
        return (frame, *shown)

    def view(
        self, path: str | None, frame: float, axis_name: str, t: float, window: str, whole: bool = False,
        state: VolumeResult | None = None,
    ) -> tuple[Any, ...]:  # fmt: skip
        """A new frame, slice, time point, window or question mode (or a new question on the way): the picture,
        with the masks of a whole-volume answer that still fits, else alone with the results cleared."""
        if not path:
            return (None, *CLEARED_RESULTS)
        try:
            return self._shown(open_scan(path), make_view(frame, axis_name, t, window, whole), state)
        except UNREADABLE as err:
            return _unreadable(f"cannot show {Path(path).name}: {err}")

    def refresh(
        self, path: str | None, frame: float, axis_name: str, t: float, window: str, whole: bool,
        state: VolumeResult | None,
    ) -> tuple[Any, ...]:  # fmt: skip
        """After a whole-volume answer: the picture now on the slider with its masks (nothing in picture mode)."""
        if not whole or state is None:
            return _skipped()
        return self.view(path, frame, axis_name, t, window, whole, state)

    def _shown(self, scan: Scan, view: View, state: VolumeResult | None) -> tuple[Any, ...]:
        """The viewer and results for ``view``: a fitting volume answer drawn, the results kept; else cleared."""
        import gradio as gr

        if state is None or not state.fits(str(scan.path), view):
            return (self._picture(scan, view), *CLEARED_RESULTS)
        viewer, legend = volume_picture_and_legend(scan, view, state.answer, state.noun, state.clip)
        return (viewer, gr.skip(), legend, *(gr.skip() for _ in CLEARED_RESULTS[2:]))

    # --- a question ----------------------------------------------------------------------------------------------
    def ask(
        self, path: str | None, frame: float, axis_name: str, t: float, window: str, query: str, whole: bool = False
    ):
        """Send the picture of the chosen view; return the compared pictures and every result (nothing when the
        question is about the whole volume: :meth:`ask_volume` answers it)."""
        import gradio as gr

        if whole:
            return _skipped()
        _check_question(path, query)
        view = make_view(frame, axis_name, t, window)
        try:
            scan = open_scan(path)
            picture = scan.render(view)
        except UNREADABLE as err:
            raise gr.Error(f"cannot read {Path(path).name}: {err}") from err
        try:
            reply = self.client.ask(picture, query)
        except ValueError as err:  # a grounding that does not fit the picture
            raise gr.Error(str(err)) from err
        except Exception as err:  # the openai client raises many types (connection, status): show them
            raise gr.Error(f"the server at {self.client.settings.base_url} did not answer: {err}") from err
        return (*self._results(scan, view, picture, reply, query), None)

    def ask_volume(
        self, path: str | None, frame: float, axis_name: str, t: float, window: str, query: str, whole: bool
    ):
        """Send the whole volume or clip as one ``video_url`` part; return the picture of the chosen view with its
        masks, every result, and the answer to keep for the slider (nothing in picture mode: :meth:`ask`)."""
        import gradio as gr

        if not whole:
            return _skipped()
        _check_question(path, query)
        view = make_view(frame, axis_name, t, window, whole)
        try:
            scan = open_scan(path)
            volume = scan.volume(view.t)
            url = volume_data_url(scan, view.t)
        except UNREADABLE as err:
            raise gr.Error(f"cannot read {Path(path).name}: {err}") from err
        try:
            reply = self.client.ask_volume(url, query)
        except Exception as err:  # the openai client raises many types (connection, status): show them
            raise gr.Error(f"the server at {self.client.settings.base_url} did not answer: {err}") from err
        try:
            return volume_results(scan, view, volume, reply, query, self.downloads.new_answer_folder())
        except ValueError as err:  # a grounding that does not fit the volume
            raise gr.Error(str(err)) from err

    def _results(self, scan: Scan, view: View, picture: Image.Image, reply: Reply, query: str):
        import gradio as gr

        spacing = scan.pixel_spacing(view.axis)
        factors = display_factors(*picture.size, spacing)
        overlay = display_overlay(picture, reply.masks, reply.boxes, factors)
        files = write_downloads(scan, view, reply.masks, self.downloads.new_answer_folder()) if reply.masks else None
        expects_mask = "segment" in query.lower()
        notes = answer_notes(reply.content, reply.masks, expects_mask) + (files.problems if files else [])
        header = (
            f'<p class="answer-source">Answer about {html.escape(scan.describe(view))} to '
            f"“{html.escape(query.strip())}”</p>"
        )
        answer = header + answer_html(reply.content, reply.masks) + notes_html(notes)
        legend = legend_html(measure_masks(reply.masks, spacing), reply.boxes, spacing)
        reasoning = reply.reasoning or "(no reasoning in this answer)"
        viewer = gr.update(value=(enlarge(picture, factors), overlay), label=COMPARE_LABEL)
        return viewer, answer, legend, _file_list(files), reasoning, reply.grounding, PLANES_HIDDEN

    def _picture(self, scan: Scan, view: View) -> Any:
        """The viewer's value for a picture without results: the enlarged picture on both sides."""
        import gradio as gr

        picture = scan.render(view)
        shown = enlarge(picture, display_factors(*picture.size, scan.pixel_spacing(view.axis)))
        return gr.update(value=(shown, shown), label=VIEWER_LABEL)


def _unreadable(message: str) -> tuple[Any, ...]:
    """The viewer emptied and the results cleared, with the reason in the answer's place (and a warning)."""
    import gradio as gr

    gr.Warning(message)
    cleared = list(CLEARED_RESULTS)
    cleared[0] = notes_html([message])
    return (gr.update(value=None, label=VIEWER_LABEL), *cleared)


def _file_list(files: Downloads | None) -> list[str] | None:
    return [str(p) for p in files.files] if files and files.files else None


def _check_question(path: str | None, query: str | None) -> None:
    import gradio as gr

    if not path:
        raise gr.Error("upload an image first")
    if not (query or "").strip():
        raise gr.Error("write a question, or pick a task")


def _skipped() -> tuple[Any, ...]:
    """No change to the viewer or any result (the other question mode's handler answers)."""
    import gradio as gr

    return tuple(gr.skip() for _ in range(1 + len(CLEARED_RESULTS)))
