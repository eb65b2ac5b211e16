"""The server takes volumes and clips (`video_url` and ms-swift `video` parts) and answers with a mask per [SEG]
on every frame: NIfTI, a zip or folder of DICOM slices, an mp4 clip; limits from the headers (413 before
decoding), video tokens against the context, `FPS_MAX_FRAMES`/`VIDEO_MAX_PIXELS` taking effect in `citrus-v
deploy`.

The tiny model's masks are random: SAM 2's object score is set by a hook where a test needs the target found
(or not), and the tests check structure, geometry and the measures' arithmetic, not quality.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from pycocotools import mask as mask_utils

from citrus_v.media import probe_volume, read_volume
from citrus_v.media.frame_sampling import VideoSampling
from citrus_v.processing import CitrusVProcessor
from citrus_v.serve.request_budget import count_tokens
from citrus_v.serve.server import ServerSettings, create_app
from citrus_v.serve.video_budget import video_tokens

from .test_serve_support import ScriptedPredictor, data_url, deployed_server, free_port, running_server

openai = pytest.importorskip("openai")
nib = pytest.importorskip("nibabel")
av = pytest.importorskip("av")
pytest.importorskip("pydicom")

from .forcing import ObjectScores  # noqa: E402
from .test_volume_outputs import ct_series  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NAME = "citrus-tiny"
ANATOMICAL = os.path.join(NIBABEL_DATA, "anatomical.nii")  # 25 axial frames of 41 x 33, 2 mm voxels
SMALL_FRAMES = {"fps_max_frames": 8, "video_min_pixels": 4 * 784, "video_max_pixels": 64 * 784}
MAX_VIDEO_FRAMES = 200
CLIP_FRAMES, CLIP_SIZE = 6, (48, 64)  # frames, (height, width)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def _ask(part: dict, text: str = "Please segment the brain.") -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def _nifti_url(path: str = ANATOMICAL) -> str:
    return data_url(Path(path).read_bytes(), "application/octet-stream")


def _clip_bytes() -> bytes:
    """A short mp4 written with PyAV: a bright square moving right on black."""
    buffer = io.BytesIO()
    height, width = CLIP_SIZE
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(CLIP_FRAMES):
            image = np.zeros((height, width, 3), np.uint8)
            image[16:32, 4 * k : 4 * k + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def _zip_of(paths: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in paths:
            archive.write(path, path.name)
    return buffer.getvalue()


def _oversized_nifti(frames: int) -> bytes:
    """A NIfTI header claiming ``frames`` axial slices of 64 x 64, followed by no voxels at all: decoding it would
    fail, so a refusal for its size can only come from the header."""
    image = nib.Nifti1Image(np.zeros((64, 64, 1), np.int16), np.eye(4))
    image.header.set_data_shape((64, 64, frames))
    return image.header.binaryblock + b"\0" * 4  # the header and its empty extension flag


def _grounding(reply) -> dict:
    return reply.choices[0].message.model_extra["grounding"]


def _stack(grounding: dict, index: int = 0) -> np.ndarray:
    """The ``[frames, height, width]`` stack of one volume mask, rebuilt from its frames' RLE."""
    size = grounding["video_size"]
    stack = np.zeros((size["frames"], size["height"], size["width"]), dtype=bool)
    for item in grounding["volume_masks"][index]["frames"]:
        rle = {"size": item["rle"]["size"], "counts": item["rle"]["counts"].encode()}
        stack[item["frame"]] = mask_utils.decode(rle).astype(bool)
    return stack


@pytest.fixture(scope="module")
def predictor(tiny_dir) -> ScriptedPredictor:
    """The tiny model with its own processor, showing the language model a few small frames per video."""
    from citrus_v.modeling import CitrusV

    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    processor.set_video_sampling(**SMALL_FRAMES)
    return ScriptedPredictor(CitrusV.from_pretrained(tiny_dir).eval(), processor)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("volumes")
    allowed = root / "allowed"
    ct_series(allowed / "series")
    shutil.copy(ANATOMICAL, allowed / "brain.nii")
    leaky = allowed / "leaky"
    ct_series(leaky)
    ct_series(root / "outside")
    (leaky / "stolen.dcm").symlink_to(next((root / "outside").iterdir()))
    return root


