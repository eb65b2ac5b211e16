"""The `citrus-v` entry point: help, version, pending subcommands, the smallest demo, offline use."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from citrus_v import __version__

from .conftest import NetworkBlocked


def _citrus_v(*args: str, **kwargs) -> subprocess.CompletedProcess:
    executable = shutil.which("citrus-v") or os.path.join(os.path.dirname(sys.executable), "citrus-v")
    return subprocess.run([executable, *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_help_lists_every_subcommand():
    result = _citrus_v("--help")
    assert result.returncode == 0
    for name in ("build", "data", "sft", "infer", "deploy", "app", "eval", "demo"):
        assert name in result.stdout


def test_version():
    result = _citrus_v("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"citrus-v {__version__}"


def test_unknown_arguments_are_refused():
    result = _citrus_v("build", "--preset", "tiny", "--out", "x", "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = _citrus_v("demo", "--fast", "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "citrus-v deploy --model" in result.stdout and "citrus-v app --api" in result.stdout
    # stages 3-4 start from the shipped stage-1/2 checkpoint, as upstream's do from its stage-2 checkpoint
    assert "starting from the shipped tiny stage-1/2 checkpoint" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["targets"]) <= set(metrics["headline"])
    assert set(metrics["tasks"]) == {"seg", "det", "vqa", "report", "doc", "cot", "seg3d", "absent"}
    assert metrics["tasks"]["seg3d"]["overall"]["n"] > 0 and metrics["tasks"]["absent"]["overall"]["n"] > 0
    report = (out / "report.md").read_text()
    assert "## Quality bar" in report and "Dice per target" in report
    for task in ("seg", "det", "vqa", "report"):
        assert (out / "overlays" / f"{task}_0.png").stat().st_size > 0
    # volumes and clips: their bars, how each [SEG] met the frames, and a volume's and a clip's picture
    assert "## Volumes and clips" in report and "| 3-D mean Dice |" in report and "| false-mask rate" in report
    modes = [row["mode"] for row in json.loads((out / "propagation.json").read_text())]
    assert modes[0] in ("memory", "per_frame") and modes == [row["mode"] for row in metrics["propagation"]]
    for kind in ("volume", "clip"):
        assert f"![seg3d_{kind}_0](overlays/seg3d_{kind}_0.png)" in report
        assert (out / "overlays" / f"seg3d_{kind}_0.png").stat().st_size > 0
    stage4 = json.loads((out / "checkpoint" / "sft_args.json").read_text())
    assert any("segmentation-3d" in entry for entry in stage4["dataset"]) and stage4["presence_loss_weight"] == 1.0
    # one contact sheet of the segmentation and detection pictures, shown in the report
    from PIL import Image

    with Image.open(out / "overlays.png") as sheet:
        assert sheet.height >= 224 and sheet.width >= 448
    assert "![overlays](overlays.png)" in report
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert (out / "loss_stage3.png").is_file() and (out / "loss_stage4.png").is_file()


def test_the_network_guard_is_active():
    # every test runs under this guard, so building and loading models above used no network
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("93.184.216.34", 443), timeout=1)
