"""Hostile input against a real server: no 500 from input, request ids, half-sent bodies, local files opened
without a window between check and use, and an empty API key refused at start.

Each case goes through uvicorn on 127.0.0.1 serving the tiny checkpoint (the scripted predictor of
``test_serve_support``), and is followed by a valid request that must still succeed.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

from citrus_v.serve import commands
from citrus_v.serve.server import ServerSettings, create_app

from .conftest import phantom
from .test_serve_support import ScriptedPredictor, data_url, image_message, png_bytes, running_server

openai = pytest.importorskip("openai")

NAME = "citrus-tiny"
BODY_TIMEOUT_S = 1.0
INSIDE_SIZE = {"width": 200, "height": 150}  # the allowed folder's scans
OUTSIDE_SIZE = {"width": 120, "height": 90}  # the outside scan: a different size tells them apart
RACE_REQUESTS = 200
SWAP_PAUSE_S = 0.0005  # each state lasts at least this long, and the swapping thread leaves the others time to run


def _scan(width: int, height: int) -> np.ndarray:
    image = phantom(3, size=height).image
    return np.pad(image, ((0, 0), (0, width - height)) + ((0, 0),) * (image.ndim - 2))


def _bad_affine_nifti(column: int | None) -> bytes:
    """nibabel's own test volume with its sform made singular (a zero ``column``) or NaN (``None``)."""
    image = nib.load(os.path.join(NIBABEL_DATA, "anatomical.nii"))
    affine = image.affine.copy()
    if column is None:
        affine[0, 0] = np.nan
    else:
        affine[:, column] = 0.0
    header = image.header.copy()
    header["qform_code"], header["sform_code"] = 0, 2
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    return nib.Nifti1Image(np.asarray(image.dataobj), None, header).to_bytes()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """``allowed/`` (scans, links inside and out, a link loop, a pipe, bad NIfTIs) next to ``outside/``."""
    root = tmp_path_factory.mktemp("hostile")
    allowed, outside = root / "allowed", root / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    inside_png = png_bytes(_scan(**INSIDE_SIZE))
    (allowed / "scan.png").write_bytes(inside_png)
    (allowed / "sub" / "scan.png").write_bytes(inside_png)
    (outside / "scan.png").write_bytes(png_bytes(_scan(**OUTSIDE_SIZE)))
    (allowed / "relative_link.png").symlink_to("sub/../scan.png")
    (allowed / "absolute_link.png").symlink_to(allowed / "sub" / "scan.png")
    (allowed / "leaving_link.png").symlink_to(outside / "scan.png")
    (allowed / "loop_a").symlink_to("loop_b")
    (allowed / "loop_b").symlink_to("loop_a")
    os.mkfifo(allowed / "pipe.png")
    (allowed / "singular.nii").write_bytes(_bad_affine_nifti(column=2))
    (allowed / "nan.nii").write_bytes(_bad_affine_nifti(column=None))
    (allowed / "anatomical.nii").write_bytes(Path(NIBABEL_DATA, "anatomical.nii").read_bytes())
    (allowed / "anatomical.nii.gz").write_bytes(gzip.compress(Path(NIBABEL_DATA, "anatomical.nii").read_bytes()))
    return root


@pytest.fixture(scope="module")
def predictor(tiny):
    class Exploding(ScriptedPredictor):
        """Fails as a bug would when the prompt says "explode"."""

        def predict_batch(self, requests, logits_processor=None, **generation):
            if any("explode" in r.prompt for r in requests):
                raise RuntimeError("a bug in the predictor")
            return super().predict_batch(requests, logits_processor, **generation)

    return Exploding(*tiny)


@pytest.fixture(scope="module")
def server(predictor, media):
    settings = ServerSettings(
        served_model_name=NAME,
        allowed_local_media_path=media / "allowed",
        max_body_bytes=1024 * 1024,
        body_timeout=BODY_TIMEOUT_S,
    )
    with running_server(create_app(predictor, settings)) as url:
        yield url


def _post(url: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    headers = {"content-type": "application/json"}
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers=headers, timeout=60)


def _image_request(url: str, text: str = "Describe it.") -> dict:
    return {"model": NAME, "messages": image_message(url, text), "max_tokens": 4}


def _assert_still_serving(url: str) -> None:
    ok = _post(url, _image_request(data_url(png_bytes(_scan(**INSIDE_SIZE)))))
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["grounding"]["image_size"] == INSIDE_SIZE
    assert len(ok.headers["x-request-id"]) == 32


def _raw(text: str) -> bytes:
    """A request body whose text holds ``text`` verbatim in the JSON (escapes stay escapes)."""
    return b'{"model": "NAME", "messages": [{"role": "user", "content": "TEXT"}]}'.replace(
        b"NAME", NAME.encode()
    ).replace(b"TEXT", text.encode())


