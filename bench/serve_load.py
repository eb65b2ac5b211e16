"""Serving benchmark on the tiny preset: load with and without dynamic batching, and one vs two generation passes.

Part 1 (load): the OpenAI-compatible server runs in this process (uvicorn in a thread, the tiny preset's
random weights); C concurrent clients send chat requests with a 224x224 scan for ``--seconds`` each, at
C = 1, 4 and 16, with dynamic batching on (``--max_batch_size 16``) and off (``1``). Every answer is forced to
the same text (one ``[SEG]``, ``--max_tokens`` tokens at most) so both modes do identical work. Reported:
requests/s, p50 and p95 latency, mean batch size.

Part 2 (passes): latency of one request whose answer holds 1 or 3 ``[SEG]`` tokens, computed
(a) in one generation pass with ``[SEG]`` capture (``CitrusVPredictor``), and (b) as upstream does:
generate, then run a second full forward pass over prompt + answer to read the ``[SEG]`` hidden states.

    .venv/bin/python bench/serve_load.py [--seconds 30] [--concurrency 1,4,16] [--repeats 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

LOAD_ANSWER = "Sure, the lesion is in the left lower lobe and it is [SEG]. No other finding.<|im_end|>"
SEG_ANSWERS = {
    1: "Sure, the lesion [SEG].<|im_end|>",
    3: "Sure, the lesion [SEG], the organ [SEG] and the kidney [SEG].<|im_end|>",
}


class ForceText(LogitsProcessor):
    """Forces every row to the same token sequence (the benchmark's fixed answer)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.start, len(self.token_ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_ids[step]] = 0.0
        return forced


def _forced_predictor(model, processor, answer: str):
    from citrus_v.infer import CitrusVPredictor

    ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]

    class Forced(CitrusVPredictor):
        def predict_batch(self, requests, logits_processor=None, **generation):
            processors = LogitsProcessorList([ForceText(ids), *(logits_processor or [])])
            return super().predict_batch(requests, logits_processor=processors, **generation)

    return Forced(model, processor)


def _scan_url(seed: int) -> str:
    from PIL import Image

    from citrus_v.data.synth import make_phantom

    image = make_phantom(np.random.default_rng(seed), size=224).image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- part 1: load -------------------------------------------------------------------------------------------
async def _clients(url: str, concurrency: int, seconds: float, max_tokens: int) -> list[float]:
    import httpx

    body = {
        "model": "tiny",
        "max_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _scan_url(0)}},
                    {"type": "text", "text": "Please segment the lesion."},
                ],
            }
        ],
    }
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def run_load(model, processor, concurrency: list[int], seconds: float, max_tokens: int) -> list[dict]:
    import threading

    import uvicorn

    from citrus_v.serve.server import ServerSettings, create_app

    rows = []
    # the model alone, one request at a time: what the HTTP path adds is the rest of the latency
    from PIL import Image

    from citrus_v.infer import Request

    predictor = _forced_predictor(model, processor, LOAD_ANSWER)
    scan = Image.open(io.BytesIO(base64.b64decode(_scan_url(0).split(",", 1)[1])))
    request = Request([scan], "<image>Please segment the lesion.")
    alone = []
    for _ in range(11):
        start = time.perf_counter()
        predictor.predict_batch([request], max_new_tokens=max_tokens + 1)
        alone.append(time.perf_counter() - start)
    model_ms = 1000 * statistics.median(alone[1:])
    print(f"model alone (predict_batch, one request): p50 {model_ms:.0f} ms", flush=True)
    rows.append({"batching": "model alone", "concurrency": 1, "p50_ms": model_ms})
    for batching in (True, False):
        settings = ServerSettings(
            served_model_name="tiny", max_batch_size=16 if batching else 1, max_wait_ms=10.0, request_timeout=600
        )
        app = create_app(_forced_predictor(model, processor, LOAD_ANSWER), settings)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_clients(url, 1, 2.0, max_tokens))  # warm-up
        try:
            for c in concurrency:
                batcher = app.state.batcher
                runs_before = batcher.batches_run
                start = time.perf_counter()
                latencies = asyncio.run(_clients(url, c, seconds, max_tokens))
                wall = time.perf_counter() - start
                batches = max(batcher.batches_run - runs_before, 1)
                row = {
                    "batching": "on" if batching else "off",
                    "concurrency": c,
                    "requests": len(latencies),
                    "requests_per_s": len(latencies) / wall,
                    "p50_ms": 1000 * statistics.median(latencies),
                    "p95_ms": 1000 * float(np.percentile(latencies, 95)),
                    "mean_batch": len(latencies) / batches,
                }
                rows.append(row)
                print(
                    f"batching {row['batching']:>3}  concurrency {c:>2}: {row['requests_per_s']:6.2f} req/s  "
                    f"p50 {row['p50_ms']:7.0f} ms  p95 {row['p95_ms']:7.0f} ms  mean batch {row['mean_batch']:.1f}",
                    flush=True,
                )
        finally:
            server.should_exit = True
            thread.join(30)
    return rows


