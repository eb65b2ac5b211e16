"""Model names a user may give instead of a folder: the checkpoints shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from .files import CheckpointError

# the tiny stage-1/2 checkpoint the demo starts from (made by `citrus-v demo --make_base`); it knows the
# synthetic phantoms only
SHIPPED_MODELS: dict[str, Path] = {"tiny-base": Path(__file__).resolve().parent.parent / "weights" / "tiny-base"}


def resolve_model(name_or_path: str | Path) -> Path:
    """The folder of a model given by a shipped name (``tiny-base``) or a local folder path.

    Raises :class:`CheckpointError` naming the shipped models and their folders when neither fits.
    """
    text = str(name_or_path)
    if text in SHIPPED_MODELS:
        folder = SHIPPED_MODELS[text]
        if not folder.is_dir():
            raise CheckpointError(
                f"the shipped model {text!r} is missing from this installation (expected at {folder}). Fix: "
                "reinstall the package with its data files, or rebuild it with `citrus-v demo --make_base DIR`"
            )
        return folder
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    shipped = "; ".join(f"{name} ({folder})" for name, folder in SHIPPED_MODELS.items())
    raise CheckpointError(
        f"{text} is not a folder: Citrus-V loads local model folders only (nothing is downloaded). Fix: give the "
        f"folder written by `citrus-v build`, training or the released weights, or a shipped model: {shipped}"
    )