def _cases(allowed: Path) -> dict:
    long_name = "a" * 300 + ".png"
    return {
        "lone surrogate in the text": (_raw("hi \\ud800 there"), 400, "invalid_text", "messages.0.content"),
        "lone low surrogate in a part": (
            json.dumps(_image_request("scan.png", "x")).replace('"text": "x"', '"text": "x\\udc00"').encode(),
            400,
            "invalid_text",
            "messages.0.content.1.text",
        ),
        "surrogate as UTF-8 bytes": (_raw("hi ").replace(b"hi ", b"hi \xed\xa0\x80"), 400, "invalid_text", None),
        "surrogate in a metadata key": (
            b'{"model": "%s", "metadata": {"\\ud800": "v"}, "messages": [{"role": "user", "content": "hi"}]}'
            % NAME.encode(),
            400,
            "invalid_text",
            "metadata (a key)",
        ),
        "body not UTF-8": (b'{"model": "\xff"}', 400, "invalid_json", None),
        "JSON nested too deeply": (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
        "a number of 5000 digits": (
            b'{"model": "%s", "seed": 1%s}' % (NAME.encode(), b"0" * 5000),
            400,
            "invalid_json",
            None,
        ),
        "symbolic-link loop": (
            _image_request("loop_a"),
            400,
            "invalid_image_path",
            "messages.0.content.0.image_url.url",
        ),
        "300-character file name": (_image_request(long_name), 400, "invalid_image_path", None),
        "NUL byte in the path": (_image_request("sc\u0000an.png"), 400, "invalid_image_path", None),
        "NUL byte in a file URL": (
            _image_request((allowed / "scan.png").as_uri() + "%00"),
            400,
            "invalid_image_path",
            None,
        ),
        "a folder": (_image_request("sub"), 400, "invalid_image_path", None),
        "a named pipe": (_image_request("pipe.png"), 400, "invalid_image_path", None),
        "missing file": (_image_request("sub/none.png"), 400, "image_not_found", None),
        "link leaving the folder": (_image_request("leaving_link.png"), 400, "local_media_not_allowed", None),
        "dot-dot leaving the folder": (
            _image_request("sub/../../outside/scan.png"),
            400,
            "local_media_not_allowed",
            None,
        ),
        "unparsable URL": (_image_request("//[oops"), 400, "invalid_image_url", "messages.0.content.0.image_url.url"),
        "NIfTI with a singular affine": (_image_request("singular.nii"), 400, "invalid_image", None),
        "NIfTI with a NaN affine": (_image_request("nan.nii"), 400, "invalid_image", None),
        "NIfTI data URL with a NaN affine": (
            _image_request(data_url(_bad_affine_nifti(None), "application/octet-stream")),
            400,
            "invalid_image",
            None,
        ),
    }


CASES = list(_cases(Path("/")))


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_gets_a_4xx_with_its_code_and_the_server_keeps_serving(server, media, case):
    body, status, code, param = _cases(media / "allowed")[case]
    response = _post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code in ("invalid_text", "invalid_image_url"):  # refused by the request's validation: it names the field
        assert error["message"].startswith(f"{error['param']}: "), error
    assert len(response.headers["x-request-id"]) == 32
    _assert_still_serving(server)


def test_links_inside_the_folder_are_followed_and_options_kept(server, media):
    for name in ("scan.png", "relative_link.png", "absolute_link.png", str(media / "allowed" / "sub" / "scan.png")):
        response = _post(server, _image_request(name))
        assert response.status_code == 200, (name, response.text)
        assert response.json()["choices"][0]["message"]["grounding"]["image_size"] == INSIDE_SIZE
    # a NIfTI's reference options still apply: a sagittal slice (axis 0) of the 33x41x25 volume is 41 wide, 25 high
    cases = (("anatomical.nii", (33, 41)), ("anatomical.nii#axis=0&slice=3", (41, 25)), ("anatomical.nii.gz", (33, 41)))
    for ref, size in cases:
        response = _post(server, _image_request(ref))
        assert response.status_code == 200, response.text
        got = response.json()["choices"][0]["message"]["grounding"]["image_size"]
        assert (got["width"], got["height"]) == size


def test_a_folder_swapped_for_a_link_never_serves_the_outside_file(server, media):
    """A thread swaps ``allowed/sub`` for a link to ``outside`` in a tight loop while requests name
    ``sub/scan.png``: every answer is the inside scan (200) or a refusal (400), never the outside one."""
    allowed, outside = media / "allowed", media / "outside"
    sub, parked, link = allowed / "sub", allowed / "sub-parked", allowed / "sub-link"
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            sub.rename(parked)
            link.symlink_to(outside)
            link.rename(sub)  # now a link to the outside folder
            time.sleep(SWAP_PAUSE_S)
            sub.unlink()
            parked.rename(sub)
            swaps += 1
            time.sleep(SWAP_PAUSE_S)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    statuses: dict[int, int] = {}
    try:
        with httpx.Client(timeout=60) as client:
            for _ in range(RACE_REQUESTS):
                response = client.post(f"{server}/v1/chat/completions", json=_image_request("sub/scan.png"))
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    assert response.json()["choices"][0]["message"]["grounding"]["image_size"] == INSIDE_SIZE
                else:
                    assert response.status_code == 400, response.text
    finally:
        stop.set()
        swapper.join(10)
    assert not sub.is_symlink() and sub.is_dir()
    assert swaps > RACE_REQUESTS and statuses.get(200, 0) > 0, (swaps, statuses)


def test_a_bug_is_a_500_naming_the_request_id_of_its_logged_traceback(server, caplog):
    caplog.set_level(logging.ERROR)
    response = _post(server, {"model": NAME, "messages": [{"role": "user", "content": "Please explode."}]})
    assert response.status_code == 500, response.text
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert error["code"] == "internal_error" and request_id in error["message"] and "RuntimeError" in error["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info and "a bug in the predictor" in str(logged[0].exc_info[1])
    # the official client reads the same id from the header
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Please explode."}])
    assert raised.value.request_id and raised.value.request_id in raised.value.message
    # streamed: the status line is out, so the error comes as an event naming the id
    streamed = _post(server, {"model": NAME, "stream": True, "messages": [{"role": "user", "content": "explode"}]})
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal_error" and streamed.headers["x-request-id"] in error["message"]
    assert events[-1] == "[DONE]"
    _assert_still_serving(server)


def test_every_answer_carries_a_request_id(server):
    ids = set()
    for response in (
        httpx.get(f"{server}/health"),
        httpx.get(f"{server}/v1/models"),
        httpx.get(f"{server}/nowhere"),
        _post(server, b"x" * (2 * 1024 * 1024)),  # 413 from the body limit, before any route
    ):
        ids.add(response.headers["x-request-id"])
    assert len(ids) == 4 and all(len(i) == 32 for i in ids)


# --- half-sent bodies --------------------------------------------------------------------------------------------
def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT_S + 10)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_stalled_body_gets_408_and_the_connection_closed(server, framing):
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Hello."}]}).encode()
    if framing == "chunked":
        head, part = b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n" % (10, body[:10])
    else:
        head, part = b"Content-Length: %d\r\n" % len(body), body[:10]
    with _open(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head)
        sock.sendall(b"\r\n" + part)  # then nothing more
        answer = _read_all(sock)  # returns only when the server closes
        elapsed = time.monotonic() - started
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer
    assert b"x-request-id: " in rest.lower() and b"connection: close" in rest.lower()
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "body_timeout" and "10 bytes" in error["message"]
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 5
    _assert_still_serving(server)


def test_a_slow_but_steady_body_is_not_cut(server):
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Hello there."}]}).encode()
    step = len(body) // 5 + 1
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    pause = BODY_TIMEOUT_S * 0.5
    with _open(server) as sock:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        for piece in pieces:  # in all far longer than the timeout, never a pause as long as it
            time.sleep(pause)
            sock.sendall(piece)
        answer = _read_all(sock)
    assert len(pieces) * pause > 2 * BODY_TIMEOUT_S
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["choices"][0]["message"]["content"]


# --- start-up ----------------------------------------------------------------------------------------------------
def _run_deploy(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(["deploy", *argv])
    return args.func(args)


def test_an_empty_api_key_is_refused_at_start_and_no_key_is_said_plainly(tiny_dir, monkeypatch, capsys):
    served = []  # the apps `deploy` would serve: none while the key is refused
    monkeypatch.setattr("citrus_v.serve.server.serve", lambda app, *rest, **options: served.append(app))
    monkeypatch.delenv("CITRUS_V_API_KEY", raising=False)
    for key in ("", "   "):
        assert _run_deploy(["--model", str(tiny_dir), "--api_key", key]) == 2 and not served
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--api_key" in err[0] and "empty" in err[0] and "open to anyone" in err[0]
    monkeypatch.setenv("CITRUS_V_API_KEY", "")
    assert _run_deploy(["--model", str(tiny_dir)]) == 2 and not served
    assert "CITRUS_V_API_KEY" in capsys.readouterr().err
    # without a key the server starts, and says that it is open
    monkeypatch.delenv("CITRUS_V_API_KEY")
    assert _run_deploy(["--model", str(tiny_dir), "--port", "8123"]) == 0 and served
    assert "no API key: the server is open, anyone who can reach 127.0.0.1:8123 may use it" in capsys.readouterr().out
    assert _run_deploy(["--model", str(tiny_dir), "--api_key", " secret "]) == 0
    out = capsys.readouterr().out
    assert "API key required" in out and "secret" not in out


# --- request fields the server does not implement ------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
    ],
)
def test_the_official_client_gets_a_400_naming_an_unimplemented_field(server, field, value):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello."}], **{field: value})
    assert raised.value.param == field and raised.value.code == "unsupported_parameter"
    assert client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello."}]).choices
