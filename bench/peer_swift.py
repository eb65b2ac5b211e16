"""Side by side with ms-swift: training and serving of the same tiny Qwen2.5-VL on the same data, in one run.

1. Builds (once) its own environment under ``bench/.peer/venv``: ``torch==2.14.1 torchvision==0.29.1`` (from
   local disk), ``ms-swift`` and this package, so both sides run on one torch build. ms-swift bounds
   transformers below 5.20 and peft below 0.21; this package is tested on transformers 5.24, so it is
   installed with ``--no-deps`` into ms-swift's environment (transformers 5.19) and both run there.
2. Writes one tiny Qwen2.5-VL checkpoint (random weights; a tokenizer whose special tokens have Qwen2.5's real
   ids, which ms-swift's template assumes) and one JSONL of plain image+text rows of mixed lengths (no masks).
   Our side trains a CitrusV assembled around that same Qwen2.5-VL with a tiny SAM 2 (``citrus-v build``);
   with no ``[SEG]`` in the data the seg head gets no loss and no gradient.
3. Trains the same steps with ``swift sft --template qwen2_5_vl --tuner_type full`` and ``citrus-v sft``
   (same batch, accumulation, max_length, learning rate, seed, data order), alternating A B A B A B, with and
   without packing; reports samples/s, tokens/s, peak memory and ours/theirs, and compares the loss curves.
4. Times the loader alone (samples/s) against the training step rate.
5. Serves the checkpoint with ``swift deploy --infer_backend transformers`` (``--max_batch_size`` 1, its
   default, and 8) and ``citrus-v deploy``, and measures requests/s, p50 and p95 at concurrency 1 and 8 with the
   same prompts and ``max_tokens``, in ``--serve_rounds`` rounds (the servers' order reversed every other round).
   By default ms-swift runs with the torch thread count ``citrus-v deploy`` sets (all cores but one), so both
   sides compute on the same cores: with torch's default (one thread per core) ms-swift's speed swings with
   whatever else the machine runs (``--swift_threads default`` measures it so).

    python bench/peer_swift.py [--steps 12] [--repeats 3] [--serve_seconds 20] [--serve_rounds 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "bench" / ".peer"
VENV = PEER / "venv"
PEER_PYTHON = VENV / "bin" / "python"
# The pins of the peer environment: torch and torchvision as the machine ships them; the newest ms-swift.
PEER_TORCH = ("torch==2.14.1", "torchvision==0.29.1")
PEER_SWIFT = ("ms-swift==4.6.0", "qwen-vl-utils==0.0.14")  # swift loads Qwen2.5-VL through qwen-vl-utils
# This package's own runtime dependencies that ms-swift does not bring (transformers, peft, hub: ms-swift's).
OUR_EXTRA_DEPS = (
    "pydicom>=3.0,<3.1",
    "pylibjpeg>=2.1,<2.2",
    "pylibjpeg-openjpeg>=2.6,<2.7",
    "pylibjpeg-libjpeg>=2.5,<2.6",
    "nibabel>=5.4,<5.5",
    "pycocotools>=2.0.11,<2.1",
    "highdicom>=0.28,<0.29",
)
# Qwen2.5's byte-level BPE has this many regular tokens; its special tokens follow from here on.
QWEN25_REGULAR_TOKENS = 151643
IMAGE_SIDE = 224  # 224x224 scans -> 64 image tokens after the 2x2 merge
SYSTEM = "You are a helpful assistant."


# --- environment ------------------------------------------------------------------------------------------
def _pip(*args: str) -> None:
    subprocess.run([str(PEER_PYTHON), "-m", "pip", "install", "-q", *args], check=True)


def ensure_env() -> dict[str, str]:
    """Create ``bench/.peer/venv`` once (marker file), and return the versions both sides run on."""
    marker = PEER / "env.json"
    wanted = {"torch": PEER_TORCH, "swift": PEER_SWIFT, "ours": OUR_EXTRA_DEPS}
    if not (marker.is_file() and json.loads(marker.read_text()).get("wanted") == json.loads(json.dumps(wanted))):
        print(f"building the peer environment in {VENV} (torch from local disk, ~5.5 GB; a few minutes)", flush=True)
        PEER.mkdir(parents=True, exist_ok=True)
        if not PEER_PYTHON.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        _pip(*PEER_TORCH)
        _pip(*PEER_SWIFT, *PEER_TORCH)  # torch repeated so the resolver never swaps it
        _pip(*OUR_EXTRA_DEPS, *PEER_TORCH)
        _pip("--no-deps", "-e", str(ROOT))
        marker.write_text(json.dumps({"wanted": wanted}) + "\n")
    probe = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({n: m.version(n) for n in ('torch','torchvision','transformers','ms-swift','peft',"
        "'accelerate','citrus-v')}))"
    )
    out = subprocess.run([str(PEER_PYTHON), "-c", probe], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


# --- the checkpoint and the data ------------------------------------------------------------------------------
def qwen_tokenizer():
    """The tiny byte-level BPE, padded with unreachable filler tokens so the specials get Qwen2.5's ids."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from citrus_v.processing.tokenizer_builder import build_tokenizer
    from citrus_v.tokens import CHAT_TEMPLATE, ENDOFTEXT, IM_END, QWEN_SPECIAL_TOKENS

    base = build_tokenizer(citrus_tokens=False)
    state = json.loads(base.backend_tokenizer.to_str())
    vocab = {k: v for k, v in state["model"]["vocab"].items() if v < QWEN25_REGULAR_TOKENS}
    # filler entries have no merge that produces them, so text never tokenizes to them
    filler = (f"<|filler_{i}|>" for i in range(QWEN25_REGULAR_TOKENS))
    while len(vocab) < QWEN25_REGULAR_TOKENS:
        vocab.setdefault(next(filler), len(vocab))
    state["model"]["vocab"] = vocab
    state["added_tokens"] = []
    tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS),
        model_max_length=32768,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    first = wrapped.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS[0])
    if first != QWEN25_REGULAR_TOKENS:
        raise RuntimeError(f"{QWEN_SPECIAL_TOKENS[0]} got id {first}, not Qwen2.5's {QWEN25_REGULAR_TOKENS}")
    return wrapped


