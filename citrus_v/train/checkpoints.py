"""A run's checkpoint folders: listing, verification, the checksum manifest, and moving a staged save into place.

- A checkpoint is complete when its config (or adapter config) and weights are there; staging folders
  (``.staging-N``) never are.
- Every file of a checkpoint gets its size and SHA-256 in ``checkpoint_manifest.json``, written last; resuming
  checks them, so a file changed in place (same size, other bytes) is caught, not loaded. A folder without a
  manifest (older runs, other tools) gets the structural checks alone: readable state, safetensors headers that
  fit their files, torch archives that open.
- Used by :class:`~citrus_v.train.trainer.CitrusVTrainer` (saving) and :mod:`citrus_v.train.sft` (resuming).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

STAGING_PREFIX = ".staging-"
STREAM_STATE_PREFIX = "stream_state_rank"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (staging folders are never complete)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. the disk is full); nothing half-written was left in place."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# torch.save files: zip archives whose central directory sits at the end, so a truncated one fails to open
ARCHIVE_PATTERNS = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin")


def _check_safetensors(path: Path) -> None:
    """The header parses and every tensor's bytes lie inside the file (a truncated file fails)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(handle.read(length))
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        raise ValueError(f"truncated: {size} bytes, tensors need {8 + length + max(ends, default=0)}")


MANIFEST_FILE = "checkpoint_manifest.json"
# files read once a model or checkpoint folder is complete: moved into place last, so they mark completeness
COMPLETION_MARKERS = ("config.json", "adapter_config.json")
_HASH_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hashlib releases the GIL, so several files hash in parallel threads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(files: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(files)))) as pool:
        return list(pool.map(file_sha256, files))


def write_manifest(folder: str | Path) -> Path:
    """Record the size and SHA-256 of every file under ``folder`` in its manifest (written after them all)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(files, _hash_files(files), strict=True)
    }
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"algorithm": "sha256", "files": entries}, indent=1) + "\n")
    return manifest


def check_manifest(folder: str | Path) -> str | None:
    """``None`` when every file the manifest lists has its recorded size and SHA-256, else the first file
    that does not, with what was expected and what was found. A folder without a manifest (written before
    manifests existed, or by another tool) passes here and gets the structural checks alone."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
        expected = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err})"
    for name, (size, _) in expected.items():  # sizes first: a truncated file is named without hashing
        found = folder / name
        if not found.is_file():
            return f"{name} is missing (the manifest records {size} bytes)"
        if found.stat().st_size != size:
            return f"{name} has {found.stat().st_size} bytes, the manifest records {size} (truncated or rewritten)"
    names = sorted(expected)
    for name, digest in zip(names, _hash_files([folder / n for n in names]), strict=True):
        if digest != expected[name][1]:
            return (
                f"{name} is corrupt: its sha256 is {digest[:16]}…, the manifest records {expected[name][1][:16]}… "
                f"(same size, {expected[name][0]} bytes)"
            )
    return None


def verify_checkpoint(path: str | Path) -> str | None:
    """``None`` when the checkpoint folder is complete and intact, else what is wrong with it.

    The manifest's sizes and checksums first (catching truncated and same-size corrupted files), then
    structural checks that also cover folders without a manifest: the trainer state is JSON with a step, the
    weights' safetensors headers fit their files, each torch archive opens.
    """
    import zipfile

    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    problem = check_manifest(path)
    if problem is not None:
        return problem
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            return "trainer_state.json holds no global_step"
    except (OSError, ValueError) as err:
        return f"trainer_state.json is unreadable ({err})"
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        return f"no weights ({' or '.join(WEIGHT_FILES)})"
    shards = [p for p in weights if p.suffix == ".safetensors"]
    for index in (p for p in weights if p.name.endswith(".index.json")):
        try:
            shards += [path / name for name in set(json.loads(index.read_text())["weight_map"].values())]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"{index.name} is unreadable ({err})"
    for shard in shards:
        try:
            _check_safetensors(shard)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            return f"{shard.name} is unreadable ({err})"
    for pattern in ARCHIVE_PATTERNS:
        for archive in path.glob(pattern):
            try:
                with zipfile.ZipFile(archive):
                    pass
            except (OSError, zipfile.BadZipFile) as err:
                return f"{archive.name} is unreadable ({err})"
    return None


def latest_checkpoint(output_dir: str | Path, report=None) -> Path | None:
    """The newest checkpoint that :func:`verify_checkpoint` accepts; broken newer ones are skipped and named.

    ``report`` (default: print to stderr) gets one line per skipped folder, saying what is wrong with it.
    """
    import sys

    def say_once(text: str) -> None:  # one line per run, not one per process
        if os.environ.get("RANK", "0") == "0":
            print(text, file=sys.stderr, flush=True)

    say = report or say_once
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        say(f"checkpoint {path} is incomplete or corrupt ({problem}); falling back to the one before it")
    return None


def fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself, so that a renamed checkpoint survives a crash of the machine."""
    for item in sorted(folder.rglob("*")):
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [*(p for p in folder.rglob("*") if p.is_dir()), folder]:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def free_space(folder: Path) -> str:
    """``"N MiB free of M MiB"`` on the file system holding ``folder`` (or its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as err:
        return f"unknown free space ({err})"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


def describe_error(error: BaseException | None) -> str:
    """An exception on one line (writers' messages may span several), with its type when it says nothing."""
    if error is None:
        return "it failed on another process"
    text = " ".join(str(error).split())
    return text if text else type(error).__name__


def seal(folder: Path) -> None:
    """Write the manifest of a complete folder, then flush it all to disk."""
    write_manifest(folder)
    fsync_tree(folder)


def move_into_place(staging: Path, out: Path) -> None:
    """Move a complete staged model into ``out``. ``config.json`` (``adapter_config.json`` for adapters) is
    removed first and moved in last, so that ``out`` never holds a config beside missing or older weights;
    weight files of an earlier save that the new one lacks (other shards) are removed."""
    staged = {item.name for item in staging.iterdir()}
    markers = [name for name in COMPLETION_MARKERS if name in staged]
    for name in markers:
        (out / name).unlink(missing_ok=True)
    for stale in out.glob("*.safetensors*"):
        if stale.is_file() and stale.name not in staged:
            stale.unlink()
    for item in sorted(staging.iterdir()):
        if item.name in markers:
            continue
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    for name in markers:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)
    descriptor = os.open(out, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
