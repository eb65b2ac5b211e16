"""The scale benchmarks run end to end at a tiny size: ``bench/real_scale.py``, ``bench/gpu_step.py`` and
``bench/train_profile.py``.

Their real figures come from a quiet machine (7B dimensions) and a GPU; here each script runs as a user runs
it, in a subprocess, at the tiny preset's dimensions, and every figure it prints must be there and finite.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from citrus_v.checkpoint_layout import META_PREFIX, is_upstream_folder, stored_names, weight_files

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run_script(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCH / name), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def table(stdout: str) -> dict[str, list[str]]:
    """The markdown table rows the script printed: first cell -> the other cells."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 2 and cells[0] not in ("measure", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def number(text: str) -> float:
    return float(text.split()[0].replace(",", ""))


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_step
        import real_scale

        yield real_scale, gpu_step
    finally:
        sys.path.remove(str(BENCH))


def test_real_scale_writes_the_released_layout_and_reports_every_figure(tmp_path):
    report = tmp_path / "real.json"
    stdout = run_script(
        "real_scale.py", "--size", "tiny", "--work_dir", str(tmp_path / "work"), "--keep",
        "--bandwidth_mb", "128", "--json", str(report),
    )
    rows = table(stdout)
    expected = [
        "weights (bf16, upstream layout)", "CitrusV.from_pretrained", "load with processor and predictor",
        "peak resident memory", "peak resident / weights", "prefill (vision + prompt)", "decode (box answer)",
        "read bandwidth", "decode bound (bandwidth / LM bytes per token)", "decode / bound",
        "segmentation answer, our single pass", "segmentation answer, upstream's two passes",
        "single / two passes", "[SEG] embedding difference, single vs two passes",
    ]
    for measure in expected:
        assert measure in rows, f"{measure!r} not printed:\n{stdout}"
        value = number(rows[measure][0])
        assert math.isfinite(value) and value >= 0, f"{measure}: {rows[measure]}"
    assert number(rows["read bandwidth"][0]) > 0.1
    # both ways hand SAM 2 the same [SEG] embedding, up to bf16 rounding
    assert number(rows["[SEG] embedding difference, single vs two passes"][0]) < 0.1
    saved = json.loads(report.read_text())
    assert {row["measure"] for row in saved["rows"]} >= set(expected)

    # the folder it measured is the released layout: SAM 2 in Meta's names, video tensors and all
    folder = tmp_path / "work" / "citrus-v-tiny-upstream"
    assert is_upstream_folder(folder)
    names = stored_names(weight_files(folder))
    assert any(n.startswith(META_PREFIX + "memory_attention.") for n in names)
    assert "[SEG]" not in (folder / "tokenizer.json").read_text()  # upstream's loader adds it


def test_real_scale_refuses_a_model_that_would_not_fit(bench_modules, tmp_path, monkeypatch):
    real_scale, _ = bench_modules
    monkeypatch.setattr(real_scale, "available_memory", lambda: 12 * real_scale.GIB)
    with pytest.raises(SystemExit) as raised:
        real_scale.check_room("7b", int(18.3 * real_scale.GIB), tmp_path, int(15.9 * real_scale.GIB))
    assert str(raised.value).startswith("--size 7b: needs 18.3 GiB of memory, 12.0 GiB available")
    assert "run --size 3b" in str(raised.value)


def test_gpu_step_trains_and_serves_on_cpu_at_tiny_size(tmp_path):
    report = tmp_path / "gpu.json"
    stdout = run_script(
        "gpu_step.py", "--device", "cpu", "--size", "tiny", "--max_length", "512", "--steps", "2",
        "--serve_seconds", "2", "--peak_tflops", "1", "--json", str(report),
    )
    rows = table(stdout)
    assert "sdpa" in rows["attention"][0]  # no flash attention on a CPU, and it says so
    assert number(rows["training tokens/s"][0]) > 0
    assert math.isfinite(number(rows["MFU"][0]))
    for concurrency in (1, 8):
        served = rows[f"deploy, concurrency {concurrency}"][0]
        assert number(served) > 0, served
    saved = json.loads(report.read_text())
    assert 0 < saved["tokens"] <= 512
    assert all(math.isfinite(s) and s > 0 for s in saved["step_seconds"])
    assert [row["concurrency"] for row in saved["serving"]] == [1, 8]


def test_gpu_step_fits_the_layers_to_the_memory(bench_modules):
    _, gpu_step = bench_modules
    dims, gib = gpu_step.SIZES["7b"], gpu_step.GIB
    assert gpu_step.fit_layers(dims, 141 * gib, 12288) == dims.text_layers
    assert 0 < gpu_step.fit_layers(dims, 40 * gib, 12288) < dims.text_layers
    assert gpu_step.fit_layers(dims, 16 * gib, 12288) == 0
    assert gpu_step.peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert gpu_step.peak_for_name("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.peak_for_name("NVIDIA L40S") == 362.0
    assert gpu_step.peak_for_name("Tesla T4") is None


def test_train_profile_splits_a_step_by_kind_of_work(tmp_path, tiny_dir):
    """``bench/train_profile.py`` on the tiny preset and phantom rows: every kind of work has its time, the shares
    add up, and the LM head's matrix products are measured against the machine's own product."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_train import _write_dataset
    finally:
        sys.path.remove(str(ROOT / "tests"))
    dataset = _write_dataset(tmp_path / "data", 6)
    stdout = run_script("train_profile.py", "--model", str(tiny_dir), "--dataset", str(dataset), "--steps", "2",
                        "--batch", "2", "--packing", "false")
    rows = table(stdout)
    assert {"LM head matrix products", "LM loss (log-softmax, forward and backward)", "attention",
            "optimizer and zero_grad"} <= set(rows)
    assert sum(int(row[1].rstrip("%")) for row in rows.values() if row[1].endswith("%")) in range(97, 104)
    measured = next(line for line in stdout.splitlines() if line.startswith("LM head matrix products:"))
    achieved, peak = (float(value) for value in re.findall(r"([\d.]+) GFLOP/s", measured))
    assert 0 < achieved and 0 < peak


def test_train_profile_names_the_missing_model_and_the_fix(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(BENCH / "train_profile.py"), "--model", str(tmp_path / "none")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode != 0 and f"{tmp_path / 'none'} does not exist" in result.stderr
    assert "bench/peer_swift.py" in result.stderr


def test_volume_segment_times_both_ways_and_finds_the_same_masks(tiny_dir):
    """``bench/volume_segment.py`` on nibabel's NIfTI volume: both ways are timed, and a chunk per pass through
    SAM 2's image encoder draws the masks one frame per pass draws."""
    stdout = run_script("volume_segment.py", "--model", str(tiny_dir), "--repeats", "1", "--seg", "2")
    seconds = {
        name: float(re.search(rf"^{name}: ([\d.]+) s$", stdout, re.M).group(1))
        for name in ("one frame per pass", "a chunk per pass")
    }
    assert all(value > 0 for value in seconds.values())
    assert re.search(r"^speed-up: [\d.]+x$", stdout, re.M)
    differ, total = map(int, re.search(r"masks differ in (\d+) of (\d+) voxels", stdout).groups())
    assert total == 2 * 25 * 41 * 33 and differ <= total // 1000
