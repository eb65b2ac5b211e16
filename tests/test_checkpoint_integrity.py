"""Checkpoints under a full disk and silent corruption (single process, in-process runs of the tiny model).

The promises: whatever the writer raises while a checkpoint or the final model is written (safetensors'
``SafetensorError``, torch's ``RuntimeError``, ``OSError(ENOSPC)``, or a real full file system), the run stops
with one message naming the folder and its free space, no staging folder stays behind, ``latest`` is the last
complete checkpoint and ``output_dir`` holds no ``config.json`` without weights; a file changed in place (same
size) is caught by the manifest's SHA-256 on resume. After each refusal a run succeeds.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

from citrus_v.train.arguments import SftArguments
from citrus_v.train.checkpoints import (
    MANIFEST_FILE,
    STAGING_PREFIX,
    CheckpointSaveError,
    check_manifest,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from citrus_v.train.sft import run_sft
from tests.test_train import _write_dataset

ENOSPC_TEXT = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("integrity-data"), 8)


def _args(tiny_dir: Path, dataset: Path, out: Path, max_steps: int = 2, resume: str | None = None) -> SftArguments:
    return SftArguments(
        model=str(tiny_dir), dataset=[str(dataset)], output_dir=str(out), stage=3, max_steps=max_steps,
        per_device_train_batch_size=2, save_strategy="steps", save_steps=1, logging_steps=1, max_length=1024,
        report_to=["none"], dataloader_num_workers=0, resume_from_checkpoint=resume, seed=7,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_dir, dataset, tmp_path_factory) -> Path:
    """A complete 2-step run with checkpoints 1 and 2 and the final model."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    run_sft(_args(tiny_dir, dataset, out))
    return out


def _copy_checkpoints(run: Path, out: Path) -> None:
    out.mkdir()
    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(run / name, out / name)


def _flip_bytes(path: Path) -> None:
    """Invert 64 bytes in the middle of the file: same size, headers untouched."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _assert_finished(out: Path) -> None:
    """The run ended with a complete final model and nothing staged."""
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / MANIFEST_FILE).is_file() and check_manifest(out) is None
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


def test_every_saved_file_is_in_the_manifest(run):
    """Each checkpoint's manifest lists every other file of it; the final model's lists the model's files."""
    import json

    for folder in list_checkpoints(run):
        listed = set(json.loads((folder / MANIFEST_FILE).read_text())["files"])
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert listed == on_disk - {MANIFEST_FILE} and "optimizer.pt" in listed, folder
        assert verify_checkpoint(folder) is None
    final = set(json.loads((run / MANIFEST_FILE).read_text())["files"])
    assert {"config.json", "model.safetensors", "sft_args.json"} <= final
    assert not any(name.startswith("checkpoint-") or name == "logging.jsonl" for name in final)
    assert check_manifest(run) is None


def _failing_writer(monkeypatch, kind: str, where: str) -> None:
    """Make the writer fail as a full disk does, with the exception type it really raises, for paths that
    contain ``where``: a partial file is left, as a full disk leaves it."""
    import torch
    import transformers.modeling_utils as modeling_utils

    def partial(path) -> None:
        Path(path).write_bytes(b"\x00" * 100)

    if kind == "SafetensorError":
        real = modeling_utils.safe_save_file

        def save_file(tensors, filename, metadata=None):
            if where in str(filename):
                partial(filename)
                raise SafetensorError(ENOSPC_TEXT)
            return real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
        return
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if where in str(f):
            partial(f)
            if kind == "RuntimeError":
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                    "PytorchStreamWriter failed writing file data/0: file write failed"
                )
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("kind", ["SafetensorError", "RuntimeError", "OSError"])
def test_a_writer_failure_during_a_checkpoint_gives_one_message_and_a_resume_succeeds(
    tiny_dir, dataset, tmp_path, monkeypatch, kind
):
    out = tmp_path / "run"
    _failing_writer(monkeypatch, kind, where="checkpoint-2")
    with pytest.raises(CheckpointSaveError) as caught:
        run_sft(_args(tiny_dir, dataset, out))
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith("saving checkpoint-2 failed: "), message
    assert {"RuntimeError": "file write failed", "OSError": "[Errno 28]"}.get(kind, "StorageFull") in message
    assert f"{out} has " in message and " MiB free of " in message, message
    assert f"the last complete checkpoint is {out / 'checkpoint-1'} (" in message and " MiB). " in message, message
    assert not list(out.glob(f"{STAGING_PREFIX}*")), "the staging folder was left behind"
    assert latest_checkpoint(out) == out / "checkpoint-1"
    assert not (out / "config.json").exists()

    monkeypatch.undo()  # the disk has room again
    run_sft(_args(tiny_dir, dataset, out, resume="latest"))
    _assert_finished(out)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


