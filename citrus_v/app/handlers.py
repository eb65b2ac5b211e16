"""What the page does on each event: a new upload, a new view (frame, slice, axis, time point, window), a question.

Every change of the input returns the results cleared (answer, legend, downloads, reasoning, grounding), also
when the new file cannot be read, so that no answer is ever shown next to another picture than the one it was
given; the page also cancels a question still in flight when the input changes, and clears the previous answer
before it sends a new question.
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
from .window_menu import FILE_WINDOW, window_choices

DEFAULT_AXIS = "axial"
CLEARED_RESULTS: tuple[Any, ...] = ("", "", None, "", None)  # answer, legend, downloads, reasoning, grounding
VIEWER_LABEL = "Image sent (scroll to zoom, drag to pan)"
COMPARE_LABEL = "Left: image sent · right: masks and boxes (drag the handle to compare; scroll to zoom, drag to pan)"
UNREADABLE = (MedicalImageError, OSError, ValueError)


def make_view(frame: float | None, axis_name: str | None, t: float | None, window: str | None) -> View:
    """The view the controls name (sliders are 1-based, views 0-based)."""
    return View(
        index=max(int(frame or 1) - 1, 0),
        axis=AXES.get(axis_name or DEFAULT_AXIS, 2),
        t=max(int(t or 1) - 1, 0),
        window=window or FILE_WINDOW,
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
            view = scan.default_view(AXES[DEFAULT_AXIS])
            picture = self._picture(scan, view)
        except UNREADABLE as err:
            return (hidden, hidden, hidden, hidden, *_unreadable(f"cannot read {Path(path).name}: {err}"))
        count = scan.frame_count(view.axis)
        frame = gr.update(
            visible=count > 1, minimum=1, maximum=max(count, 2), value=view.index + 1, step=1,
            label="Slice" if scan.kind == "nifti" else "Frame",
        )  # fmt: skip
        axis = gr.update(visible=scan.kind == "nifti", value=DEFAULT_AXIS)
        time = gr.update(visible=scan.time_points > 1, minimum=1, maximum=max(scan.time_points, 2), value=1, step=1)
        choices = window_choices(scan.ct)
        window = gr.update(visible=bool(choices), choices=choices or [FILE_WINDOW], value=FILE_WINDOW)
        return (frame, axis, time, window, picture, *CLEARED_RESULTS)

    def axis(self, path: str | None, axis_name: str, t: float, window: str) -> tuple[Any, ...]:
        """A new NIfTI axis: the slice slider's range, the middle slice of that axis."""
        import gradio as gr

        if not path:
            return (gr.update(), None, *CLEARED_RESULTS)
        try:
            scan = open_scan(path)
            view = make_view(None, axis_name, t, window)
            view = View(scan.frame_count(view.axis) // 2, view.axis, view.t, view.window)
            picture = self._picture(scan, view)
        except UNREADABLE as err:
            return (gr.update(), *_unreadable(f"cannot show {Path(path).name}: {err}"))
        count = scan.frame_count(view.axis)
        frame = gr.update(visible=count > 1, maximum=max(count, 2), value=view.index + 1)
        return (frame, picture, *CLEARED_RESULTS)

    def view(self, path: str | None, frame: float, axis_name: str, t: float, window: str) -> tuple[Any, ...]:
        """A new frame, slice, time point or window (or a new question on the way): the picture alone."""
        if not path:
            return (None, *CLEARED_RESULTS)
        try:
            return (self._picture(open_scan(path), make_view(frame, axis_name, t, window)), *CLEARED_RESULTS)
        except UNREADABLE as err:
            return _unreadable(f"cannot show {Path(path).name}: {err}")

    # --- a question ----------------------------------------------------------------------------------------------
    def ask(self, path: str | None, frame: float, axis_name: str, t: float, window: str, query: str):
        """Send the picture of the chosen view; return the compared pictures and every result."""
        import gradio as gr

        if not path:
            raise gr.Error("upload an image first")
        if not (query or "").strip():
            raise gr.Error("write a question, or pick a task")
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
        return self._results(scan, view, picture, reply, query)

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
        return viewer, answer, legend, _file_list(files), reasoning, reply.grounding

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
