"""Hostile requests against the whole server: many or huge images in one request, image tokens past the context,
and many large requests at once against the server's memory budget (issue 30).

Each case goes through a real server on 127.0.0.1 (uvicorn in a thread, the tiny checkpoint behind a scripted
predictor) and ends with a valid request being answered.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import psutil
import pytest

from citrus_v.serve.admission import MemoryAdmission, ServerBusy
from citrus_v.serve.errors import ApiError
from citrus_v.serve.media import MediaPolicy
from citrus_v.serve.messages import ImageSource
from citrus_v.serve.request_budget import read_header
from citrus_v.serve.server import ServerSettings, create_app

from .conftest import phantom
from .test_serve_support import ScriptedPredictor, data_url, png_bytes, running_server

NAME = "citrus-tiny"
MIB = 1024 * 1024
# the tiny processor's smallest image is 224 x 224 pixels: 64 merged tokens, plus its two vision markers
SMALL_IMAGE_TOKENS = 64 + 2


@pytest.fixture(scope="module")
def predictor(tiny):
    model, processor = tiny
    return ScriptedPredictor(model, processor)


@pytest.fixture(scope="module")
def huge_png() -> str:
    """A 4096 x 4096 PNG (the default per-image limit exactly): a few KB sent, 16.7 M pixels decoded."""
    return data_url(png_bytes(np.zeros((4096, 4096), dtype=np.uint8)))


@pytest.fixture(scope="module")
def large_png() -> str:
    """A 1024 x 1024 PNG: about 50 MB reserved while it is decoded and served (25 MB of it its pixels)."""
    image = np.zeros((1024, 1024), dtype=np.uint8)
    image[350:650, 400:700] = 200
    return data_url(png_bytes(image))


@pytest.fixture(scope="module")
def small_png() -> str:
    return data_url(png_bytes(phantom(1).image))


def _body(images: list[str], text: str = "Please segment the lesion.", **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content = [*parts, {"type": "text", "text": text}]
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **fields}


@contextmanager
def _server(predictor, **settings) -> Iterator[str]:
    app = create_app(predictor, ServerSettings(served_model_name=NAME, **settings))
    with running_server(app) as url:
        yield url


def _post(url: str, body: dict, timeout: float = 120.0) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def _served(url: str, image: str) -> None:
    response = _post(url, _body([image], max_tokens=32))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Sure, the lesion [SEG] and the organ [SEG]."


class _PeakRss:
    """The largest resident memory of this process (server included) seen while the block runs."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.process = psutil.Process()
        self.period_s = period_s
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.period_s)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def jump_mb(self) -> float:
        return (self.peak - self.before) / MIB


def _refused_fast(url: str, body: dict, status: int, code: str) -> tuple[dict, float, float]:
    """Send ``body``; expect ``status``/``code``; return the error, the seconds it took and the RSS jump (MiB)."""
    with _PeakRss() as rss:
        start = time.monotonic()
        response = _post(url, body)
        took = time.monotonic() - start
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "messages", error
    return error, took, rss.jump_mb


def test_thirty_and_ten_4096_pngs_in_one_message_are_refused_before_decoding(predictor, huge_png, small_png):
    # one 4096 x 4096 PNG alone costs about 400 MB to decode and serve: none of these may be decoded
    with _server(predictor) as url:
        error, took, jump = _refused_fast(url, _body([huge_png] * 30), 413, "too_many_images")
        assert "30 images" in error["message"] and "--max_images_per_request" in error["message"]
        assert took < 2.0 and jump < 100, (took, jump)
        error, took, jump = _refused_fast(url, _body([huge_png] * 10), 413, "request_pixels_exceeded")
        assert f"{10 * 4096 * 4096} pixels" in error["message"] and "--max_request_pixels" in error["message"]
        assert took < 2.0 and jump < 100, (took, jump)
        _served(url, small_png)


def test_image_tokens_count_against_the_context(predictor, small_png):
    with _server(predictor, max_images_per_request=1000) as url:
        error, took, _ = _refused_fast(url, _body([small_png] * 300), 400, "context_length_exceeded")
        message = error["message"]
        assert f"{300 * SMALL_IMAGE_TOKENS} image tokens (300 images)" in message, message
        assert "text tokens" in message and "context length of 4096" in message
        assert took < 5.0, took
        # 20 images and a short answer fit in 4096 tokens and are served
        response = _post(url, _body([small_png] * 20, max_tokens=4))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] > 20 * SMALL_IMAGE_TOKENS
    with _server(predictor) as url:  # the default limit refuses 300 images before reading a header
        _refused_fast(url, _body([small_png] * 300), 413, "too_many_images")
        _served(url, small_png)


def test_a_request_over_the_whole_memory_budget_is_413(predictor, large_png, small_png):
    with _server(predictor, max_inflight_memory_bytes=32 * MIB) as url:
        error, took, jump = _refused_fast(url, _body([large_png]), 413, "request_memory_exceeded")
        assert "--max_inflight_memory_mb" in error["message"] and "32 MiB" in error["message"]
        assert jump < 50, jump
        _served(url, small_png)


