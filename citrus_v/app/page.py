"""The Gradio page: upload a scan, pick a task, ask the ``citrus-v deploy`` server, see boxes and masks.

The page reads PNG/JPEG, DICOM and NIfTI files through :mod:`citrus_v.media` (a slice slider for
volumes, a window preset for CT), sends the 2-D picture it shows as a PNG ``data:`` URL through the official
``openai`` client, and draws the answer's ``grounding`` (masks decoded from COCO RLE, boxes) with
:func:`citrus_v.infer.overlay.draw_overlay`. The reasoning (``<think>``) is folded away under the answer.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from ..infer.results import Box, MaskResult, Prediction

TASKS: dict[str, str] = {
    "Question answering": "Is there a lesion in this image? Answer yes or no and say where.",
    "Report": "Write a radiology report for this image, with findings and an impression.",
    "Detection": "Locate the lesion, output its bbox coordinates using JSON format.",
    "Segmentation": "Please segment the lesion.",
    "Document reading": "Read this document and list its fields and their values.",
}
DEFAULT_TASK = "Segmentation"
FILE_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".gz"]
FILE_WINDOW = "file"


@dataclass
class ApiSettings:
    """Where the server is: its ``/v1`` URL, its API key and the model name (default: its first model)."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    timeout: float = 300.0


@dataclass
class Answer:
    """What the page shows for one question."""

    text: str
    reasoning: str | None
    overlay: Image.Image
    grounding: dict[str, Any] | None = field(default=None)


class ApiClient:
    """Asks the server through the official ``openai`` client."""

    def __init__(self, settings: ApiSettings) -> None:
        import openai

        self.settings = settings
        self.client = openai.OpenAI(
            base_url=settings.base_url, api_key=settings.api_key or "none", timeout=settings.timeout, max_retries=0
        )
        self._model = settings.model

    @property
    def model(self) -> str:
        if self._model is None:
            models = self.client.models.list().data
            if not models:
                raise RuntimeError(f"the server at {self.settings.base_url} lists no model")
            self._model = models[0].id
        return self._model

    def ask(self, image: Image.Image, query: str) -> Answer:
        """Send ``image`` and ``query``; return the answer with boxes and masks drawn on ``image``."""
        from ..infer.overlay import draw_overlay
        from ..media import rle_to_mask

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": query}],
                }
            ],
        )
        message = reply.choices[0].message
        extra = message.model_extra or {}
        grounding = extra.get("grounding") or {}
        masks = [
            MaskResult(mask=rle_to_mask(m["segmentation"]), score=m["score"], label=m.get("label"), index=m["index"])
            for m in grounding.get("masks", [])
        ]
        boxes = [Box(*b["bbox_2d"], label=b.get("label")) for b in grounding.get("boxes", [])]
        parsed = Prediction(text=message.content or "")
        reasoning = extra.get("reasoning_content") or parsed.think
        return Answer(parsed.answer, reasoning, draw_overlay(image, masks, boxes), grounding or None)


# --- reading uploads ---------------------------------------------------------------------------------------
def file_kind(path: str | Path) -> str:
    """``nifti``, ``dicom`` or ``raster``."""
    from ..media import parse_ref

    return parse_ref(str(path)).kind


@lru_cache(maxsize=4)
def _volume(path: str, mtime: float):
    from ..media import read_nifti

    return read_nifti(path)


def num_slices(path: str | Path) -> int:
    """Slices along the axial axis of a NIfTI volume."""
    return _volume(str(path), os.path.getmtime(path)).num_slices(2)


def render(path: str | Path, slice_index: int | None = None, window: str | None = None) -> Image.Image:
    """The 2-D picture of an upload: the image itself, a DICOM frame, or one axial NIfTI slice."""
    from ..media import MediaRef, apply_window, full_range_window, parse_window, read_image

    chosen = None if window in (None, "", FILE_WINDOW) else window
    kind = file_kind(path)
    if kind == "nifti":
        volume = _volume(str(path), os.path.getmtime(path))
        index = volume.num_slices(2) // 2 if slice_index is None else int(slice_index)
        plane = volume.slice(index, 2)
        # one window for the whole volume, so that slices of a series look alike
        pixels = apply_window(plane, parse_window(chosen) or full_range_window(volume.data))
        return Image.fromarray(pixels).convert("RGB")
    return read_image(MediaRef(Path(path), window=chosen))


