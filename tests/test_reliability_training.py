"""Training under faults: SIGKILL at random moments of a 2-process run, a full disk during a save, a corrupt
newest checkpoint. The promises: resuming always ends with the weights of an uninterrupted run; no folder that
``--resume_from_checkpoint latest`` would pick is ever half-written; a failed save stops every process with a
message and leaves the last complete checkpoint in place."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from citrus_v.train.checkpoints import STAGING_PREFIX, latest_checkpoint, list_checkpoints, verify_checkpoint
from tests.test_train import _write_dataset

CLI = [sys.executable, "-m", "citrus_v.cli", "sft"]
MAX_STEPS = 10


def _args(tiny_dir: Path, dataset: Path, out: Path) -> list[str]:
    return [
        "--model", str(tiny_dir), "--dataset", str(dataset), "--stage", "3", "--max_steps", str(MAX_STEPS),
        "--per_device_train_batch_size", "1", "--learning_rate", "1e-3", "--save_steps", "2", "--logging_steps", "1",
        "--report_to", "none", "--seed", "7", "--output_dir", str(out), "--gradient_checkpointing", "false",
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", **extra}
    return env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("faults-data"), 16)


@pytest.fixture(scope="module")
def straight(tiny_dir, dataset, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run that every faulted run is compared with."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    result = subprocess.run(
        [*CLI, *_args(tiny_dir, dataset, out)], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _assert_no_broken_checkpoint(out: Path) -> None:
    for folder in list_checkpoints(out):
        assert verify_checkpoint(folder) is None, f"{folder}: {verify_checkpoint(folder)}"


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once, as a pre-empted machine loses them all
    (torchrun's workers live in their own process groups, so killing the launcher's group is not enough)."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(tree, timeout=30)


def _kill_when(process: subprocess.Popen, out: Path, moment: str, rng: random.Random) -> str:
    """SIGKILL the whole process group at ``moment``; return what was on disk at that instant."""
    before = len(list_checkpoints(out))
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        staging = [p for p in out.glob(f"{STAGING_PREFIX}*") if p.is_dir()] if out.is_dir() else []
        grown = len(list_checkpoints(out)) > before
        if moment == "checkpoint write" and staging:
            break
        if moment == "between steps" and grown:
            break
        if moment == "during a step" and grown:
            time.sleep(rng.uniform(0.02, 0.25))
            break
        time.sleep(0.002)
    staging_now = sorted(p.name for p in out.glob(f"{STAGING_PREFIX}*")) if out.is_dir() else []
    _kill_tree(process)
    return f"{moment}: checkpoints {[p.name for p in list_checkpoints(out)]}, staging {staging_now}"


def test_sigkill_at_random_moments_then_resume_ends_with_the_uninterrupted_weights(
    tiny_dir, dataset, straight, tmp_path
):
    out = tmp_path / "killed"
    rng = random.Random(20240607)
    command = [*CLI, *_args(tiny_dir, dataset, out), "--resume_from_checkpoint", "latest"]
    moments = ["checkpoint write", "during a step", "between steps"]
    log = []
    for moment in moments:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True
        )
        log.append(_kill_when(process, out, moment, rng))
        assert not (out / "model.safetensors").exists(), f"the run finished before it was killed: {log}"
        _assert_no_broken_checkpoint(out)
    assert list_checkpoints(out), log
    # the newest checkpoint is damaged too (a torn write on another machine): resume falls back past it
    newest = list_checkpoints(out)[-1]
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {newest} is incomplete or corrupt (optimizer.pt has " in result.stderr, log
    assert "resuming from" in result.stderr
    expected, got = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    digests = {p.read_text() for p in (out / "ddp_digests").glob("rank*.txt")}
    assert len(digests) == 1, "the ranks' weights differ after the resumes"


FAIL_SAVE = '''
import errno, os
if os.environ.get("CITRUS_V_FAIL_SAVE") and os.environ.get("RANK") == "0":
    import torch
    _save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and os.environ["CITRUS_V_FAIL_SAVE"] in str(f):
            with open(f, "wb") as handle:  # a partial file, as a full disk leaves it
                handle.write(b"PK\\x03\\x04partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _save(obj, f, *args, **kwargs)

    torch.save = save
'''


def test_disk_full_during_a_save_stops_every_process_and_leaves_the_last_checkpoint(tiny_dir, dataset, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_SAVE)
    out = tmp_path / "full"
    path = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
    env = _env(CITRUS_V_FAIL_SAVE="checkpoint-4", PYTHONPATH=path)
    result = subprocess.run(
        [*CLI, *_args(tiny_dir, dataset, out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode != 0
    assert "saving checkpoint-4 failed: [Errno 28] No space left on device" in result.stderr, result.stderr[-3000:]
    assert "the last complete checkpoint is" in result.stderr and "checkpoint-2" in result.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(f"{STAGING_PREFIX}*")), "partial files were left behind"
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "damage",
    ["truncated weights", "garbled trainer state", "truncated optimizer", "no weights", "truncated rng state"],
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(straight, tmp_path, damage):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(straight / name, out / name)
    newest = out / "checkpoint-4"
    assert verify_checkpoint(newest) is None
    if damage == "truncated weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbled trainer state":
        (newest / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    elif damage == "truncated optimizer":
        (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:1000])
    elif damage == "no weights":
        (newest / "model.safetensors").unlink()
    else:
        rng_state = next(newest.glob("rng_state*.pth"))
        rng_state.write_bytes(rng_state.read_bytes()[:50])
    messages: list[str] = []
    assert latest_checkpoint(out, report=messages.append) == out / "checkpoint-2"
    assert len(messages) == 1 and str(newest) in messages[0] and "falling back" in messages[0], messages
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