def write_qwen_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random-weight tiny Qwen2.5-VL folder (model, tokenizer, image and video processors)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from citrus_v.recipes.presets import tiny_mllm_config

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    model = Qwen2_5_VLForConditionalGeneration(tiny_mllm_config(tokenizer))
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    pixels = IMAGE_SIDE * IMAGE_SIDE
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json, which older readers look for
    return out


def write_tiny_sam2(out: Path, seed: int = 0) -> Path:
    """The tiny preset's SAM 2 alone, as a transformers folder for ``citrus-v build --sam2``."""
    import torch

    from citrus_v.modeling.grounding import GroundingEncoder
    from citrus_v.recipes.presets import tiny_sam2_config

    torch.manual_seed(seed)
    GroundingEncoder(tiny_sam2_config()).save_pretrained(out)
    return out


WORDS = (
    "the liver spleen kidney lung lesion mass nodule cyst is seen in left right upper lower region "
    "small large round bright dark finding normal abnormal there no yes image scan shows"
).split()


def write_dataset(folder: Path, rows: int, seed: int = 0) -> Path:
    """Plain VLM rows (one 224-px scan, a question, an answer of 1 to 120 words), absolute image paths."""
    import numpy as np
    from PIL import Image

    from citrus_v.data.synth import make_phantom

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    with path.open("w") as handle:
        for i in range(rows):
            image = folder / f"img/{i}.png"
            Image.fromarray(make_phantom(rng, size=IMAGE_SIDE).image).save(image)
            words = int(rng.choice([1, 4, 12, 40, 120]))
            answer = " ".join(rng.choice(WORDS, size=words)) + "."
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "<image>Describe the findings in this scan."},
                {"role": "assistant", "content": answer},
            ]
            handle.write(json.dumps({"messages": messages, "images": [str(image)]}) + "\n")
    return path