# --- the page ------------------------------------------------------------------------------------------------
def build_page(settings: ApiSettings):
    """Build the Gradio ``Blocks`` (not launched)."""
    import gradio as gr

    from ..media import WINDOW_PRESETS, MedicalImageError

    client = ApiClient(settings)
    windows = [FILE_WINDOW, *WINDOW_PRESETS]

    def on_upload(path: str | None):
        if not path:
            return gr.update(visible=False), gr.update(visible=False), None
        try:
            kind = file_kind(path)
            picture = render(path)
            count = num_slices(path) if kind == "nifti" else 0
        except (MedicalImageError, OSError, ValueError) as err:
            raise gr.Error(f"cannot read {Path(path).name}: {err}") from err
        slider = gr.update(visible=count > 1, minimum=0, maximum=max(count - 1, 1), value=count // 2, step=1)
        window = gr.update(visible=kind in ("nifti", "dicom"), value=FILE_WINDOW)
        return slider, window, picture

    def on_view(path: str | None, slice_index: float, window: str):
        if not path:
            return None
        index = int(slice_index) if file_kind(path) == "nifti" else None
        try:
            return render(path, index, window)
        except (MedicalImageError, OSError, ValueError) as err:
            raise gr.Error(f"cannot show {Path(path).name}: {err}") from err

    def on_ask(path: str | None, slice_index: float, window: str, query: str):
        if not path:
            raise gr.Error("upload an image first")
        if not query.strip():
            raise gr.Error("write a question, or pick a task")
        picture = on_view(path, slice_index, window)
        try:
            answer = client.ask(picture, query)
        except Exception as err:  # the openai client raises many types (connection, status): show them
            raise gr.Error(f"the server at {settings.base_url} did not answer: {err}") from err
        return answer.text, answer.reasoning or "(no reasoning in this answer)", answer.overlay, answer.grounding

    with gr.Blocks(title="Citrus-V") as page:
        gr.Markdown("## Citrus-V\nUpload a scan, pick a task or write a question, and ask.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Scan: PNG, JPEG, DICOM or NIfTI", file_types=FILE_TYPES, elem_id="upload")
                slice_slider = gr.Slider(0, 1, value=0, step=1, label="Slice", visible=False, elem_id="slice")
                window = gr.Dropdown(windows, value=FILE_WINDOW, label="Window (CT)", visible=False, elem_id="window")
                preview = gr.Image(type="pil", label="Image sent", interactive=False, height=360, elem_id="preview")
            with gr.Column():
                task = gr.Radio(list(TASKS), value=DEFAULT_TASK, label="Task", elem_id="task")
                query = gr.Textbox(TASKS[DEFAULT_TASK], label="Question", lines=2, elem_id="query")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                answer = gr.Markdown(elem_id="answer")
                with gr.Accordion("Reasoning", open=False, elem_id="reasoning-fold"):
                    reasoning = gr.Markdown(elem_id="reasoning")
                overlay = gr.Image(
                    type="pil", label="Boxes and masks", interactive=False, height=420, elem_id="overlay"
                )
                grounding = gr.JSON(label="grounding", elem_id="grounding")
        upload.change(on_upload, upload, [slice_slider, window, preview])
        slice_slider.change(on_view, [upload, slice_slider, window], preview)
        window.change(on_view, [upload, slice_slider, window], preview)
        task.change(lambda name: TASKS[name], task, query)
        ask.click(on_ask, [upload, slice_slider, window, query], [answer, reasoning, overlay, grounding])
    return page


def launch(page, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; with ``block=False`` return at once (call ``page.close()`` to stop)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, footer_links=[])