@pytest.fixture(scope="module")
def server(predictor, media_dir):
    settings = ServerSettings(
        served_model_name=NAME,
        allowed_local_media_path=media_dir / "allowed",
        max_wait_ms=1,
        max_video_frames=MAX_VIDEO_FRAMES,
    )
    app = create_app(predictor, settings)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0, timeout=60)


def _post(server, messages: list[dict], **fields) -> httpx.Response:
    body = {"model": NAME, "messages": messages, **fields}
    return httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60)


# --------------------------------------------------------------------------------------------------- answers
def test_a_nifti_volume_as_a_data_url_gets_a_mask_on_its_frames(client, predictor):
    with ObjectScores(predictor.model, 5.0):
        reply = client.chat.completions.create(model=NAME, messages=_ask(_video_part(_nifti_url())))
    message = reply.choices[0].message
    assert "[SEG]" in message.content
    grounding = _grounding(reply)
    volume = read_volume(ANATOMICAL)
    assert grounding["image_size"] is None and grounding["masks"] == [] and grounding["video_index"] == 0
    assert grounding["video_size"] == {"frames": 25, "height": 41, "width": 33} == dict(
        zip(("frames", "height", "width"), volume.values.shape, strict=True)
    )
    masks = grounding["volume_masks"]
    assert len(masks) == message.content.count("[SEG]") == 2 and [m["index"] for m in masks] == [0, 1]
    assert [m["label"] for m in masks] == ["lesion", "organ"]
    for k, mask in enumerate(masks):
        assert mask["present"] is True and mask["score"] == pytest.approx(5.0) and mask["mode"] == "per_frame"
        frames = [item["frame"] for item in mask["frames"]]
        assert frames and frames == sorted(set(frames)) and all(0 <= f < 25 for f in frames)
        assert all(item["rle"]["size"] == [41, 33] for item in mask["frames"])
        stack = _stack(grounding, k)
        assert [int(stack[f].sum()) for f in frames] == [item["area"] for item in mask["frames"]]
        assert all(stack[f].any() for f in frames) and not stack[[f for f in range(25) if f not in frames]].any()
        # the measures are the stack's: 2 mm voxels are 0.008 mL each
        assert mask["voxels"] == int(stack.sum()) and mask["spacing"] == [2.0, 2.0, 2.0]
        assert mask["volume_ml"] == pytest.approx(stack.sum() * 0.008, rel=1e-5)
        bbox = mask["bbox3d"]
        assert bbox["frames"] == [frames[0], frames[-1] + 1] and 0 <= mask["key_frame"] < 25
        rows, columns = np.nonzero(stack.any(axis=0))
        assert bbox["rows"] == [rows.min(), rows.max() + 1] and bbox["columns"] == [columns.min(), columns.max() + 1]
    assert reply.model_extra["raw_response"]["seg_masks_rle"] == []  # 2-D masks only, as upstream's clients read


def test_streaming_brings_the_volume_masks_in_the_last_content_chunk(client, predictor):
    messages = _ask(_video_part(_nifti_url()))
    with ObjectScores(predictor.model, 5.0):
        whole = _grounding(client.chat.completions.create(model=NAME, messages=messages))
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True))
    extras = [(c.choices[0].delta.model_extra or {}) if c.choices else {} for c in chunks]
    carrying = [k for k, extra in enumerate(extras) if extra.get("grounding")]
    assert len(carrying) == 1 and not any(c.choices and c.choices[0].delta.content for c in chunks[carrying[0] + 1 :])
    streamed = chunks[carrying[0]].choices[0].delta.model_extra["grounding"]
    assert streamed["volume_masks"] == whole["volume_masks"] and streamed["video_size"] == whole["video_size"]