# --- training --------------------------------------------------------------------------------------------------
def _timed(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, float]:
    """Run ``command`` (output to ``log``); return its exit code, wall seconds and peak resident memory (GiB)
    of the process tree (the largest single process, from the kernel's own accounting)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss / 2**20


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def common_flags(steps: int, batch: int, accumulation: int, max_length: int, lr: float, seed: int) -> list[str]:
    """The flags both CLIs take with the same meaning (upstream names)."""
    return [
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
        "--max_length", str(max_length), "--learning_rate", str(lr), "--max_steps", str(steps),
        "--seed", str(seed), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--torch_dtype", "float32", "--freeze_vit", "false", "--freeze_aligner", "false", "--freeze_llm", "false",
        "--warmup_ratio", "0", "--lr_scheduler_type", "cosine", "--weight_decay", "0.1", "--max_grad_norm", "1.0",
        "--gradient_checkpointing", "false", "--dataloader_num_workers", "0",
    ]


def swift_command(model: Path, dataset: Path, out: Path, flags: list[str], packing: bool) -> list[str]:
    # swift's own defaults that would change the work are set to match ours: no dataset pre-shuffle (both
    # then draw the same order from the trainer's seeded sampler), no validation split
    return [
        str(VENV / "bin" / "swift"), "sft", "--model", str(model), "--model_type", "qwen2_5_vl",
        "--template", "qwen2_5_vl", "--tuner_type", "full", "--dataset", str(dataset), "--output_dir", str(out),
        "--dataset_shuffle", "false", "--split_dataset_ratio", "0", "--packing", str(packing).lower(), *flags,
    ]


def ours_command(model: Path, dataset: Path, out: Path, flags: list[str], packing: bool) -> list[str]:
    return [
        str(VENV / "bin" / "citrus-v"), "sft", "--model", str(model), "--dataset", str(dataset),
        "--output_dir", str(out), "--overwrite_output_dir", "--packing", str(packing).lower(), *flags,
    ]


def _records(out: Path) -> list[dict]:
    files = sorted(out.rglob("logging.jsonl"))
    if not files:
        return []
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def train_run(side: str, command: list[str], out: Path, samples: int, tokens_per_sample: float) -> dict:
    """One training run; samples/s = samples trained / the trainer's own ``train_runtime``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    code, wall, peak = _timed(command, out / "console.log", _env())
    if code != 0:
        lines = [line for line in (out / "console.log").read_text().splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "failed")
        return {"side": side, "error": reason.strip()[:300], "wall_s": wall}
    records = _records(out)
    final = next(r for r in records if "train_runtime" in r)
    runtime = float(final["train_runtime"])
    losses = [float(r["loss"]) for r in records if "loss" in r and "train_runtime" not in r]
    return {
        "side": side,
        "samples_per_s": samples / runtime,
        "tokens_per_s": samples * tokens_per_sample / runtime,
        "peak_gib": peak,
        "runtime_s": runtime,
        "wall_s": wall,
        "losses": losses,
    }


def loader_rate(model: Path, dataset: Path, batch: int, max_length: int, packing: bool, seconds: float = 15) -> float:
    """Samples/s of our training loader alone (dataset + collator, no model), as the trainer builds it."""
    from torch.utils.data import DataLoader

    from citrus_v.processing.processor import CitrusVProcessor
    from citrus_v.train.arguments import SftArguments
    from citrus_v.train.data import build_train_dataset

    args = SftArguments(model=str(model), dataset=[str(dataset)], max_length=max_length, packing=packing)
    data, collator, _ = build_train_dataset(args, CitrusVProcessor.from_pretrained(model))
    loader = DataLoader(data, batch_size=batch, shuffle=True, collate_fn=collator, num_workers=0)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for item in loader:
            done += int(item["num_samples"])
            if time.perf_counter() - start >= seconds:
                break
    return done / (time.perf_counter() - start)


def tokens_per_sample(model: Path, dataset: Path) -> float:
    """Mean real tokens of a row under our template (ms-swift's qwen2_5_vl template renders the same ids)."""
    from citrus_v.processing.processor import CitrusVProcessor

    processor = CitrusVProcessor.from_pretrained(model)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    counts = [int(processor([row])["attention_mask"].sum()) for row in rows]
    return sum(counts) / len(counts)


