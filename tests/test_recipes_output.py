"""The recipes' output folders: one that holds files is replaced only with ``--overwrite``."""

from __future__ import annotations

import pytest

from citrus_v.cli import main
from citrus_v.recipes.output import OutputFolderError, check_output_dir, prepare_output_dir
from citrus_v.recipes.tiny_base import BaseRecipe, make_base, write_base


def _old_run(folder):
    (folder / "sub").mkdir(parents=True)
    (folder / "report.md").write_text("old")
    (folder / "sub" / "keep.txt").write_text("old")
    return folder


def test_a_missing_or_empty_folder_is_used_as_it_is(tmp_path):
    assert prepare_output_dir(tmp_path / "a" / "b", overwrite=False, option="--out").is_dir()
    (tmp_path / "empty").mkdir()
    assert prepare_output_dir(tmp_path / "empty", overwrite=False, option="--out").is_dir()


def test_a_folder_with_files_is_refused_and_kept(tmp_path):
    folder = _old_run(tmp_path / "demo_out")
    with pytest.raises(OutputFolderError) as err:
        prepare_output_dir(folder, overwrite=False, option="--out")
    message = str(err.value)
    assert str(folder) in message
    assert "pass --overwrite to replace it, or choose another --out" in message
    assert (folder / "report.md").read_text() == "old" and (folder / "sub" / "keep.txt").read_text() == "old"


def test_overwrite_replaces_the_folder(tmp_path):
    folder = _old_run(tmp_path / "demo_out")
    assert prepare_output_dir(folder, overwrite=True, option="--out") == folder
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_file_or_the_current_directory_is_never_replaced(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        prepare_output_dir(tmp_path / "file", overwrite=True, option="--out")
    folder = _old_run(tmp_path / "run")
    monkeypatch.chdir(folder / "sub")
    with pytest.raises(OutputFolderError, match="holds the current directory"):
        prepare_output_dir(folder, overwrite=True, option="--out")
    assert (folder / "sub" / "keep.txt").is_file()


def test_the_demo_command_refuses_before_it_trains(tmp_path, capsys):
    folder = _old_run(tmp_path / "demo_out")
    assert main(["demo", "--fast", "--out", str(folder)]) == 1
    error = capsys.readouterr().err
    assert f"citrus-v demo: output folder {folder}" in error and "pass --overwrite" in error
    assert (folder / "report.md").read_text() == "old"


def test_the_demo_command_passes_overwrite_on(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("citrus_v.recipes.demo.run_demo", lambda out, **kwargs: seen.update(out=out, **kwargs))
    assert main(["demo", "--out", str(tmp_path / "x"), "--overwrite"]) == 0
    assert seen["out"] == str(tmp_path / "x") and seen["overwrite"] is True
    assert main(["demo", "--out", str(tmp_path / "x")]) == 0
    assert seen["overwrite"] is False


def test_make_base_checks_both_folders_before_it_deletes_either(tmp_path):
    out, work = _old_run(tmp_path / "base"), _old_run(tmp_path / "base-work")
    with pytest.raises(OutputFolderError, match="choose another --make-base folder"):
        make_base(out, recipe=BaseRecipe(images=2))
    assert (out / "report.md").is_file() and (work / "report.md").is_file()
    # a clean output folder but an old work folder: still refused, the work folder kept
    fresh = tmp_path / "fresh"
    _old_run(tmp_path / "fresh-work")
    with pytest.raises(OutputFolderError, match="fresh-work"):
        make_base(fresh, recipe=BaseRecipe(images=2))
    assert (tmp_path / "fresh-work" / "report.md").is_file() and not fresh.exists()
    check_output_dir(out, overwrite=True, option="--make-base folder")  # allowed, and nothing deleted by a check
    assert (out / "report.md").is_file()


def test_write_base_replaces_an_old_base_only_with_overwrite(tmp_path):
    run = tmp_path / "stage"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "logging.jsonl").write_text("")  # a run record: not copied into the base
    out = _old_run(tmp_path / "base")
    with pytest.raises(OutputFolderError):
        write_base(out, {"stage2": run}, BaseRecipe(), {})
    assert (out / "report.md").is_file()
    write_base(out, {"stage2": run}, BaseRecipe(), {}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "recipe"]