def test_an_absent_target_has_no_frames_and_an_answer_without_seg_no_masks(client, predictor):
    with ObjectScores(predictor.model, -5.0):
        absent = _grounding(client.chat.completions.create(model=NAME, messages=_ask(_video_part(_nifti_url()))))
    assert [m["present"] for m in absent["volume_masks"]] == [False, False]
    assert all(m["frames"] == [] and m["voxels"] == 0 and m["bbox3d"] is None for m in absent["volume_masks"])
    plain = client.chat.completions.create(model=NAME, messages=_ask(_video_part(_nifti_url()), "Describe it."))
    assert "[SEG]" not in plain.choices[0].message.content
    grounding = _grounding(plain)
    assert grounding["volume_masks"] == [] and grounding["video_size"]["frames"] == 25


def test_a_clip_as_an_ms_swift_video_part_gets_frames_and_no_volume(client, predictor):
    part = {"type": "video", "video": _b64(_clip_bytes())}  # bare base64, as ms-swift's clients may send
    with ObjectScores(predictor.model, 5.0):
        grounding = _grounding(client.chat.completions.create(model=NAME, messages=_ask(part, "Segment the square.")))
    assert grounding["video_size"] == {"frames": CLIP_FRAMES, "height": CLIP_SIZE[0], "width": CLIP_SIZE[1]}
    for mask in grounding["volume_masks"]:
        assert mask["frames"] and all(0 <= item["frame"] < CLIP_FRAMES for item in mask["frames"])
        assert all(item["rle"]["size"] == list(CLIP_SIZE) for item in mask["frames"])
        assert mask["volume_ml"] is None and mask["bbox3d"]["size_mm"] is None  # a clip's frames are moments


def test_a_zip_of_dicom_slices_and_the_same_series_as_a_local_folder_get_volumes(client, predictor, media_dir):
    paths = sorted((media_dir / "allowed" / "series").iterdir())
    zipped = _video_part(data_url(_zip_of(paths), "application/zip"))
    folder = {"type": "video", "video": {"url": str(media_dir / "allowed" / "series")}}
    with ObjectScores(predictor.model, 5.0):
        sent = _grounding(client.chat.completions.create(model=NAME, messages=_ask(zipped, "Segment the lesion.")))
        local = _grounding(client.chat.completions.create(model=NAME, messages=_ask(folder, "Segment the lesion.")))
    assert sent["video_size"] == {"frames": 5, "height": 128, "width": 128}
    mask = sent["volume_masks"][0]
    assert mask["spacing"][0] == pytest.approx(5.0) and mask["volume_ml"] is not None
    voxel_ml = float(np.prod(mask["spacing"])) / 1000
    assert mask["volume_ml"] == pytest.approx(mask["voxels"] * voxel_ml, rel=1e-5) and mask["volume_ml"] > 0
    assert local["volume_masks"] == sent["volume_masks"]  # the folder's files, each opened safely, are the zip


@pytest.mark.parametrize(
    "name,mime,shape",
    [("emri_small.dcm", "application/dicom", (10, 64, 64)), ("standard.nii.gz", "application/gzip", (7, 5, 4))],
    ids=["multi-frame DICOM", "gzipped NIfTI"],
)
def test_other_sources_as_data_urls_are_read_by_their_content(client, name, mime, shape):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name) if name.endswith(".dcm") else os.path.join(NIBABEL_DATA, name)
    part = _video_part(data_url(Path(path).read_bytes(), mime))
    grounding = _grounding(client.chat.completions.create(model=NAME, messages=_ask(part, "Describe it.")))
    assert grounding["video_size"] == dict(zip(("frames", "height", "width"), shape, strict=True))