def compare_losses(theirs: list[float], ours: list[float], first: int, tolerance: float) -> dict:
    """Largest absolute gap between the two loss curves over the first steps."""
    n = min(first, len(theirs), len(ours))
    gaps = [abs(a - b) for a, b in zip(theirs[:n], ours[:n], strict=True)]
    return {"steps": n, "max_gap": max(gaps) if gaps else float("nan"), "tolerance": tolerance,
            "agree": bool(gaps) and max(gaps) <= tolerance, "theirs": theirs[:n], "ours": ours[:n]}


# --- serving -----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scan_url(dataset: Path) -> str:
    image = Path(json.loads(dataset.read_text().splitlines()[0])["images"][0])
    return "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()


def _body(name: str, scan: str, max_tokens: int) -> dict:
    return {
        "model": name,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": scan}},
                {"type": "text", "text": "Describe the findings in this scan."},
            ]},
        ],
    }


async def _load(url: str, body: dict, concurrency: int, seconds: float) -> tuple[list[float], float]:
    """``concurrency`` clients send ``body`` back to back for ``seconds``; latencies and wall time."""
    import httpx

    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 2)) as c:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await c.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout:.0f} s; see {log}")


def serve_side(label: str, command: list[str], port: int, name: str, scan: str, max_tokens: int,
               concurrency: list[int], seconds: float, log: Path, env: dict[str, str] | None = None) -> list[dict]:
    """Start one server (``env`` added to its environment), warm it up, load it at each concurrency, stop it."""
    import httpx

    rows = []
    with log.open("w") as handle:
        # a session of its own: `swift deploy` serves from a child process, which must stop with it
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**_env(), **(env or {})},
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        body = _body(name, scan, max_tokens)
        first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()
        answer = first["choices"][0]["message"]["content"]
        tokens = first.get("usage", {}).get("completion_tokens")
        for c in concurrency:  # warm-up: every batch shape once
            asyncio.run(_load(url, body, c, 0.1))
        for c in concurrency:
            cpu = _server_cpu_s(process.pid)
            latencies, wall = asyncio.run(_load(url, body, c, seconds))
            rows.append({
                "side": label, "concurrency": c, "requests": len(latencies),
                "requests_per_s": len(latencies) / wall,
                "p50_ms": 1000 * statistics.median(latencies),
                "p95_ms": 1000 * statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else float("nan"),
                "cpu_ms_per_request": 1000 * (_server_cpu_s(process.pid) - cpu) / max(len(latencies), 1),
                "answer": answer, "completion_tokens": tokens,
            })
            print(f"  {label:<24} concurrency {c}: {rows[-1]['requests_per_s']:6.2f} req/s  "
                  f"p50 {rows[-1]['p50_ms']:6.0f} ms  p95 {rows[-1]['p95_ms']:6.0f} ms  "
                  f"server CPU {rows[-1]['cpu_ms_per_request']:5.0f} ms/request", flush=True)
    finally:
        _stop_group(process)
    return rows


def _server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a server and its child processes: what it spends per
    request, which other jobs on a shared machine change far less than its latency."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a server started in a session of its own, with every process of its group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # children still shutting down after the parent left
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)


# --- report ------------------------------------------------------------------------------------------------------
def _median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def training_table(runs: dict[tuple[str, bool], list[dict]]) -> list[str]:
    lines = ["| side | packing | runs | samples/s (median) | tokens/s | peak RSS GiB | ours / ms-swift |",
             "|---|---|---|---|---|---|---|"]
    theirs = runs.get(("ms-swift", False), [])
    base = _median(theirs, "samples_per_s")
    for (side, packing), group in runs.items():
        ok = [r for r in group if "error" not in r]
        if not ok:
            lines.append(f"| {side} | {packing} | 0 | refused: {group[0]['error'][:120]} | - | - | - |")
            continue
        sps = _median(ok, "samples_per_s")
        spread = f" ({min(r['samples_per_s'] for r in ok):.2f}–{max(r['samples_per_s'] for r in ok):.2f})"
        ratio = f"{sps / base:.2f}" if side == "citrus-v" and base == base else "-"
        lines.append(f"| {side} | {packing} | {len(ok)} | {sps:.2f}{spread} | {_median(ok, 'tokens_per_s'):.0f} | "
                     f"{_median(ok, 'peak_gib'):.2f} | {ratio} |")
    return lines


