"""Serving throughput: concurrent requests share generations; the server's torch thread count leaves the HTTP side
a core."""

from __future__ import annotations

import argparse
import asyncio
import os

import httpx
import pytest
import torch

from citrus_v.infer import Request
from citrus_v.serve import commands
from citrus_v.serve.batching import DynamicBatcher, Job
from citrus_v.serve.server import ServerSettings, create_app
from citrus_v.serve.threads import configure_threads, default_num_threads, usable_cores

from .conftest import phantom
from .test_serve_support import ScriptedPredictor, data_url, image_message, png_bytes, running_server

PREPARE_S = 0.3  # how long the late request is "being prepared": many times max_wait


class CountingPredictor(ScriptedPredictor):
    """Records the size of every ``predict_batch`` call (one call = one generation)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def predict_batch(self, requests, logits_processor=None, **generation):
        self.calls.append(len(requests))
        return super().predict_batch(requests, logits_processor=logits_processor, **generation)


@pytest.fixture()
def predictor(tiny):
    model, processor = tiny
    return CountingPredictor(model, processor)


def _job(seed: int) -> Job:
    return Job(Request([phantom(seed, size=64).image], "<image>Describe the scan."), max_tokens=4)


def _first_and_late(batcher: DynamicBatcher, mark_late: bool, gap_s: float = PREPARE_S) -> list:
    """Submit one job, and a second one ``gap_s`` later (marked as being prepared meanwhile, or not)."""

    async def main() -> list:
        await batcher.start()
        try:
            first = batcher.submit(_job(1))
            if mark_late:
                with batcher.arriving():
                    await asyncio.sleep(gap_s)
            else:
                await asyncio.sleep(gap_s)
            late = batcher.submit(_job(2))
            return await asyncio.gather(first, late)
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_a_request_still_being_prepared_joins_the_batch(predictor):
    results = _first_and_late(DynamicBatcher(predictor, 8, max_wait_ms=20, max_arrival_wait_ms=5000), True)
    assert predictor.calls == [2] and [r.batch_size for r in results] == [2, 2]


def test_without_the_mark_the_window_closes_after_max_wait(predictor):
    results = _first_and_late(DynamicBatcher(predictor, 8, max_wait_ms=20, max_arrival_wait_ms=5000), False)
    assert predictor.calls == [1, 1] and [r.batch_size for r in results] == [1, 1]


def test_the_wait_for_prepared_requests_is_bounded(predictor):
    results = _first_and_late(DynamicBatcher(predictor, 8, max_wait_ms=20, max_arrival_wait_ms=50), True)
    assert predictor.calls == [1, 1] and [r.batch_size for r in results] == [1, 1]


def test_requests_trickling_in_keep_the_window_open(predictor):
    """Two jobs together open the window; each later one comes within ``max_wait`` of the one before, the last
    long after the first's window."""
    batcher = DynamicBatcher(predictor, 8, max_wait_ms=150, max_arrival_wait_ms=10_000)

    async def main() -> list:
        await batcher.start()
        try:
            futures = [batcher.submit(_job(0))]
            for seed in range(1, 5):
                futures.append(batcher.submit(_job(seed)))
                await asyncio.sleep(0.05)
            return await asyncio.gather(*futures)
        finally:
            await batcher.close()

    results = asyncio.run(main())
    assert predictor.calls == [5] and {r.batch_size for r in results} == {5}


def test_concurrent_http_requests_need_fewer_generations_than_sequential_ones(predictor):
    app = create_app(predictor, ServerSettings(served_model_name="tiny", max_batch_size=8, request_timeout=120))
    body = {
        "model": "tiny",
        "max_tokens": 4,
        "messages": image_message(data_url(png_bytes(phantom(0, size=64).image)), "Describe the scan."),
    }

    async def clients(url: str, count: int) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(count)))
        return [r.status_code for r in replies]

    with running_server(app) as url:
        assert asyncio.run(clients(url, 1)) == [200]  # warm-up: one request, one generation
        predictor.calls.clear()
        assert asyncio.run(clients(url, 8)) == [200] * 8
    assert sum(predictor.calls) == 8 and len(predictor.calls) < 8, predictor.calls


def test_default_threads_leave_one_core_on_cpu_only():
    assert default_num_threads("cpu") == max(1, usable_cores() - 1)
    assert default_num_threads("cuda") is None
    assert usable_cores() <= (os.cpu_count() or 1)


def test_configure_threads_sets_torch_and_refuses_zero():
    before = torch.get_num_threads()
    try:
        assert configure_threads("cpu", 1) == 1 == torch.get_num_threads()
        assert configure_threads("cpu") == max(1, usable_cores() - 1)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="at least 1"):
        configure_threads("cpu", 0)


def test_deploy_refuses_zero_threads(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(["deploy", "--model", str(tmp_path), "--num_threads", "0"])
    assert args.func(args) == 2
    assert "--num_threads" in capsys.readouterr().err


class EncodingPredictor(ScriptedPredictor):
    """Records on which thread each request is encoded, and whether generation received the encodings."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.encode_threads: list[str] = []
        self.given_encoded: list[bool] = []

    def encode(self, request):
        import threading

        self.encode_threads.append(threading.current_thread().name)
        return super().encode(request)

    def predict_batch(self, requests, logits_processor=None, **generation):
        self.given_encoded.append(generation.get("encoded") is not None)
        return super().predict_batch(requests, logits_processor=logits_processor, **generation)


def test_requests_are_encoded_on_arrival_not_on_the_generation_thread(tiny):
    predictor = EncodingPredictor(*tiny)
    app = create_app(predictor, ServerSettings(served_model_name="citrus"))
    url = data_url(png_bytes(phantom(4, size=64).image))
    with running_server(app) as base:
        for _ in range(2):
            response = httpx.post(
                f"{base}/v1/chat/completions",
                json={"model": "citrus", "messages": image_message(url, "Describe the scan."), "max_tokens": 4},
                timeout=60,
            )
            assert response.status_code == 200, response.text
    assert predictor.given_encoded == [True, True]
    assert len(predictor.encode_threads) == 2
    assert not any(name.startswith("citrus-v-generate") for name in predictor.encode_threads)