# --- part 2: one pass vs two passes ---------------------------------------------------------------------------
def _two_pass(predictor, request, answer: str):
    """Upstream's way: generate the answer, then a second full forward over prompt + answer for the masks."""
    model, processor = predictor.model, predictor.processor
    ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    from citrus_v.processing.images import load_image

    image = load_image(request.images[0])
    batch = processor(predictor._sample(request, [image]), add_generation_prompt=True, return_labels=False)
    with torch.no_grad():
        sequences = model.mllm.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            eos_token_id=predictor.eos_token_ids,
            pad_token_id=processor.tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([ForceText(ids)]),
            max_new_tokens=len(ids),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        full = sequences[:, : batch["input_ids"].shape[1] + len(ids) - 1]  # without the end-of-turn token
        out = model(
            input_ids=full,
            attention_mask=torch.ones_like(full),
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=(full == processor.image_token_id).int(),
            sam_pixel_values=batch["sam_pixel_values"],
        )
    width, height = image.size
    logits = F.interpolate(out.pred_masks[0][:, None].float(), size=(height, width), mode="bilinear")
    return (logits[:, 0].sigmoid() > 0.5).numpy()


def run_passes(model, processor, repeats: int) -> list[dict]:
    from citrus_v.data.synth import make_phantom
    from citrus_v.infer import CitrusVPredictor, Request

    predictor = CitrusVPredictor(model, processor)
    image = make_phantom(np.random.default_rng(1), size=224).image
    request = Request(images=[image], prompt="<image>Segment every target.")
    rows = []
    for num_seg, answer in SEG_ANSWERS.items():
        ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        single = []
        double = []
        for _ in range(repeats + 1):  # the first round warms up
            start = time.perf_counter()
            result = predictor.predict_batch([request], logits_processor=LogitsProcessorList([ForceText(ids)]))[0]
            single.append(time.perf_counter() - start)
            start = time.perf_counter()
            reference = _two_pass(predictor, request, answer)
            double.append(time.perf_counter() - start)
        assert len(result.masks) == num_seg == len(reference)
        agree = min(float((m.mask == r).mean()) for m, r in zip(result.masks, reference, strict=True))
        row = {
            "num_seg": num_seg,
            "answer_tokens": len(ids),
            "single_pass_ms": 1000 * statistics.median(single[1:]),
            "two_pass_ms": 1000 * statistics.median(double[1:]),
            "mask_agreement": agree,
        }
        row["saved"] = 1 - row["single_pass_ms"] / row["two_pass_ms"]
        rows.append(row)
        print(
            f"{num_seg} [SEG] ({len(ids)} tokens): single pass {row['single_pass_ms']:.0f} ms, two passes "
            f"{row['two_pass_ms']:.0f} ms ({100 * row['saved']:.0f}% saved); masks agree on "
            f"{100 * agree:.2f}% of pixels",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds per load level (default 30)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--max_tokens", type=int, default=32, help="answer length cap in the load test")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per pass measurement")
    parser.add_argument("--skip_load", action="store_true")
    parser.add_argument(
        "--num_threads", type=int, default=None, help="torch threads (default: as `citrus-v deploy`, all cores but one)"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from citrus_v.recipes.presets import build_tiny
    from citrus_v.serve.threads import configure_threads

    configure_threads("cpu", args.num_threads)  # the server's setting, before the model runs
    model, processor = build_tiny(seed=0)
    model.eval()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results = {"passes": run_passes(model, processor, args.repeats)}
    if not args.skip_load:
        levels = [int(c) for c in args.concurrency.split(",") if c]
        results["load"] = run_load(model, processor, levels, args.seconds, args.max_tokens)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