def test_a_failed_final_save_leaves_no_config_without_weights(tiny_dir, dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _failing_writer(monkeypatch, "SafetensorError", where=f"{STAGING_PREFIX}final")
    with pytest.raises(CheckpointSaveError) as caught:
        run_sft(_args(tiny_dir, dataset, out, max_steps=1))
    message = str(caught.value)
    assert message.startswith(f"saving the final model into {out} failed: {ENOSPC_TEXT}"), message
    assert " MiB free of " in message and f"checkpoint is {out / 'checkpoint-1'}" in message, message
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    assert verify_checkpoint(out / "checkpoint-1") is None

    monkeypatch.undo()
    run_sft(_args(tiny_dir, dataset, out, max_steps=1, resume="latest"))
    _assert_finished(out)


def test_same_size_corruption_is_caught_and_latest_falls_back(run, tiny_dir, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    _copy_checkpoints(run, out)
    weights = out / "checkpoint-2" / "model.safetensors"
    size = weights.stat().st_size
    _flip_bytes(weights)
    assert weights.stat().st_size == size
    problem = verify_checkpoint(out / "checkpoint-2")
    assert problem is not None and problem.startswith("model.safetensors is corrupt: its sha256 is "), problem
    assert "the manifest records " in problem and f"(same size, {size} bytes)" in problem, problem
    # the structural checks alone (a folder without a manifest) would have loaded it
    (out / "checkpoint-2" / MANIFEST_FILE).rename(tmp_path / "manifest.json")
    assert verify_checkpoint(out / "checkpoint-2") is None
    (tmp_path / "manifest.json").rename(out / "checkpoint-2" / MANIFEST_FILE)

    capsys.readouterr()
    run_sft(_args(tiny_dir, dataset, out, resume="latest"))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "incomplete or corrupt" in line]
    assert len(warnings) == 1, err[-3000:]
    assert f"checkpoint {out / 'checkpoint-2'} is incomplete or corrupt (model.safetensors is corrupt" in warnings[0]
    assert warnings[0].endswith("falling back to the one before it")
    assert f"resuming from {out / 'checkpoint-1'}" in err
    _assert_finished(out)
    assert verify_checkpoint(out / "checkpoint-2") is None  # rewritten by the resumed run


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncated optimizer", "optimizer.pt has 1000 bytes, the manifest records "),
        ("same-size weights", "model.safetensors is corrupt: its sha256 is "),
        ("missing weights", "model.safetensors is missing (the manifest records "),
        ("not a checkpoint", "not a folder"),
    ],
)
def test_an_explicit_resume_from_a_broken_folder_says_what_is_broken(
    run, tiny_dir, dataset, tmp_path, capsys, damage, expected
):
    from citrus_v.cli import main

    out = tmp_path / "run"
    _copy_checkpoints(run, out)
    broken = out / "checkpoint-2"
    if damage == "truncated optimizer":
        (broken / "optimizer.pt").write_bytes((broken / "optimizer.pt").read_bytes()[:1000])
    elif damage == "same-size weights":
        _flip_bytes(broken / "model.safetensors")
    elif damage == "missing weights":
        (broken / "model.safetensors").unlink()
    else:
        broken = out / "checkpoint-9"
    common = ["sft", "--model", str(tiny_dir), "--dataset", str(dataset), "--output_dir", str(out), "--stage", "3",
              "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_steps", "1", "--report_to", "none",
              "--max_length", "1024", "--dataloader_num_workers", "0"]  # fmt: skip
    capsys.readouterr()
    assert main([*common, "--resume_from_checkpoint", str(broken)]) == 1
    err = capsys.readouterr().err
    refusal = [line for line in err.splitlines() if line.startswith("citrus-v sft: ")]
    assert len(refusal) == 1 and "Traceback" not in err, err[-3000:]
    assert f"--resume_from_checkpoint {broken}: not a complete, intact checkpoint: {expected}" in refusal[0]
    if damage == "not a checkpoint":  # then an explicit resume from an intact checkpoint trains to the end
        assert main([*common, "--resume_from_checkpoint", str(out / "checkpoint-1")]) == 0
        _assert_finished(out)


def _mount_tmpfs(folder: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes on ``folder``; the reason when this machine does not allow it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    return None if result.returncode == 0 else f"mount -t tmpfs failed: {result.stderr.strip()}"


def test_a_real_full_disk(run, tiny_dir, dataset, tmp_path):
    """A tmpfs with room for one checkpoint and a half: checkpoint-2 meets a really full disk."""
    checkpoint = sum(p.stat().st_size for p in (run / "checkpoint-1").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, int(checkpoint * 1.5))
    if reason is not None:
        pytest.skip(f"no real full disk here: {reason}")
    try:
        out = disk / "run"
        with pytest.raises(CheckpointSaveError) as caught:
            run_sft(_args(tiny_dir, dataset, out))
        message = str(caught.value)
        assert message.startswith("saving checkpoint-2 failed: ") and "\n" not in message, message
        assert f"{out} has " in message and " MiB free of " in message, message
        assert f"the last complete checkpoint is {out / 'checkpoint-1'}" in message, message
        assert not list(out.glob(f"{STAGING_PREFIX}*"))
        assert latest_checkpoint(out) == out / "checkpoint-1"
        assert not (out / "config.json").exists()

        subprocess.run(["mount", "-o", f"remount,size={checkpoint * 6}", str(disk)], check=True)  # room again
        run_sft(_args(tiny_dir, dataset, out, resume="latest"))
        _assert_finished(out)
    finally:
        # lazily: the loaded run may still hold the checkpoint's files open (memory-mapped weights)
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_an_unwritable_log_warns_once_and_training_goes_on(tmp_path, capsys):
    from types import SimpleNamespace

    from citrus_v.train.callbacks import JsonlLoggerCallback

    callback = JsonlLoggerCallback(tmp_path)
    (tmp_path / "logging.jsonl").mkdir()  # appending to it fails with an OSError, as a full disk does
    for step in (1, 2):
        callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=step), None, logs={"loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("warning: cannot append to") == 1 and "from step 1" in err, err
    (tmp_path / "logging.jsonl").rmdir()
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=3), None, logs={"loss": 0.5})
    assert "writing again from step 3" in capsys.readouterr().err
    assert '"step": 3' in (tmp_path / "logging.jsonl").read_text()