def paired_ratios(runs: dict[tuple[str, bool], list[dict]], packing: bool) -> list[float]:
    """ours/theirs of run i of each side. Unpacked, run i of each side ran back to back (load drift hits both
    alike); packed, the reference is ms-swift's unpacked run i (ms-swift packs only with flash-attn)."""
    theirs = [r for r in runs.get(("ms-swift", False), []) if "error" not in r]
    ours = runs.get(("citrus-v", packing), [])
    return [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(theirs, ours, strict=False) if "error" not in b]


SWIFT_DEFAULT = "ms-swift (max_batch_size 1, default)"
SWIFT_BATCHED = "ms-swift (max_batch_size 8)"
OURS = "citrus-v (max_batch_size 8, default)"


def serving_medians(rows: list[dict]) -> list[dict]:
    """One row per server and concurrency: the median over the rounds of requests/s, p50 and p95."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["side"], r["concurrency"]), []).append(r)
    return [
        {"side": side, "concurrency": c, "rounds": len(group),
         **{k: statistics.median(r[k] for r in group)
            for k in ("requests_per_s", "p50_ms", "p95_ms", "cpu_ms_per_request")}}
        for (side, c), group in groups.items()
    ]


def serving_table(rows: list[dict]) -> list[str]:
    """Medians over the rounds, with ours against ms-swift's default and against its own batching."""
    lines = ["| server | concurrency | rounds | requests/s | p50 ms | p95 ms | server CPU ms/request | "
             "ours / ms-swift default | ours / ms-swift batch 8 |", "|---|---|---|---|---|---|---|---|---|"]
    medians = serving_medians(rows)
    by = {(r["side"], r["concurrency"]): r for r in medians}
    for r in medians:
        ratios = ["-", "-"]
        if r["side"] == OURS:
            for i, base in enumerate((SWIFT_DEFAULT, SWIFT_BATCHED)):
                other = by.get((base, r["concurrency"]))
                if other:
                    ratios[i] = f"{r['requests_per_s'] / other['requests_per_s']:.2f}"
        lines.append(f"| {r['side']} | {r['concurrency']} | {r['rounds']} | {r['requests_per_s']:.2f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['cpu_ms_per_request']:.0f} | {ratios[0]} | "
                     f"{ratios[1]} |")
    return lines


def round_ratios(rows: list[dict]) -> dict[int, list[dict]]:
    """Per concurrency, each round's ours / ms-swift batch 8 (requests/s) and both p95s: the servers of one
    round ran minutes apart, under much the same load."""
    out: dict[int, list[dict]] = {}
    for r in rows:
        if r["side"] != OURS:
            continue
        theirs = next((t for t in rows if t["side"] == SWIFT_BATCHED and t["concurrency"] == r["concurrency"]
                       and t["round"] == r["round"]), None)
        if theirs:
            out.setdefault(r["concurrency"], []).append({
                "round": r["round"], "ratio": r["requests_per_s"] / theirs["requests_per_s"],
                "p95_ours_ms": r["p95_ms"], "p95_theirs_ms": theirs["p95_ms"]})
    return out


def swift_threads(choice: str) -> int | None:
    """The torch threads ms-swift's servers get: ``same`` as ``citrus-v deploy`` sets, ``default`` (torch's own:
    ``None``), or a number."""
    if choice == "default":
        return None
    if choice == "same":
        from citrus_v.serve.threads import default_num_threads

        return default_num_threads("cpu")
    if not choice.isdigit() or int(choice) < 1:
        raise SystemExit(f"--swift_threads {choice!r}: give same, default or a number of threads of at least 1")
    return int(choice)


