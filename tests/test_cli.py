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
from citrus_v.cli import COMMANDS, PENDING, main

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


@pytest.mark.parametrize("name", sorted(set(PENDING) - set(COMMANDS)))
def test_pending_subcommands_name_their_issue_and_fail(name, capsys):
    assert main([name, "--model", "x"]) == 3
    err = capsys.readouterr().err
    assert f"citrus-v {name}: not available" in err and "issue (#" in err


def test_demo_runs_end_to_end(tmp_path):
    result = _citrus_v("demo", "--steps", "3", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and set(metrics["dice"]) == {"lesion", "organ"}
    assert (tmp_path / "demo" / "overlay_lesion.png").stat().st_size > 0
    assert (tmp_path / "demo" / "checkpoint" / "model.safetensors").is_file()


def test_the_network_guard_is_active():
    # every test runs under this guard, so building and loading models above used no network
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("93.184.216.34", 443), timeout=1)
