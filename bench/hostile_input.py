"""Hostile-input bench: every class of oversized or malformed input against ``citrus-v deploy``, memory watched.

The server runs as a real subprocess (``citrus-v deploy --model tiny-base`` unless ``--model``) on loopback,
started through the tests' ``deployed_server``. Its resident memory (VmRSS in ``/proc/<pid>/status``, its
children included) is polled every ``--poll_ms`` while each case runs. Each case sends one kind of hostile
input, as small on the wire as an attacker would make it: decompression bombs (a deflated DICOM, gzip NIfTI
volumes, 4096² PNGs), containers that declare far more than they hold, hundreds of images in one message,
malformed text, paths and affines, an invalid JSON body, a body that stops half-way, 32 clients at once, and
``--api_key ""`` at start-up. Reported per case: the HTTP status and error code, the time to answer, the
server's peak RSS during the case minus its RSS before, what it kept afterwards, the budget, and whether a
valid small request still gets 200 afterwards.

A case FAILs when the server answers 5xx, dies, does not answer, answers outside what the case allows (a
refusal where the issue demands one; an error without an OpenAI-style body and code), exceeds the budget
(``--budget_mb``, passed to the server as ``--max_inflight_memory_mb`` when its ``--help`` lists it), or a
valid request fails afterwards. The server cannot take the machine down: its address space is limited
(RLIMIT_AS) and the watcher kills it past ``--server_cap_mb``. A server that died, or that a case left holding
more than ``--restart_above_mb``, is restarted for the next case, so each case starts from a server in its
usual state.

    .venv/bin/python bench/hostile_input.py [--cases a,b,...] [--budget_mb 1024] [--port 0] [--model tiny-base]
        [--json FILE]
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
MAX_TOKENS = 4
MESSAGE_CHARS = 160  # of each error message, in the report's notes
# the server's memory budget for requests in flight; passed --budget_mb when `citrus-v deploy --help` lists it
BUDGET_FLAG = "--max_inflight_memory_mb"


# --- what a case sends and what came back ---------------------------------------------------------------------
@dataclass
class Answer:
    """What the server answered to a case: one status per request ("413", "closed", "timeout", "transport")."""

    statuses: list[str]
    codes: list[str | None]
    seconds: float
    problems: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Target:
    """The running server a case talks to."""

    base: str
    model: str
    allowed: Path  # the folder given as --allowed_local_media_path
    timeout: float  # client timeout per request (seconds)
    stall_s: float  # how long the half-sent case waits for the server


@dataclass(frozen=True)
class Case:
    """One hostile input: ``prepare`` builds it (not timed) and returns the function that sends it."""

    name: str
    what: str
    accept: tuple[str, ...]  # statuses that pass: "200", "4xx", "429", "413", "closed"
    prepare: Callable[[Target], Callable[[Target], Answer]]


@dataclass
class CaseResult:
    """One row of the report (memory in MiB over the server's RSS just before the case)."""

    case: str
    what: str
    status: str
    code: str
    seconds: float
    peak_mb: float | None
    kept_mb: float | None
    budget_mb: int
    valid_after: str
    verdict: str
    notes: list[str] = field(default_factory=list)


# --- payloads: deflate bombs built from one compressed chunk repeated -------------------------------------------
def deflate_zeros(prefix: bytes, zeros: int, chunk: int = 16 * MIB) -> bytes:
    """A raw deflate stream of ``prefix`` followed by ``zeros`` zero bytes, without holding them in memory.

    After a full flush deflate starts afresh, so every zero chunk compresses to the same bytes: one chunk is
    compressed and its bytes repeated.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [compressor.compress(prefix), compressor.flush(zlib.Z_FULL_FLUSH)]
    count, rest = divmod(zeros, chunk)
    block = b""
    if count:
        block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
        parts.append(block)
    if count > 1:
        again = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
        if again != block:  # not expected with zlib; fall back to compressing every chunk
            parts.append(again)
            parts.extend(compressor.compress(bytes(chunk)) for _ in range(count - 2))
        else:
            parts.append(again)
            parts.extend([block] * (count - 2))
    parts.append(compressor.compress(bytes(rest)) + compressor.flush())
    return b"".join(parts)


def gzip_zeros(prefix: bytes, zeros: int, chunk: int = 16 * MIB) -> bytes:
    """A gzip file of ``prefix`` followed by ``zeros`` zero bytes (RFC 1952: header, deflate, CRC-32, size)."""
    crc = zlib.crc32(prefix)
    count, rest = divmod(zeros, chunk)
    block = bytes(chunk)
    for _ in range(count):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(bytes(rest), crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    size = (len(prefix) + zeros) & 0xFFFFFFFF
    return header + deflate_zeros(prefix, zeros, chunk) + struct.pack("<II", crc, size)


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def big_png(side: int = 4096) -> bytes:
    """A ``side``² RGB PNG that compresses to a few tens of KB: black with a grey square."""
    array = np.zeros((side, side, 3), dtype=np.uint8)
    array[side // 4 : side // 2, side // 4 : side // 2] = 128
    return png_bytes(array)


# --- payloads: DICOM ------------------------------------------------------------------------------------------
def _dicom_dataset(rows: int, cols: int, bits: int, frames: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    return ds


def _saved(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _meta_end(data: bytes) -> int:
    """Where the file meta group ends: after the preamble, "DICM" and (0002,0000) group length's value."""
    return 144 + struct.unpack("<I", data[140:144])[0]


def deflated_dicom(rows: int, cols: int, frames: int) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose 8-bit pixel data inflates to rows × cols × frames bytes."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _dicom_dataset(rows, cols, 8, frames)
    ds.PixelData = b""
    plain = _saved(ds)  # explicit VR little endian; PixelData (OB, length 0) is the last element
    body = plain[_meta_end(plain) : -4] + struct.pack("<I", rows * cols * frames)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = _saved(ds)
    return deflated[: _meta_end(deflated)] + deflate_zeros(body, rows * cols * frames)


def many_frame_dicom(side: int, frames: int) -> bytes:
    """A JPEG 2000 lossless DICOM of ``frames`` 16-bit ``side``² frames, each a few hundred bytes (all zero)."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEG2000Lossless

    ds = _dicom_dataset(side, side, 16, 1)
    ds.compress(JPEG2000Lossless, np.zeros((side, side), dtype=np.uint16))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame] * frames)
    ds.NumberOfFrames = frames
    return _saved(ds)


# --- payloads: NIfTI ------------------------------------------------------------------------------------------
def nifti_header(shape: tuple[int, ...], dtype, affine: np.ndarray | None = None) -> bytes:
    """A NIfTI-1 single-file header (348 bytes, no extension) with voxels starting at byte 352."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4) if affine is None else affine, code=1)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


def nifti_gz(shape: tuple[int, ...], dtype) -> bytes:
    """A ``.nii.gz`` of zeros: a few KB per GiB of voxels."""
    return gzip_zeros(nifti_header(shape, dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)


def nifti_with_affine(affine: np.ndarray) -> bytes:
    """A small 3-D uint8 ``.nii`` with the given voxel-to-world affine."""
    shape = (32, 32, 32)
    return nifti_header(shape, np.uint8, affine) + bytes(int(np.prod(shape)))


def singular_affine() -> np.ndarray:
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    return affine


def nan_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.nan
    return affine


# --- sending --------------------------------------------------------------------------------------------------
def small_png_url() -> str:
    """A valid small scan (the soak bench's phantom image)."""
    from serve_soak import _png_url

    return _png_url(0, size=96)


def chat_body(target: Target, urls: list[str], text: str = "Describe the scan.") -> dict:
    """A chat request (the soak bench's) with ``urls`` as image parts, in order, then the text."""
    from serve_soak import _chat

    body = _chat(target.model, "", text, max_tokens=MAX_TOKENS)
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    body["messages"][0]["content"] = [*parts, {"type": "text", "text": text}]
    return body


def error_code(response) -> tuple[str | None, str, list[str]]:
    """The OpenAI-style error code and message of a non-2xx answer, and what is wrong with its body."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None, "", [f"{response.status_code} without a JSON body: {response.text[:120]!r}"]
    if not isinstance(error, dict):
        return None, "", [f"{response.status_code} without an OpenAI-style error body"]
    code, message = error.get("code"), str(error.get("message", ""))
    return code, message, [] if code else [f"{response.status_code} error body with code {code!r}"]


@dataclass
class Reply:
    """One HTTP answer: status ("200", "413", "timeout", "transport"), error code and message, what is wrong."""

    status: str
    code: str | None = None
    message: str = ""
    problems: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


def post(target: Target, body: bytes) -> Reply:
    """POST ``body`` to chat completions."""
    import httpx

    headers = {"content-type": "application/json"}
    try:
        response = httpx.post(
            f"{target.base}/v1/chat/completions", content=body, headers=headers, timeout=target.timeout
        )
    except httpx.TimeoutException:
        return Reply("timeout", problems=[f"no answer in {target.timeout:g} s"])
    except httpx.HTTPError as err:
        return Reply("transport", problems=[f"transport error: {err!r}"])
    reply = Reply(str(response.status_code), headers=dict(response.headers))
    if response.status_code >= 300:
        reply.code, message, reply.problems = error_code(response)
        reply.message = message[:MESSAGE_CHARS]
    return reply


def send_once(body: bytes) -> Callable[[Target], Answer]:
    """A case that sends one request body."""

    def send(target: Target) -> Answer:
        start = time.perf_counter()
        reply = post(target, body)
        said = f"; said: {reply.message}" if reply.message else ""
        note = f"body {len(body) / MIB:.2f} MiB{said}"
        return Answer([reply.status], [reply.code], time.perf_counter() - start, reply.problems, note)

    return send


def send_chat(urls: list[str], text: str = "Describe the scan.") -> Callable[[Target], Callable[[Target], Answer]]:
    """prepare() for a case that sends one chat request with these image URLs."""
    return lambda target: send_once(json.dumps(chat_body(target, urls, text)).encode())


def send_concurrent(clients: int, url_of: Callable[[], str]) -> Callable[[Target], Callable[[Target], Answer]]:
    """prepare() for ``clients`` concurrent requests, each with one image."""

    def prepare(target: Target) -> Callable[[Target], Answer]:
        body = json.dumps(chat_body(target, [url_of()])).encode()

        def send(target: Target) -> Answer:
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                replies = list(pool.map(lambda _: post(target, body), range(clients)))
            seconds = time.perf_counter() - start
            problems = [p for reply in replies for p in reply.problems]
            shed = [reply for reply in replies if reply.status == "429"]
            problems += ["429 without Retry-After" for reply in shed if "retry-after" not in reply.headers]
            said = sorted({reply.message for reply in replies if reply.message})
            note = f"{clients} clients, body {len(body) / MIB:.2f} MiB each" + (f"; said: {said[0]}" if said else "")
            return Answer([r.status for r in replies], [r.code for r in replies], seconds, problems, note)

        return send

    return prepare


def send_half_body(target: Target) -> Callable[[Target], Answer]:
    """prepare() for a request whose headers promise 100 000 bytes and whose body stops after 1 000."""
    host, port = target.base.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
        "content-length: 100000\r\n\r\n"
    ).encode()
    body = json.dumps(chat_body(target, [], "x" * 2000)).encode()[:1000]

    def send(target: Target) -> Answer:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + body)
            start = time.perf_counter()
            sock.settimeout(target.stall_s)
            try:
                first = sock.recv(65536)
            except TimeoutError:
                seconds = time.perf_counter() - start
                return Answer(["timeout"], [None], seconds, [f"still open, no answer after {seconds:.0f} s"])
            except ConnectionError:
                first = b""
            seconds = time.perf_counter() - start
        if not first:
            return Answer(["closed"], [None], seconds, note="closed without an answer")
        status = first.split(b" ", 2)[1].decode(errors="replace") if first.startswith(b"HTTP/") else "garbled"
        code = None
        text = first.partition(b"\r\n\r\n")[2]
        try:
            code = json.loads(text).get("error", {}).get("code")
        except (ValueError, AttributeError):
            pass
        return Answer([status], [code], seconds, note="seconds from the last byte sent")

    return send


# --- the cases ------------------------------------------------------------------------------------------------
def _local(name: str, write: Callable[[Path], None] | None = None) -> Callable[[Target], Callable[[Target], Answer]]:
    """prepare() for a chat request naming a local path inside the allowed folder (``write`` makes it)."""

    def prepare(target: Target) -> Callable[[Target], Answer]:
        path = target.allowed / name
        if write is not None:
            write(path)
        return send_chat([str(path)])(target)

    return prepare


def _write_bytes(data: Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data())


def _symlink_loop(path: Path) -> None:
    other = path.with_name(path.name + "_b")
    for link, to in ((path, other), (other, path)):
        if not link.is_symlink():
            link.symlink_to(to.name)


def _lazy(make: Callable[[], str]) -> Callable[[], str]:
    """``make()`` once, on first use (payloads are built only for the cases that run)."""
    cache: list[str] = []
    return lambda: cache[0] if cache else (cache.append(make()) or cache[0])


def _chat_case(urls: Callable[[], list[str]]) -> Callable[[Target], Callable[[Target], Answer]]:
    """prepare() for one chat request whose image URLs ``urls()`` builds."""
    return lambda target: send_chat(urls())(target)


def bomb_cases(png4096: Callable[[], str], small: Callable[[], str]) -> list[Case]:
    """Inputs small on the wire that decode to far more: containers, many images, many clients."""
    chat = _chat_case
    return [
        Case(
            "dicom_deflate_bomb",
            "deflated DICOM data URL (2.8 MB) inflating to 2 GiB (512² × 8192 frames)",
            ("4xx",),
            chat(lambda: [data_url(deflated_dicom(512, 512, 8192), "application/dicom")]),
        ),
        Case(
            "dicom_huge_frames",
            "JPEG 2000 DICOM, 4096² × 1024 frames of 16 bits (32 GiB declared, 0.2 MB)",
            ("200", "4xx"),
            chat(lambda: [data_url(many_frame_dicom(4096, 1024), "application/dicom")]),
        ),
        Case("png_4096_x30", "30 × 4096² RGB PNGs in one message", ("200", "4xx"), chat(lambda: [png4096()] * 30)),
        Case("png_4096_x10", "10 × 4096² RGB PNGs in one message", ("200", "4xx"), chat(lambda: [png4096()] * 10)),
        Case(
            "nifti_local_1024cube",
            "local 1 MiB .nii.gz inflating to 1024³ uint8 voxels (1 GiB)",
            ("200", "4xx"),
            _local("bomb.nii.gz", _write_bytes(lambda: nifti_gz((1024, 1024, 1024), np.uint8))),
        ),
        Case(
            "nifti_float64_4gib",
            "float64 .nii.gz data URL, 1024² × 512 voxels (4 GiB inflated, 5.5 MB)",
            ("200", "4xx"),
            chat(lambda: [data_url(nifti_gz((1024, 1024, 512), np.float64), "application/gzip")]),
        ),
        Case(
            "nifti_5d",
            "5-D .nii.gz data URL, 512² × 64 × 8 × 8 uint8 (1 GiB inflated)",
            ("4xx",),
            chat(lambda: [data_url(nifti_gz((512, 512, 64, 8, 8), np.uint8), "application/gzip")]),
        ),
        Case(
            "images_300",
            "300 small images (96² PNG) in one message, 4,096-token context",
            ("4xx",),
            chat(lambda: [small()] * 300),
        ),
        Case("images_1000", "1000 small images (96² PNG) in one message", ("4xx",), chat(lambda: [small()] * 1000)),
        send_concurrent_case(png4096),
    ]


def malformed_cases(small: Callable[[], str]) -> list[Case]:
    """Malformed text, paths, affines and bodies, and an unsafe start-up setting: each must be a clear 4xx."""
    chat = _chat_case
    return [
        Case(
            "lone_surrogate",
            "a lone surrogate (\\ud800) in the text",
            ("200", "4xx"),
            lambda target: send_chat([small()], "Describe \ud800 the scan.")(target),
        ),
        Case("symlink_loop", "local path through a symbolic-link loop", ("4xx",), _local("loop", _symlink_loop)),
        Case("long_name", "local path with a 300-character file name", ("4xx",), _local("n" * 296 + ".png")),
        Case("nul_in_path", "local path with a NUL byte", ("4xx",), _local("scan\x00.png")),
        Case(
            "nifti_singular_affine",
            "local .nii with a singular (all-zero) affine",
            ("4xx",),
            _local("singular.nii", _write_bytes(lambda: nifti_with_affine(singular_affine()))),
        ),
        Case(
            "nifti_nan_affine",
            "data URL .nii with NaN in its affine",
            ("4xx",),
            chat(lambda: [data_url(nifti_with_affine(nan_affine()), "application/octet-stream")]),
        ),
        Case(
            "invalid_json",
            "a body the JSON parser rejects",
            ("4xx",),
            lambda target: send_once(b'{"model": "x", "messages": ['),
        ),
        Case(
            "half_sent_body",
            "headers promise 100 000 bytes, 1 000 sent, then silence",
            ("4xx", "closed"),
            send_half_body,
        ),
        Case("api_key_empty", '`citrus-v deploy --api_key ""` at start', ("refused",), lambda target: None),
    ]


def send_concurrent_case(png4096: Callable[[], str]) -> Case:
    return Case(
        "concurrent_32x4096",
        "32 clients at once, each one 4096² RGB PNG",
        ("200", "429", "413"),
        send_concurrent(32, png4096),
    )


def all_cases() -> list[Case]:
    """Every case, in the order they run (the cheap start-up check last)."""
    small = _lazy(small_png_url)
    return [*bomb_cases(_lazy(lambda: data_url(big_png(), "image/png")), small), *malformed_cases(small)]


# --- the server and its memory --------------------------------------------------------------------------------
def _status_kb(pid: int, *keys: str) -> list[int]:
    """``kB`` fields of ``/proc/<pid>/status`` such as ``VmRSS:`` (0 once the process is gone)."""
    found = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name = line.split(maxsplit=1)[0] if line.strip() else ""
                if name in found:
                    found[name] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return [found[key] for key in keys]


class MemoryWatch:
    """Polls the server's VmRSS (its child processes included) in a thread while a case runs; kills the server
    past ``cap_mb`` so that a bomb cannot take the machine down."""

    def __init__(self, pid: int, every_s: float, cap_mb: float) -> None:
        self.pid, self.every_s, self.cap_mb = pid, every_s, cap_mb
        self.pids = [pid]
        self.before = self.peak = self.after = self.peak_vm = 0.0
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)

    def _refresh_children(self) -> None:
        import psutil

        try:
            self.pids = [self.pid, *(child.pid for child in psutil.Process(self.pid).children(recursive=True))]
        except psutil.Error:
            self.pids = [self.pid]

    def sample(self) -> float:
        """Resident MiB of the server and its children; the server's largest address space is kept too."""
        rss, size = _status_kb(self.pid, "VmRSS:", "VmSize:")
        self.peak_vm = max(self.peak_vm, size / 1024)
        return (rss + sum(_status_kb(pid, "VmRSS:")[0] for pid in self.pids[1:])) / 1024

    def _run(self) -> None:
        polls = 0
        while not self._stop.wait(self.every_s):
            polls += 1
            if polls % 50 == 0:
                self._refresh_children()
            value = self.sample()
            self.peak = max(self.peak, value)
            if value > self.cap_mb and not self.killed:
                self.killed = True
                os.kill(self.pid, signal.SIGKILL)

    def __enter__(self) -> MemoryWatch:
        self._refresh_children()
        self.before = self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self.sample()
        self.peak = max(self.peak, self.after)


class DeployedServer:
    """``citrus-v deploy`` in a subprocess (the tests' ``deployed_server``), its address space limited."""

    def __init__(self, model: str, flags: list[str], cap_mb: float, port: int = 0) -> None:
        self.model, self.flags, self.cap_mb, self.port = model, flags, cap_mb, port
        self.stack: ExitStack | None = None
        self.process: subprocess.Popen | None = None
        self.base = ""
        self.name = ""
        self.starts = 0
        self.address_limit_mb = 0.0

    def start(self) -> None:
        import httpx
        from test_serve_support import deployed_server, free_port

        self.stack = ExitStack()
        port = self.port or free_port()
        self.process, self.log = self.stack.enter_context(deployed_server(self.model, port, self.flags))
        self._limit_address_space()
        self.base = f"http://127.0.0.1:{port}"
        self.name = httpx.get(f"{self.base}/v1/models", timeout=30).json()["data"][0]["id"]
        self.starts += 1

    def _limit_address_space(self) -> None:
        """RLIMIT_AS: the address space it has now plus twice the cap, a backstop should an allocation outrun the
        watcher's poll. Twice, because thread stacks and allocator arenas reserve address space they never touch:
        with the cap alone a busy server meets the limit (MemoryError) well below the cap in resident memory."""
        import psutil

        self.address_limit_mb = _status_kb(self.process.pid, "VmSize:")[0] / 1024 + 2 * self.cap_mb
        limit = int(self.address_limit_mb * MIB)
        psutil.Process(self.process.pid).rlimit(psutil.RLIMIT_AS, (limit, limit))

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.close()
        self.stack = None

    def log_tail(self, lines: int = 5) -> str:
        self.log.seek(0)
        return " / ".join(self.log.read().strip().splitlines()[-lines:])


def valid_request(target: Target) -> str:
    """The status of a valid small chat request (the server must still serve)."""
    return post(target, json.dumps(chat_body(target, [small_png_url()])).encode()).status


def budget_flag() -> str | None:
    """:data:`BUDGET_FLAG` when ``citrus-v deploy --help`` lists it (a server without one is measured all the same)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "citrus_v.cli", "deploy", "--help"]
    text = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120).stdout
    return BUDGET_FLAG if BUDGET_FLAG in text.split() else None


# --- running a case -------------------------------------------------------------------------------------------
def _accepted(status: str, accept: tuple[str, ...]) -> bool:
    return status in accept or ("4xx" in accept and status.startswith("4") and len(status) == 3)


def _summary(values: list[str | None]) -> str:
    counts = Counter(v for v in values if v)
    if not counts:
        return "—"
    if len(values) == 1:
        return str(values[0])
    return ", ".join(f"{value} ×{count}" for value, count in counts.most_common())


def judge(case: Case, answer: Answer, watch: MemoryWatch, budget_mb: int, after: str) -> tuple[str, list[str]]:
    """PASS, or FAIL with the reasons."""
    reasons = list(answer.problems)
    outside = sorted({s for s in answer.statuses if not _accepted(s, case.accept)})
    if outside:
        reasons.append(f"answered {', '.join(outside)}; this case allows {' or '.join(case.accept)}")
    if watch.killed:
        reasons.append("the server passed the bench's memory cap and was killed")
    peak = watch.peak - watch.before
    if peak > budget_mb:
        reasons.append(f"peak {peak:.0f} MiB over the budget of {budget_mb:g} MiB")
    if after != "200":
        reasons.append(f"a valid request afterwards got {after}")
    return ("FAIL" if reasons else "PASS"), reasons


def run_case(case: Case, server: DeployedServer, args) -> CaseResult:
    """Build the case, send it with the server's memory watched, then check a valid request still gets 200."""
    target = Target(server.base, server.name, args.allowed, args.client_timeout, args.stall_s)
    send = case.prepare(target)
    with MemoryWatch(server.process.pid, args.poll_ms / 1000, args.server_cap_mb) as watch:
        answer = send(target)
        after = valid_request(target) if server.running() else "no answer (server dead)"
    verdict, reasons = judge(case, answer, watch, args.budget_mb, after)
    if watch.peak_vm > 0.95 * server.address_limit_mb:
        reasons.append(
            f"the server's address space reached {watch.peak_vm:.0f} MiB of the bench's limit of "
            f"{server.address_limit_mb:.0f} MiB: a MemoryError is the bench's backstop, not the server's own refusal"
        )
    alive = server.running()
    if not alive and not watch.killed:
        reasons.append(f"server exited ({server.process.returncode}); log: {server.log_tail()}")
    notes = [answer.note] if answer.note else []
    return CaseResult(
        case=case.name,
        what=case.what,
        status=_summary(answer.statuses),
        code=_summary(answer.codes),
        seconds=answer.seconds,
        peak_mb=watch.peak - watch.before,
        kept_mb=watch.after - watch.before if alive else None,
        budget_mb=args.budget_mb,
        valid_after=after,
        verdict=verdict,
        notes=notes + reasons,
    )


def run_api_key_case(case: Case, args) -> CaseResult:
    """``citrus-v deploy --api_key ""``: it must refuse to start, with the reason; a server that serves FAILs."""
    import httpx
    from test_serve_support import free_port

    port = free_port()  # not --port: the bench's own server may be listening there
    command = [sys.executable, "-m", "citrus_v.cli", "deploy", "--model", args.model, "--port", str(port),
               "--api_key", ""]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("CITRUS_V_API_KEY", None)
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        served = False
        while process.poll() is None and time.perf_counter() - start < 180:
            try:
                served = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                pass
            if served:
                process.terminate()
                process.wait(30)
                break
            time.sleep(0.3)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read().strip().splitlines()
    line = output[-1] if output else ""
    if served:
        line = f"answered /health with no key {seconds:.0f} s after start"
    refused = not served and process.returncode not in (0, None)
    status = "served with no key" if served else f"exit {process.returncode}"
    return CaseResult(
        case=case.name,
        what=case.what,
        status=status,
        code="—",
        seconds=seconds,
        peak_mb=None,
        kept_mb=None,
        budget_mb=args.budget_mb,
        valid_after="—",
        verdict="PASS" if refused else "FAIL",
        notes=[f"said: {line}"] + ([] if refused else ["the server must refuse an empty --api_key"]),
    )


# --- report ---------------------------------------------------------------------------------------------------
def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:+.0f}"


def table(results: list[CaseResult]) -> str:
    """The report as Markdown, one row per case, then each case's notes."""
    lines = [
        "| case | input | status | code | time (s) | peak − before (MiB) | kept (MiB) | budget (MiB) | valid request "
        "after | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.case} | {r.what} | {r.status} | {r.code} | {r.seconds:.2f} | {_mb(r.peak_mb)} | {_mb(r.kept_mb)} "
            f"| {r.budget_mb:g} | {r.valid_after} | {r.verdict} |"
        )
    notes = [f"- {r.case}: " + "; ".join(r.notes) for r in results if r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def _server_flags(args, flag: str | None) -> list[str]:
    flags = ["--allowed_local_media_path", str(args.allowed), "--log_level", "warning"]
    return flags + ([flag, str(args.budget_mb)] if flag else [])


def _not_started(case: Case, args, err: Exception) -> CaseResult:
    """The row of a case that could not run because the server did not start."""
    said = " / ".join(str(err).strip().splitlines()[-3:])
    return CaseResult(
        case=case.name,
        what=case.what,
        status="no server",
        code="—",
        seconds=0.0,
        peak_mb=None,
        kept_mb=None,
        budget_mb=args.budget_mb,
        valid_after="—",
        verdict="FAIL",
        notes=[f"the server did not start: {said}"],
    )


def _run_one(case: Case, server: DeployedServer, args) -> CaseResult:
    """One case, (re)starting the server first when it is not running; stopped afterwards when the case killed
    it or left it holding more than ``--restart_above_mb``, so that each case starts from a server in its usual
    state."""
    if case.name == "api_key_empty":
        return run_api_key_case(case, args)
    if not server.running():
        server.stop()
        try:
            server.start()
        except RuntimeError as err:  # deployed_server's "deploy did not start", with the server's output
            return _not_started(case, args, err)
        valid_request(Target(server.base, server.name, args.allowed, args.client_timeout, args.stall_s))
    result = run_case(case, server, args)
    if not server.running() or (result.kept_mb or 0) > args.restart_above_mb:
        server.stop()
    return result


def run_bench(cases: list[Case], args) -> tuple[list[CaseResult], dict]:
    """Run ``cases`` in order; the rows, and what the server was started with."""
    flag = budget_flag()
    server = DeployedServer(args.model, _server_flags(args, flag), args.server_cap_mb, args.port)
    results = []
    try:
        for case in cases:
            result = _run_one(case, server, args)
            results.append(result)
            print(f"{case.name}: {result.status} {result.code} in {result.seconds:.2f} s, peak {_mb(result.peak_mb)} "
                  f"MiB, {result.verdict}", flush=True)  # fmt: skip
    finally:
        server.stop()
    meta = {"budget_flag": flag, "server_starts": server.starts, "server_flags": _server_flags(args, flag)}
    return results, meta


def parse_args(argv: list[str] | None = None):
    from citrus_v.cli_parser import CitrusArgumentParser

    names = [case.name for case in all_cases()]
    parser = CitrusArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="all", help=f"comma-separated cases to run, or all: {', '.join(names)}")
    parser.add_argument(
        "--budget_mb",
        type=int,
        default=1024,
        help="memory budget of one case over the server's resident memory before it (MiB); passed "
        "to the server as --max_inflight_memory_mb when its --help lists that flag",
    )
    parser.add_argument("--port", type=int, default=0, help="port for the server (0: a free one)")
    parser.add_argument("--model", default="tiny-base", help="model folder or shipped name the server loads")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--poll_ms", type=float, default=20.0, help="milliseconds between memory samples")
    parser.add_argument(
        "--server_cap_mb",
        type=float,
        default=6144.0,
        help="the server is killed past this resident memory (MiB), and its address space is "
        "limited to what it has at start plus this",
    )
    parser.add_argument("--client_timeout", type=float, default=180.0, help="seconds a request may wait for an answer")
    parser.add_argument(
        "--stall_s",
        type=float,
        default=60.0,
        help="seconds the half-sent request waits for the server to answer or close",
    )
    parser.add_argument(
        "--restart_above_mb",
        type=float,
        default=256.0,
        help="restart the server after a case that left it holding more than this (MiB)",
    )
    args = parser.parse_args(argv)
    chosen = names if args.cases == "all" else [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; the cases are {', '.join(names)}")
    args.chosen = chosen
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' deployed_server and free_port
    by_name = {case.name: case for case in all_cases()}
    cases = [by_name[name] for name in dict.fromkeys(args.chosen)]  # in the order given, each once
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="citrus-v-hostile-") as scratch:
        args.allowed = Path(scratch) / "allowed"
        args.allowed.mkdir()
        results, meta = run_bench(cases, args)
    seconds = time.perf_counter() - start
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}; model "
        f"{args.model}; memory-budget flag: {meta['budget_flag'] or 'none (not passed)'}; {seconds:.0f} s"
    )
    print(table(results))
    if args.json:
        report = {"seconds": seconds, "model": args.model, **meta, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if all(r.verdict == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