def run_serving(args: argparse.Namespace, qwen: Path, citrus: Path, dataset: Path, work: Path) -> dict:
    """Every server at every concurrency, ``args.serve_rounds`` times; the table and the figures."""
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.serve_rounds < 1:
        raise SystemExit(f"--serve_rounds {args.serve_rounds}: give at least 1")
    scan = _scan_url(dataset)
    threads = swift_threads(args.swift_threads)
    swift_env = {} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"\nServing: one 224-px scan + question, max_tokens {args.max_tokens}, temperature 0, "
          f"{args.serve_seconds:g} s per concurrency, {args.serve_rounds} round(s); ms-swift's torch threads: "
          f"{threads or 'torch default'}", flush=True)

    def swift(port: int, extra: list[str]) -> list[str]:
        return [str(VENV / "bin" / "swift"), "deploy", "--model", str(qwen), "--model_type", "qwen2_5_vl",
                "--template", "qwen2_5_vl", "--infer_backend", "transformers", "--torch_dtype", "float32",
                "--host", "127.0.0.1", "--port", str(port), "--served_model_name", "tiny", *extra]

    def ours(port: int) -> list[str]:
        return [str(VENV / "bin" / "citrus-v"), "deploy", "--model", str(citrus), "--port", str(port),
                "--served_model_name", "tiny", "--log_level", "warning"]

    servers = [(SWIFT_DEFAULT, lambda port: swift(port, []), swift_env),
               (SWIFT_BATCHED, lambda port: swift(port, ["--max_batch_size", "8"]), swift_env),
               (OURS, ours, {})]
    rows: list[dict] = []
    for round_ in range(args.serve_rounds):
        for label, command, env in servers if round_ % 2 == 0 else servers[::-1]:
            port = _free_port()
            log = work / f"serve_{round_}_{len(rows)}.log"
            measured = serve_side(label, command(port), port, "tiny", scan, args.max_tokens, concurrency,
                                  args.serve_seconds, log, env)
            rows += [{**r, "round": round_} for r in measured]
    print("\n".join(serving_table(rows)))
    ratios = round_ratios(rows)
    for c, per_round in ratios.items():
        print(f"ours / ms-swift batch 8 at concurrency {c}, per round: "
              + ", ".join(f"{r['ratio']:.2f} (p95 {r['p95_ours_ms']:.0f} vs {r['p95_theirs_ms']:.0f} ms)"
                          for r in per_round))
    same = len({r["answer"] for r in rows}) == 1
    print(f"greedy answers identical on all servers: {same}")
    return {"serving": rows, "serving_medians": serving_medians(rows), "serving_round_ratios": ratios,
            "serving_answers_identical": same, "swift_threads": threads}