def test_a_volume_over_the_segmented_frames_names_source_frames_and_says_so(predictor):
    sampled = ScriptedPredictor(predictor.model, predictor.processor, max_frames=10)
    with ObjectScores(predictor.model, 5.0), running_server(create_app(sampled, ServerSettings(NAME))) as url:
        body = _post((url,), _ask(_video_part(_nifti_url()))).json()
    grounding = body["choices"][0]["message"]["grounding"]
    notes = grounding["notes"]
    assert grounding["video_size"]["frames"] == 25 and "SAM 2 segmented 10 evenly spaced frames of 25" in notes[0]
    segmented = {int(k) for k in np.linspace(0, 24, 10).round()}
    mask = grounding["volume_masks"][0]
    assert {item["frame"] for item in mask["frames"]} == segmented and mask["key_frame"] in segmented
    assert mask["volume_ml"] is None  # slices skipped between the segmented ones: no volume to measure


# --------------------------------------------------------------------------------------------------- refusals
def test_an_oversized_volume_is_refused_from_its_header_then_the_server_serves(server, client):
    app = server[1]
    for frames, packed in ((MAX_VIDEO_FRAMES + 1, bytes), (30_000, gzip.compress)):
        answer = _post(server, _ask(_video_part(data_url(packed(_oversized_nifti(frames)), "application/gzip"))))
        assert answer.status_code == 413, answer.text
        error = answer.json()["error"]
        assert error["code"] == "video_too_large" and "--max_video_frames" in error["message"]
        assert f"hold {frames} frames" in error["message"]
        assert error["param"] == "messages.0.content.0.video_url.url"
    assert app.state.chat.admission.reserved == 0  # nothing held for the refused requests
    reply = client.chat.completions.create(model=NAME, messages=_ask(_video_part(_nifti_url()), "Describe it."))
    assert reply.choices[0].message.content


def test_the_voxel_limit_and_the_memory_budget_refuse_before_decoding(predictor):
    settings = ServerSettings(served_model_name=NAME, max_video_voxels=64 * 64 * 100)
    small = ServerSettings(served_model_name=NAME, max_inflight_memory_bytes=64 * 1024 * 1024)
    big = _ask(_video_part(data_url(_oversized_nifti(101))))  # 64 x 64 x 101: over the voxel limit
    huge = _ask(_video_part(data_url(_oversized_nifti(1000))))  # 4 M voxels: within it, but not the budget
    with running_server(create_app(predictor, settings)) as url:
        voxels = _post((url,), big)
    with running_server(create_app(predictor, small)) as url:
        memory = _post((url,), huge)
        served = _post((url,), _ask(_video_part(_nifti_url()), "Describe it."))
    error = voxels.json()["error"]
    assert voxels.status_code == 413 and error["code"] == "video_too_large"
    assert "--max_video_voxels" in error["message"] and "413696 voxels" in error["message"]
    assert memory.status_code == 413 and memory.json()["error"]["code"] == "request_memory_exceeded"
    assert served.status_code == 200


@pytest.mark.parametrize(
    "part,status,code",
    [
        (_video_part("data:application/zip;base64," + _b64(b"PK\x03\x04 not a zip at all")), 400, "invalid_video"),
        (_video_part("data:video/mp4;base64," + _b64(os.urandom(2048))), 400, "invalid_video"),
        (_video_part("https://example.org/ct.nii.gz"), 400, "remote_media_not_allowed"),
        ({"type": "video", "video": "leaky"}, 400, "local_media_not_allowed"),
        ({"type": "video", "video": "../outside"}, 400, "local_media_not_allowed"),
        ({"type": "video", "video": "missing.nii.gz"}, 400, "image_not_found"),
        ({"type": "text", "text": "<video>"}, 400, "invalid_message"),
    ],
    ids=["broken zip", "random bytes", "remote", "link out of the folder", "folder outside", "missing", "typed tag"],
)
def test_bad_videos_are_4xx_with_an_error_body_and_the_server_keeps_serving(server, part, status, code):
    answer = _post(server, _ask(part))
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert _post(server, _ask({"type": "video", "video": "brain.nii"}, "Describe it.")).status_code == 200


