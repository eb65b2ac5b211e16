"""Fitting the [SEG] point head on cached [SEG] states (citrus_v.train.point_head_fit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.recipes.tiny_base import split_by_task
from citrus_v.train.point_head_fit import PointFitError, PointFitOptions, run_point_fit, seg_point_targets


@pytest.fixture(scope="module")
def seg_rows(tmp_path_factory):
    """The 2-D and 3-D segmentation rows of a small corpus with two volumes and a clip, some about absent
    targets (no [SEG], no mask)."""
    out = tmp_path_factory.mktemp("fit-corpus")
    write_corpus(out, CorpusOptions(n=24, seed=7, volumes=2, clips=1, volume_absent_share=0.3))
    files = split_by_task(out / "train.jsonl")
    return [str(files["segmentation"]), str(files["segmentation-3d"])]


def test_targets_are_the_innermost_pixel_of_the_mask_and_of_a_volumes_largest_frame():
    square = np.zeros((64, 64), dtype=bool)
    square[10:31, 40:61] = True  # 21 x 21: its innermost pixel is its centre, (50, 20)
    target = seg_point_targets({"images": ["x.png"], "masks": [square]}, mask_size=64)
    assert target.tolist() == [[pytest.approx(50.5 / 64), pytest.approx(20.5 / 64)]]
    stack = np.zeros((5, 64, 64), dtype=bool)
    stack[1, 2:7, 2:7] = True  # small, top left
    stack[3, 30:51, 10:31] = True  # largest frame: centre (20, 40)
    target = seg_point_targets({"videos": ["v.nii.gz"], "masks": [stack]}, mask_size=64)
    assert target.tolist() == [[pytest.approx(20.5 / 64), pytest.approx(40.5 / 64)]]
    empty = seg_point_targets({"images": ["x.png"], "masks": [np.zeros((64, 64), dtype=bool)]}, mask_size=64)
    assert torch.isnan(empty).all()


def test_run_point_fit_fits_the_head_alone_and_says_what_it_did(tmp_path, tiny_dir, seg_rows):
    options = PointFitOptions(epochs=200, held_out=0.25, learning_rate=3e-3)
    result = run_point_fit(tiny_dir, seg_rows, tmp_path / "fitted", options)
    lines = sum(len(open(path).read().splitlines()) for path in seg_rows)
    # every row is used or counted: the absent targets' rows have no mask
    assert result.rows + sum(result.skipped.values()) == lines and result.skipped.get("no_mask", 0) > 0
    assert result.states > 0 and result.held_out_states > 0
    # the random head's points move towards their targets, on the states it fitted and on those held out
    assert result.error_px_after < 0.6 * result.error_px_before
    assert result.held_out_error_px_after < result.held_out_error_px_before
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "fitted" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("seg_point_head.mlp.") for name in changed)
    assert any(name.startswith("seg_point_head.running_") for name in before)  # the statistics stay
    log = [json.loads(line) for line in (tmp_path / "fitted" / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 201)) and log[-1]["point"] < log[0]["point"]
    assert json.loads((tmp_path / "fitted" / "point_fit.json").read_text())["states"] == result.states
    from citrus_v.infer import CitrusVPredictor
    from citrus_v.train.checkpoints import check_manifest

    # a checksum manifest of the fitted files, and none of a training run's records
    assert (tmp_path / "fitted" / "checkpoint_manifest.json").is_file() and check_manifest(tmp_path / "fitted") is None

    CitrusVPredictor.from_pretrained(tmp_path / "fitted")  # a complete checkpoint: model and processor


def test_run_point_fit_refuses_what_it_cannot_fit(tmp_path, tiny_dir, seg_rows):
    no_seg = tmp_path / "no_seg.jsonl"
    no_seg.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
        + "\n"
    )
    with pytest.raises(PointFitError, match=r"no row of .*no_seg\.jsonl has a \[SEG\]"):
        run_point_fit(tiny_dir, [str(no_seg)], tmp_path / "a")
    with pytest.raises(PointFitError, match=r"#5: the fit takes every row of a file once"):
        run_point_fit(tiny_dir, [f"{seg_rows[0]}#5"], tmp_path / "a")
    # a row with two masks for its one [SEG] is counted, not fitted on; the others are
    lines = Path(seg_rows[0]).read_text().splitlines()
    row = json.loads(next(line for line in lines if "[SEG]" in line))
    row["masks"] = row["masks"] * 2
    mixed = Path(seg_rows[0]).with_name("mixed.jsonl")
    mixed.write_text(json.dumps(row) + "\n" + "\n".join(lines[:3]) + "\n")
    result = run_point_fit(tiny_dir, [str(mixed)], tmp_path / "b", PointFitOptions(epochs=1, held_out=0.0))
    with_masks = sum(1 for line in lines[:3] if json.loads(line).get("masks"))
    assert result.rows == with_masks and sum(result.skipped.values()) == 1 + 3 - with_masks, result.skipped


def test_run_point_fit_refuses_a_checkpoint_without_a_point_head(tmp_path, tiny_dir, seg_rows):
    import shutil

    from citrus_v.modeling import CitrusV

    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)  # the processor's files
    model = CitrusV.from_pretrained(tiny_dir)
    model.config.seg_point_head, model.seg_point_head = False, None
    model.save_pretrained(plain)
    with pytest.raises(PointFitError, match=r"has no point head \(config.seg_point_head is false\)"):
        run_point_fit(plain, seg_rows, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
