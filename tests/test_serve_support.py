"""Helpers for the server and app tests: a scripted predictor and a uvicorn server on a free local port.

A random-weight tiny model rarely says anything useful, so :class:`ScriptedPredictor` forces the answer
(through a logits processor, the same way as tests/test_predictor.py) by a keyword of the prompt: the
generation, the ``[SEG]`` capture and SAM 2's masks still run for real.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from citrus_v.infer import CitrusVPredictor

SEGMENT_ANSWER = "Sure, the lesion [SEG] and the organ [SEG].<|im_end|>"
BOX_ANSWER = '```json\n[\n{"bbox_2d": [28,56,112,140],"label": "lesion"}\n]\n```<|im_end|>'
PLAIN_ANSWER = "The image shows a round bright lesion.<|im_end|>"
THINK_ANSWER = "<think>bright round spot</think><answer>yes</answer><|im_end|>"
SLOW_STEP_S = 0.05


class _Script(LogitsProcessor):
    """Forces each row's scripted tokens (the last one repeats); optionally sleeps each step."""

    def __init__(self, answers: list[list[int] | None], delay: float) -> None:
        self.answers = answers
        self.delay = delay
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        for row, ids in enumerate(self.answers):
            if ids:
                token = ids[min(step, len(ids) - 1)]
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        if self.delay:
            time.sleep(self.delay)
        return scores


class ScriptedPredictor(CitrusVPredictor):
    """A predictor whose answer is chosen by a keyword of the prompt ("segment", "locate", "slow", ...)."""

    def _script(self, prompt: str) -> tuple[list[int] | None, float]:
        lowered = prompt.lower()
        tokenizer = self.processor.tokenizer
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        if "slow" in lowered:  # never ends by itself
            return encode(" slow"), SLOW_STEP_S
        if "segment" in lowered:
            return encode(SEGMENT_ANSWER), 0.0
        if "locate" in lowered:
            return encode(BOX_ANSWER), 0.0
        if "think" in lowered:
            return encode(THINK_ANSWER), 0.0
        if "free" in lowered:
            return None, 0.0
        return encode(PLAIN_ANSWER), 0.0

    def predict_batch(self, requests, logits_processor=None, **generation):
        scripts = [self._script(r.prompt) for r in requests]
        script = _Script([s[0] for s in scripts], max(s[1] for s in scripts))
        # the script goes first so that the server's own per-row control still has the last word
        processors = LogitsProcessorList([script, *(logits_processor or [])])
        return super().predict_batch(requests, logits_processor=processors, **generation)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(app, timeout: float = 30.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on 127.0.0.1; yields the base URL; stops it afterwards."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server on port {port} did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@contextmanager
def deployed_server(model_dir, port: int, flags=(), timeout: float = 180.0, env: dict[str, str] | None = None):
    """``citrus-v deploy --model MODEL_DIR --port PORT FLAGS`` in a subprocess on 127.0.0.1, with ``env`` added to
    the environment; yields ``(process, log)`` once ``/health`` answers (the server's output goes to the temporary
    file ``log``, which a long run cannot fill up as it would a pipe); stops the process afterwards."""
    import tempfile

    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "-m", "citrus_v.cli", "deploy", "--model", str(model_dir), "--port", str(port), *flags]
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    log.seek(0)
                    raise RuntimeError(f"deploy did not start:\n{log.read()}")
                time.sleep(0.3)
            yield process, log
        finally:
            process.terminate()
            process.wait(timeout=30)


@contextmanager
def deploy_process(model_dir, *flags: str, timeout: float = 120.0) -> Iterator[str]:
    """``citrus-v deploy --model MODEL_DIR FLAGS`` in a subprocess on a free 127.0.0.1 port; yields the
    ``/v1`` base URL once ``/health`` answers; stops the process afterwards."""
    port = free_port()
    with deployed_server(model_dir, port, flags, timeout=timeout):
        yield f"http://127.0.0.1:{port}/v1"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_message(url: str, text: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]
