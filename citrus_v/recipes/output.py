"""The recipes' output folders: a recipe replaces a folder that already holds files only when told to."""

from __future__ import annotations

import shutil
from pathlib import Path


class OutputFolderError(FileExistsError):
    """An output folder already holds files and ``--overwrite`` was not given (or cannot be replaced)."""


def check_output_dir(folder: str | Path, overwrite: bool, option: str) -> Path:
    """Raise :class:`OutputFolderError` unless ``folder`` is absent, empty, or may be replaced (``overwrite``).

    ``option`` names the command-line option that chose the folder, for the message. Nothing is changed on
    disk, so a recipe can check all its folders before it deletes any of them.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"output folder {folder} is a file, not a folder: choose another {option}")
    if not (folder.is_dir() and any(folder.iterdir())):
        return folder
    if not overwrite:
        raise OutputFolderError(
            f"output folder {folder} already exists and holds files; "
            f"pass --overwrite to replace it, or choose another {option}"
        )
    if Path.cwd().resolve().is_relative_to(folder.resolve()):
        # replacing it would delete the folder the command runs in, and everything around it
        raise OutputFolderError(
            f"output folder {folder} holds the current directory, so it is not replaced even with --overwrite: "
            f"choose another {option}"
        )
    return folder


def prepare_output_dir(folder: str | Path, overwrite: bool, option: str) -> Path:
    """Check ``folder`` as :func:`check_output_dir` does, then leave it an empty folder: an old one that holds
    files is deleted first, which only happens with ``overwrite``."""
    folder = check_output_dir(folder, overwrite, option)
    if folder.is_dir() and any(folder.iterdir()):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