def test_video_tokens_count_against_the_context(server, predictor):
    messages = _ask(_video_part(_nifti_url()), "Describe it.")
    prompt = _post(server, messages, max_tokens=1).json()["usage"]["prompt_tokens"]
    pads = video_tokens(predictor.processor, probe_volume(ANATOMICAL))
    assert pads > 0
    context = predictor.model.config.text_config.max_position_embeddings
    over = _post(server, messages, max_tokens=context - prompt + 1)
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    assert f"{pads + 2} video tokens (1 videos)" in over.json()["error"]["message"]
    assert _post(server, messages, max_tokens=context - prompt).status_code == 200


# --------------------------------------------------------------------------------------------------- deploy
def test_the_upstream_deploy_line_with_video_settings_serves_a_volume(tiny_dir):
    env = {"FPS_MAX_FRAMES": "12", "VIDEO_MAX_PIXELS": "50176", "MAX_PIXELS": "65535"}
    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    seg = str(processor.tokenizer.convert_tokens_to_ids("[SEG]"))
    port = free_port()
    with deployed_server(tiny_dir, port, ("--served_model_name", NAME, "--infer_backend", "pt"), env=env) as (_, log):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model=NAME,
            messages=_ask(_video_part(_nifti_url())),
            max_tokens=1,
            extra_body={"logit_bias": {seg: 100}},
        )
        log.seek(0)
        said = log.read()
    assert reply.choices[0].message.content == "[SEG]"
    grounding = _grounding(reply)
    assert grounding["video_size"]["frames"] == 25 and len(grounding["volume_masks"]) == 1
    # the language model saw 12 frames of at most 50176 pixels: the prompt holds exactly their tokens
    question = [{"role": "user", "content": "<video>Please segment the brain."}]
    expected = {}
    for name, sampling in (("deploy line", {"fps_max_frames": 12, "video_max_pixels": 50176}), ("default", {})):
        processor.video_sampling = VideoSampling(**sampling)
        pads = video_tokens(processor, probe_volume(ANATOMICAL))
        expected[name] = count_tokens(processor, question, None, [], [pads]).total
    assert reply.usage.prompt_tokens == expected["deploy line"] != expected["default"]
    assert "FPS_MAX_FRAMES=12: the most frames of a clip, or slices of a volume" in said and "(in effect: 12)" in said
    assert "VIDEO_MAX_PIXELS=50176: the most pixels a frame" in said and "(in effect: 50176)" in said
    assert "accepted, not used" not in said.split("MAX_RATIO")[0]
    assert json.dumps(grounding)  # plain JSON


def test_a_data_url_carries_the_reference_options_and_refuses_unknown_ones(client, predictor, server):
    """``data:...;axis=0;window=40,400;base64,`` reads the volume as ``brain.nii#axis=0&window=40,400`` would."""
    url = _nifti_url()
    plain = "application/octet-stream;base64,"
    with_options = url.replace(plain, "application/octet-stream;axis=0;window=40%2C400;base64,")
    with ObjectScores(predictor.model, 5.0):
        reply = client.chat.completions.create(model=NAME, messages=_ask(_video_part(with_options)))
    sagittal = read_volume(ANATOMICAL + "#axis=0")
    size = _grounding(reply)["video_size"]
    assert (size["frames"], size["height"], size["width"]) == sagittal.values.shape
    assert sagittal.values.shape != read_volume(ANATOMICAL).values.shape  # the option changed what was read
    unknown = url.replace(plain, "application/octet-stream;slice=3;base64,")
    response = _post(server, _ask(_video_part(unknown)))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image_url"
    assert "slice" in response.json()["error"]["message"]


def test_the_budgets_frame_counts_are_the_segmenters_own():
    # repeated in request_budget so that the flag parser does not load torch: kept equal here
    from citrus_v.infer.mask_frames import DEFAULT_MAX_FRAMES
    from citrus_v.infer.volume_segmentation import FRAMES_PER_CHUNK
    from citrus_v.serve.request_budget import SAM_FRAMES_PER_CHUNK, SAM_MAX_FRAMES

    assert (SAM_FRAMES_PER_CHUNK, SAM_MAX_FRAMES) == (FRAMES_PER_CHUNK, DEFAULT_MAX_FRAMES)