# --- main --------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per training run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (alternating A B A B ...)")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch size of both trainers")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps of both trainers")
    parser.add_argument("--max_length", type=int, default=1024, help="longest sample, in tokens")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate (cosine schedule)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the weights, the data and both trainers")
    parser.add_argument("--loss_steps", type=int, default=5, help="first steps whose losses must agree")
    parser.add_argument("--loss_tolerance", type=float, default=0.01, help="largest allowed absolute loss gap")
    parser.add_argument("--serve_seconds", type=float, default=20.0, help="load time per server and concurrency")
    parser.add_argument("--serve_rounds", type=int, default=1,
                        help="times every server is measured (order reversed every other round); medians reported")
    parser.add_argument("--swift_threads", default="same",
                        help="torch threads of the ms-swift servers: 'same' as citrus-v deploy sets (all cores but "
                             "one), 'default' (torch's own, one per core) or a number")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated numbers of closed-loop clients")
    parser.add_argument("--max_tokens", type=int, default=32, help="max_tokens of every served request")
    parser.add_argument("--skip", choices=("train", "serve"), action="append", default=[],
                        help="leave out the training or the serving part (repeatable)")
    parser.add_argument("--work_dir", type=Path, default=PEER / "work",
                        help="where the checkpoints, data and logs of this run go (emptied first)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()

    if Path(sys.prefix).resolve() != VENV.resolve():
        versions = ensure_env()
        os.environ["PEER_SWIFT_VERSIONS"] = json.dumps(versions)
        os.execv(str(PEER_PYTHON), [str(PEER_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
    os.environ["HF_HUB_OFFLINE"] = "1"
    versions = json.loads(os.environ.get("PEER_SWIFT_VERSIONS") or json.dumps(ensure_env()))
    import torch

    started = time.perf_counter()
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = args.steps * args.batch * args.accumulation  # one pass, no epoch wrap
    qwen = write_qwen_checkpoint(work / "qwen2_5_vl_tiny", args.seed)
    citrus = work / "citrus_v_tiny"
    subprocess.run([str(VENV / "bin" / "citrus-v"), "build", "--mllm", str(qwen),
                    "--sam2", str(write_tiny_sam2(work / "sam2_tiny", args.seed)), "--out", str(citrus)],
                   check=True, capture_output=True, env=_env())
    dataset = write_dataset(work / "data", rows, args.seed)
    per_sample = tokens_per_sample(citrus, dataset)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {machine}; threads {torch.get_num_threads()}; load average at start {load:.2f}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"data: {rows} rows, {per_sample:.0f} tokens per row on average (64 image tokens), "
          f"batch {args.batch} x accumulation {args.accumulation}, {args.steps} steps, max_length {args.max_length}",
          flush=True)
    report: dict = {"versions": versions, "machine": machine, "tokens_per_sample": per_sample, "args": vars(args),
                    "load_average_start": load}

    if "train" not in args.skip:
        flags = common_flags(args.steps, args.batch, args.accumulation, args.max_length, args.learning_rate, args.seed)
        samples = args.steps * args.batch * args.accumulation
        runs: dict[tuple[str, bool], list[dict]] = {}
        for packing in (False, True):
            for repeat in range(args.repeats):
                for side, build, model in (("ms-swift", swift_command, qwen), ("citrus-v", ours_command, citrus)):
                    group = runs.setdefault((side, packing), [])
                    if group and "error" in group[0]:
                        continue  # refused once (e.g. packing needs flash-attn): the reason is recorded
                    out = work / f"train_{side}_{'packed' if packing else 'padded'}_{repeat}"
                    result = train_run(side, build(model, dataset, out, flags, packing), out, samples, per_sample)
                    group.append(result)
                    shown = result.get("error") or (
                        f"{result['samples_per_s']:.2f} samples/s, {result['tokens_per_s']:.0f} tokens/s, "
                        f"peak {result['peak_gib']:.2f} GiB, runtime {result['runtime_s']:.1f} s")
                    print(f"  {side:<8} packing={packing!s:<5} run {repeat + 1}: {shown}", flush=True)
        report["training"] = {f"{side}|{packing}": group for (side, packing), group in runs.items()}
        first_theirs = next((r for r in runs[("ms-swift", False)] if "losses" in r), None)
        first_ours = next((r for r in runs[("citrus-v", False)] if "losses" in r), None)
        if first_theirs and first_ours:
            report["loss_check"] = compare_losses(
                first_theirs["losses"], first_ours["losses"], args.loss_steps, args.loss_tolerance)
        rates = {p: loader_rate(citrus, dataset, args.batch, args.max_length, p) for p in (False, True)}
        report["loader_samples_per_s"] = {str(p): v for p, v in rates.items()}
        print("\nTraining (samples/s = samples / the trainer's train_runtime; median of the runs, range in brackets)")
        print("\n".join(training_table(runs)))
        for packing in (False, True):
            pairs = paired_ratios(runs, packing)
            if pairs:
                report[f"paired_ratios_packing_{packing}"] = pairs
                print(f"ours (packing={packing}) / ms-swift (no packing), per A B pair: "
                      + " ".join(f"{r:.2f}" for r in pairs) + f"; median {statistics.median(pairs):.2f}")
        check = report.get("loss_check")
        if check:
            print(f"loss curves, first {check['steps']} steps: largest gap {check['max_gap']:.4f} "
                  f"(tolerance {check['tolerance']}) -> {'agree' if check['agree'] else 'DIFFER'}")
            print("  ms-swift: " + " ".join(f"{v:.4f}" for v in check["theirs"]))
            print("  citrus-v: " + " ".join(f"{v:.4f}" for v in check["ours"]))
        for packing, rate in rates.items():
            step = _median([r for r in runs[("citrus-v", packing)] if "error" not in r], "samples_per_s")
            print(f"loader alone (packing={packing}): {rate:.1f} samples/s vs training {step:.2f} samples/s "
                  f"({rate / step:.0f}x headroom)")

    if "serve" not in args.skip:
        report.update(run_serving(args, qwen, citrus, dataset, work))

    report["total_s"] = time.perf_counter() - started
    report["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntotal {report['total_s'] / 60:.1f} min; load average at the end {report['load_average_end']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
