"""The Gradio page: upload a scan, choose its frame or slice, ask the ``citrus-v deploy`` server, read the answer
with its masks.

Layout and wiring only; what each event does is :mod:`citrus_v.app.handlers`. The viewer is Gradio's
``ImageSlider`` (scroll to zoom, drag to pan, full screen), showing the picture sent next to the same picture with
the masks and boxes drawn; the answer's ``[SEG]`` tokens are chips in their masks' colours, and the legend lists
each mask's measurements. A volume or clip is asked about whole by default ("Ask about the whole volume"): the
file goes to the server as one ``video_url`` part, the answer's masks follow the slider, three orthogonal planes
show them at once, and the legend gives each mask's volume.
"""

from __future__ import annotations

from .client import ApiClient, ApiSettings
from .handlers import DEFAULT_AXIS, VIEWER_LABEL, PageHandlers
from .scan import AXES
from .window_menu import FILE_WINDOW

__all__ = ["TASKS", "ApiSettings", "build_page", "launch"]

TASKS: dict[str, str] = {
    "Question answering": "Is there a lesion in this image? Answer yes or no and say where.",
    "Report": "Write a radiology report for this image, with findings and an impression.",
    "Detection": "Locate the lesion, output its bbox coordinates using JSON format.",
    "Segmentation": "Please segment the lesion.",
    "Document reading": "Read this document and list its fields and their values.",
}
DEFAULT_TASK = "Segmentation"
FILE_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".gz", ".zip", ".mp4", ".mov", ".avi", ".webm", ".mkv"]
WHOLE_LABEL = "Ask about the whole volume (off: the slice or frame shown, as a picture)"
NOTICE = (
    "**Research use only — not for diagnosis.** Answers, masks and measurements come from a machine-learning model "
    "and can be wrong; they are not a medical device's output and must not guide the care of a patient."
)
VIEWER_HEIGHT = 640


def build_page(settings: ApiSettings):
    """Build the Gradio ``Blocks`` (not launched)."""
    import gradio as gr

    handlers = PageHandlers(ApiClient(settings))
    with gr.Blocks(title="Citrus-V", analytics_enabled=False) as page:
        gr.Markdown(
            "## Citrus-V\nUpload a scan (a picture, DICOM, NIfTI, a zip of DICOM slices or a video), choose the frame "
            "or slice, pick a task or write a question, and ask."
        )
        gr.Markdown(NOTICE, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=3):
                viewer = gr.ImageSlider(
                    label=VIEWER_LABEL, type="pil", format="png", interactive=False, height=VIEWER_HEIGHT,
                    max_height=VIEWER_HEIGHT, slider_position=50, elem_id="viewer",
                )  # fmt: skip
                frame = gr.Slider(1, 2, value=1, step=1, label="Frame", visible=False, elem_id="frame")
                with gr.Row():
                    axis = gr.Radio(list(AXES), value=DEFAULT_AXIS, label="Axis", visible=False, elem_id="axis")
                    time = gr.Slider(1, 2, value=1, step=1, label="Time point", visible=False, elem_id="time")
                    window = gr.Dropdown(
                        [FILE_WINDOW], value=FILE_WINDOW, label="Window (CT)", visible=False, elem_id="window"
                    )
                planes = gr.Image(type="pil", format="png", interactive=False, visible=False, elem_id="planes")
            with gr.Column(scale=2):
                upload = gr.File(
                    label="Scan: PNG, JPEG, DICOM, NIfTI, a zip of DICOM slices, or a video", file_types=FILE_TYPES,
                    elem_id="upload",
                )  # fmt: skip
                whole = gr.Checkbox(False, label=WHOLE_LABEL, visible=False, elem_id="whole")
                task = gr.Radio(list(TASKS), value=DEFAULT_TASK, label="Task", elem_id="task")
                query = gr.Textbox(TASKS[DEFAULT_TASK], label="Question", lines=2, elem_id="query")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                answer = gr.HTML(elem_id="answer")
                legend = gr.HTML(elem_id="legend")
                downloads = gr.File(label="Mask files", file_count="multiple", interactive=False, elem_id="downloads")
                with gr.Accordion("Reasoning", open=False, elem_id="reasoning-fold"):
                    reasoning = gr.Markdown(elem_id="reasoning")
                with gr.Accordion("Grounding (the server's JSON)", open=False, elem_id="grounding-fold"):
                    grounding = gr.JSON(label="grounding", elem_id="grounding")
        answer_kept = gr.State(None)  # a whole-volume answer, kept while the slider moves
        results = [answer, legend, downloads, reasoning, grounding, planes, answer_kept]
        view_inputs = [upload, frame, axis, time, window]
        # a question first clears the previous answer, so that no answer is ever shown under another question;
        # then the handler of the question's mode answers (the other returns no change)
        started = ask.click(handlers.view, [*view_inputs, whole], [viewer, *results])
        asking = started.then(handlers.ask, [*view_inputs, query, whole], [viewer, *results])
        asking_volume = started.then(handlers.ask_volume, [*view_inputs, query, whole], [viewer, *results]).success(
            handlers.refresh, [*view_inputs, whole, answer_kept], [viewer, *results]
        )  # the slider may have moved while the server answered
        # a change of the input clears the results at once and cancels a question still being answered; a
        # whole-volume answer stays through the slices, axes and windows of its volume
        upload.change(
            handlers.upload_page, upload, [whole, frame, axis, time, window, viewer, *results],
            cancels=[asking, asking_volume],
        )  # fmt: skip
        whole.input(handlers.view, [*view_inputs, whole], [viewer, *results], cancels=[asking, asking_volume])
        time.change(handlers.view, [*view_inputs, whole], [viewer, *results], cancels=[asking, asking_volume])
        kept_inputs = [*view_inputs, whole, answer_kept]
        axis.change(
            handlers.axis, [upload, axis, time, window, whole, answer_kept], [frame, viewer, *results],
            cancels=[asking],
        )  # fmt: skip
        for control in (frame, window):
            control.change(handlers.view, kept_inputs, [viewer, *results], cancels=[asking])
        task.change(lambda name: TASKS[name], task, query)
    return page


def launch(page, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page; with ``block=False`` return at once (call ``page.close()`` to stop)."""
    return page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, footer_links=[])