def _shed_burst(url: str, image: str, clients: int) -> list[httpx.Response]:
    barrier = threading.Barrier(clients)

    def one(_: int) -> httpx.Response:
        barrier.wait()
        return _post(url, _body([image], "slow: Please segment the lesion."))

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(clients)))


def test_concurrent_large_images_are_shed_with_429_and_retry_after(predictor, large_png, small_png):
    # about 50 MB per request against 120 MB: two at a time; the others are told to come back
    with _server(predictor, max_inflight_memory_bytes=120 * MIB) as url:
        responses = _shed_burst(url, large_png, 32)
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
        shed = [r for r in responses if r.status_code == 429]
        for response in shed:
            error = response.json()["error"]
            assert error["code"] == "server_busy" and "retry after" in error["message"], error
            assert response.headers["Retry-After"].isdigit() and int(response.headers["Retry-After"]) >= 1
        time.sleep(int(shed[0].headers["Retry-After"]))
        # every reservation was given back: the budget holds two again, one after the other
        for _ in range(3):
            response = _post(url, _body([large_png]))
            assert response.status_code == 200, response.text
        _served(url, small_png)


def _first_429_then_200(url: str, image: str, attempts: int = 100) -> httpx.Response:
    """Post until the answer is not a 429 (the memory held by a request that ended is given back)."""
    for _ in range(attempts):
        response = _post(url, _body([image]))
        if response.status_code != 429:
            return response
        time.sleep(0.1)
    return response


def test_a_refused_decode_a_stream_and_a_client_that_leaves_give_their_memory_back(predictor, large_png, small_png):
    # a budget that holds one large request at a time: a reservation not given back would refuse the next one
    truncated = png_bytes(np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8))
    broken = data_url(truncated[: len(truncated) // 2])  # the header reads; the pixels do not decode
    with _server(predictor, max_inflight_memory_bytes=80 * MIB) as url:
        response = _post(url, _body([broken]))
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image", response.text
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=_body([large_png], stream=True)) as stream:
            assert stream.status_code == 200
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        slow = _body([large_png], "slow", stream=True, max_tokens=400)  # 20 s unless it is cancelled
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=slow, timeout=60) as stream:
            next(stream.iter_lines())  # the first event: the request is admitted and generating
            busy = _post(url, _body([large_png]))
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy", busy.text
        started = time.monotonic()  # the client has left: the generation stops at its next step
        assert _first_429_then_200(url, large_png).status_code == 200
        assert time.monotonic() - started < 10
        _served(url, small_png)


def _deflated_dicom_url(pixel_bytes: int, rows: int = 4096, columns: int = 4096) -> str:
    """A Deflated Explicit VR Little Endian DICOM data URL whose data set inflates to about ``pixel_bytes``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    header = Dataset()
    header.file_meta = meta
    header.Rows, header.Columns, header.SamplesPerPixel, header.BitsAllocated = rows, columns, 1, 16
    header.NumberOfFrames = max(1, pixel_bytes // (rows * columns * 2))
    header.PhotometricInterpretation = "MONOCHROME2"
    buffer = DicomBytesIO()
    dcmwrite(buffer, header, enforce_file_format=True)
    written = buffer.getvalue()
    # inflate the written data set, append a huge zero Pixel Data element, deflate it all again
    start = written.index(b"DICM") + 4 + 12 + int.from_bytes(written[140:144], "little")
    body = zlib.decompress(written[start:], -zlib.MAX_WBITS)
    element = b"\xe0\x7f\x10\x00OW\x00\x00" + int(pixel_bytes).to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(body + element)]
    chunk = bytes(MIB)
    for _ in range(pixel_bytes // MIB):
        parts.append(deflater.compress(chunk))
    parts.append(deflater.flush())
    return data_url(written[:start] + b"".join(parts), "application/dicom")


def test_a_deflated_dicom_header_is_read_without_inflating_its_pixels():
    url = _deflated_dicom_url(256 * MIB)
    tracemalloc.start()
    try:
        header = read_header(ImageSource(url, "messages.0.content.0.image_url.url"), MediaPolicy())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header is not None and (header.width, header.height) == (4096, 4096)
    assert peak < len(url) + 16 * MIB, peak  # the data URL's own bytes, not the 256 MiB it inflates to


def test_memory_admission_sheds_refuses_and_releases_once():
    admission = MemoryAdmission(100)
    first = admission.reserve(60, holders=2)
    with pytest.raises(ServerBusy) as busy:
        admission.reserve(50)
    assert busy.value.status == 429 and busy.value.headers["Retry-After"].isdigit()
    with pytest.raises(ApiError) as alone:
        admission.reserve(101)
    assert alone.value.status == 413 and alone.value.code == "request_memory_exceeded"
    first.done_one()
    assert admission.reserved == 60  # one of its two jobs is still running
    first.done_one()
    first.release()  # a late explicit release changes nothing
    assert admission.reserved == 0 and admission.shed == 1
    holder = type("Images", (), {})()
    admission.reserve(100).release_with(holder)
    del holder  # freed without an explicit release: the finaliser gives the bytes back
    assert admission.reserved == 0
