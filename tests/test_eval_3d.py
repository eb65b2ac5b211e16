"""Scoring volumes and absent targets: ``seg3d`` (3-D Dice, HD95 in mm, volume error) on label NIfTI files
written here with a known voxel spacing, ``absent`` (false-mask rate per kind, with the [SEG]-emitted rate of the
present targets), and the report's quality bars. Predictions are hand-made mask stacks, as any backend gives them.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from citrus_v.data.rows import RowProblem
from citrus_v.eval.backends import ModelOutput
from citrus_v.eval.report import write_report
from citrus_v.eval.runner import parse_tasks, select
from citrus_v.eval.samples import ALL_TASKS, EvalDataError, EvalSample, row_eval_task, with_row_fields
from citrus_v.eval.scoring import score
from citrus_v.eval.summary import summarize
from citrus_v.eval.volume_references import check_volume_sample
from citrus_v.media import read_volume

# voxel size in mm along x (display columns), y (display rows) and z (frames): all different, so that an axis
# read with another axis's spacing gives another number
SPACING_XYZ = (0.7, 0.9, 2.5)
SHAPE_XYZ = (16, 20, 8)  # display stack: 8 frames of 20 rows x 16 columns
VOXEL_MM3 = 0.7 * 0.9 * 2.5


def _nifti(path: Path, data: np.ndarray, spacing=SPACING_XYZ) -> str:
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)
    return path.name


def _labels(**regions) -> np.ndarray:
    """A label volume (x, y, z voxel order) with ``label=(xs, ys, zs)`` slices set to the label."""
    data = np.zeros(SHAPE_XYZ, np.int16)
    for name, (xs, ys, zs) in regions.items():
        data[xs, ys, zs] = int(name.removeprefix("label"))
    return data


def _volume_sample(tmp_path: Path, truth: np.ndarray, masks: list[str], **kw) -> EvalSample:
    video = _nifti(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(40, 10, SHAPE_XYZ).astype(np.float32))
    _nifti(tmp_path / "labels.nii.gz", truth)
    return EvalSample(id=kw.pop("id", "vol-1"), task="seg3d", prompt="<video>Segment the liver.", images=[],
                      videos=[video], reference=masks, source="rows.jsonl:1", base_dir=tmp_path, **kw)


def _stack(tmp_path: Path, data: np.ndarray, name: str = "pred.nii.gz") -> np.ndarray:
    """A hand-made prediction: the foreground of a label volume on the display grid, as a backend gives it."""
    return read_volume(tmp_path / _nifti(tmp_path / name, data)).values > 0


def test_seg3d_dice_and_volume_error_match_hand_values(tmp_path):
    # truth: label 3 is 5 x 6 x 4 = 120 voxels; label 5, another organ, must not count
    truth = _labels(label3=(slice(4, 9), slice(5, 11), slice(2, 6)), label5=(slice(12, 15), slice(14, 18), slice(1, 3)))
    sample = _volume_sample(tmp_path, truth, ["labels.nii.gz#label=3"])
    check_volume_sample(sample)
    # the prediction covers the first 2 of the 4 slices: 60 voxels, all inside the truth
    half = _labels(label1=(slice(4, 9), slice(5, 11), slice(2, 4)))
    record = score(sample, ModelOutput("Sure, here is the liver [SEG].", masks=[_stack(tmp_path, half)]))

    assert record["spacing"] == pytest.approx([2.5, 0.9, 0.7])  # (between frames, row, column)
    assert record["reference"]["voxels"] == 120 and record["parsed"]["voxels"] == 60
    assert record["reference"]["frames"] == 4 and record["parsed"]["frames"] == 2
    assert record["reference"]["volume_ml"] == pytest.approx(120 * VOXEL_MM3 / 1000)  # 0.189 mL
    assert record["parsed"]["volume_ml"] == pytest.approx(60 * VOXEL_MM3 / 1000)
    scores = record["scores"]
    assert scores["dice"] == pytest.approx(2 * 60 / (60 + 120))
    assert scores["volume_error"] == pytest.approx(0.5)
    assert scores["seg_emitted"] == 1.0 and scores["hd95_defined"]

    exact = score(sample, ModelOutput("[SEG]", masks=[_stack(tmp_path, np.where(truth == 3, 1, 0).astype(np.int16))]))
    assert exact["scores"]["dice"] == 1.0 and exact["scores"]["volume_error"] == 0.0 and exact["scores"]["hd95"] == 0.0


@pytest.mark.parametrize(
    "truth_region,pred_region,expected_mm",
    [
        # one-slice plates two slices apart: every surface voxel is 2 x 2.5 mm from the other plate
        ((slice(4, 9), slice(5, 11), slice(2, 3)), (slice(4, 9), slice(5, 11), slice(4, 5)), 5.0),
        # rows 0-2 against rows 10-12 on one slice: distances 8, 9 and 10 rows of 0.9 mm, a third each: P95 = 9.0
        ((slice(4, 9), slice(0, 3), slice(3, 4)), (slice(4, 9), slice(10, 13), slice(3, 4)), 9.0),
        # the same along columns of 0.7 mm: P95 = 10 columns = 7.0 mm
        ((slice(0, 3), slice(5, 11), slice(3, 4)), (slice(10, 13), slice(5, 11), slice(3, 4)), 7.0),
    ],
)
def test_seg3d_hd95_is_in_millimetres_along_each_axis(tmp_path, truth_region, pred_region, expected_mm):
    sample = _volume_sample(tmp_path, _labels(label2=truth_region), ["labels.nii.gz#label=2"])
    record = score(sample, ModelOutput("[SEG]", masks=[_stack(tmp_path, _labels(label1=pred_region))]))
    assert record["scores"]["hd95"] == pytest.approx(expected_mm)
    assert record["scores"]["dice"] == 0.0 and record["scores"]["volume_error"] == pytest.approx(0.0)


def test_seg3d_joins_one_stack_per_seg_and_several_references(tmp_path):
    # "every lesion": two lesions, two labels, two [SEG]; the union is scored
    truth = _labels(label6=(slice(1, 4), slice(1, 4), slice(1, 3)), label7=(slice(9, 12), slice(9, 12), slice(4, 6)))
    sample = _volume_sample(tmp_path, truth, ["labels.nii.gz#label=6", "labels.nii.gz#label=7"])
    first = _stack(tmp_path, np.where(truth == 6, 1, 0).astype(np.int16), "a.nii.gz")
    record = score(sample, ModelOutput("lesion 1 [SEG], lesion 2 [SEG]", masks=[first, np.zeros_like(first)]))
    assert record["reference"]["num_masks"] == 2 and record["parsed"]["num_masks"] == 2
    assert record["scores"]["dice"] == pytest.approx(2 * 18 / (18 + 36))
    assert record["scores"]["volume_error"] == pytest.approx(0.5)


def test_seg3d_refuses_predictions_off_the_grid_and_masks_off_the_video(tmp_path):
    truth = _labels(label3=(slice(4, 9), slice(5, 11), slice(2, 6)))
    sample = _volume_sample(tmp_path, truth, ["labels.nii.gz#label=3"])
    stack = _stack(tmp_path, truth)
    with pytest.raises(ValueError, match=r"predicted mask 0 is \(20, 16\).*\(8, 20, 16\)"):
        score(sample, ModelOutput("[SEG]", masks=[stack[0]]))  # one 2-D mask for a volume
    with pytest.raises(ValueError, match="1 \\[SEG\\] but the backend returned no mask stack"):
        score(sample, ModelOutput("Sure, it is [SEG]."))
    # an answer without [SEG] and without mask is an empty prediction, not a failure
    assert score(sample, ModelOutput("I see no liver."))["scores"]["dice"] == 0.0

    _nifti(tmp_path / "small.nii.gz", np.ones((16, 20, 6), np.int16))
    wrong = _volume_sample(tmp_path, truth, ["small.nii.gz"], id="vol-2")
    with pytest.raises(EvalDataError, match=r"'vol-2'.*mask 0 is 6 frames of 20x16.*video is 8 frames of 20x16"):
        check_volume_sample(wrong)


def test_seg3d_on_a_clip_scores_dice_only(tmp_path):
    import av

    with av.open(str(tmp_path / "clip.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for k in range(6):
            frame = np.zeros((32, 48, 3), np.uint8)
            frame[8:20, 4 + 4 * k: 16 + 4 * k] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    labels = np.zeros((48, 32, 6), np.int16)  # x, y, frames: display stack 6 x 32 x 48
    labels[10:20, 10:20, :] = 1
    _nifti(tmp_path / "clip_labels.nii.gz", labels, (0.5, 0.5, 1.0))
    sample = EvalSample(id="clip-1", task="seg3d", prompt="<video>Segment the structure.", images=[],
                        videos=["clip.mp4"], reference=["clip_labels.nii.gz#label=1"], source="rows.jsonl:2",
                        base_dir=tmp_path)
    check_volume_sample(sample)
    truth = read_volume(tmp_path / "clip_labels.nii.gz").values > 0
    half = truth.copy()
    half[3:] = False
    record = score(sample, ModelOutput("[SEG]", masks=[half]))
    assert record["reference"]["kind"] == "clip"
    assert record["scores"]["dice"] == pytest.approx(2 / 3)
    assert record["scores"]["hd95"] is None and record["scores"]["volume_error"] is None
    assert record["parsed"]["volume_ml"] is None


def _row(task: str, answer: str, **extra) -> dict:
    return {"task": task, "messages": [{"role": "user", "content": "<video>Segment the liver."},
                                       {"role": "assistant", "content": answer}], **extra}


def test_rows_route_to_seg3d_and_absent_with_their_groups():
    seg3d = _row("segmentation", "Sure, here is the liver [SEG].", videos=["ct.nii.gz"],
                 masks=["labels.nii.gz#label=3"], meta={"target": "liver"})
    assert row_eval_task(seg3d, "seg") == "seg3d"
    sample = with_row_fields(EvalSample("a", "seg3d", "q", [], None, "f:1"), seg3d)
    assert sample.videos == ["ct.nii.gz"] and sample.reference == ["labels.nii.gz#label=3"]
    assert sample.groups["target"] == "liver"

    absent = _row("segmentation", "There is no liver in this scan.", videos=["chest.nii.gz"],
                  meta={"absent": True, "absent_kind": "out_of_field", "target": "liver"})
    assert row_eval_task(absent, "seg") == "absent"
    sample = with_row_fields(EvalSample("b", "absent", "q", [], "There is no liver in this scan.", "f:2"), absent)
    assert sample.groups == {"target": "liver", "absent_kind": "out_of_field"}
    assert sample.reference == {"target": "liver", "kind": "out_of_field", "asked": "segmentation",
                                "answer": "There is no liver in this scan."}

    # a 2-D row stays seg; a presence question that says "absent" stays a question
    assert row_eval_task({"images": ["a.png"], "messages": []}, "seg") == "seg"
    assert row_eval_task({"meta": {"absent": True}, "messages": []}, "vqa") == "vqa"
    with pytest.raises(RowProblem, match="2 \\[SEG\\] token\\(s\\) but 1 mask"):
        with_row_fields(EvalSample("c", "seg3d", "q", [], None, "f:3"),
                        _row("segmentation", "[SEG] and [SEG]", videos=["ct.nii.gz"], masks=["m.nii.gz"]))


def test_tasks_flag_takes_seg3d_and_absent():
    assert parse_tasks("seg3d,absent") == ["seg3d", "absent"]
    assert parse_tasks("all") == list(ALL_TASKS) and {"seg3d", "absent"} <= set(ALL_TASKS)
    with pytest.raises(EvalDataError, match="choose from seg, det, vqa, report, doc, cot, seg3d, absent or all"):
        parse_tasks("seg4d")
    samples = [EvalSample(f"{task}-{k}", task, "q", [], None, "f") for task in ("seg", "seg3d", "absent")
               for k in range(3)]
    assert [s.task for s in select(samples, ["seg3d", "absent"], 2, 0)] == ["seg3d"] * 2 + ["absent"] * 2


def _absent_record(kind: str, output: ModelOutput, k: int) -> dict:
    row = _row("segmentation", "There is no lesion in this scan.", videos=["ct.nii.gz"],
               meta={"absent": True, "absent_kind": kind, "target": "lesion"})
    sample = with_row_fields(EvalSample(f"absent-{k}", "absent", "q", [], "There is no lesion.", "f"), row)
    return score(sample, output)


def test_absent_false_mask_rate_per_kind_with_the_present_seg_rate_and_bars(tmp_path):
    stack = np.zeros((4, 8, 8), bool)
    drawn = stack.copy()
    drawn[1, 2:4, 2:4] = True
    absent = [
        _absent_record("lesion_free", ModelOutput("There is no lesion in this scan."), 0),
        _absent_record("lesion_free", ModelOutput("Sure, it is [SEG].", masks=[stack]), 1),  # a [SEG], empty mask
        _absent_record("out_of_field", ModelOutput("No liver here.", masks=[drawn], grounded=True), 2),  # a mask
        _absent_record("out_of_field", ModelOutput("The liver is not in this scan."), 3),
        _absent_record("not_shown", ModelOutput("Here.", boxes=[[1.0, 1.0, 5.0, 5.0]]), 4),  # a box
    ]
    assert [r["scores"]["false_mask"] for r in absent] == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert absent[1]["parsed"] == {"seg_tokens": 1, "num_masks": 1, "mask_voxels": 0, "num_boxes": 0}
    assert absent[2]["parsed"]["mask_voxels"] == 4 and absent[4]["scores"]["false_box"] == 1.0

    truth = _labels(label3=(slice(4, 9), slice(5, 11), slice(2, 6)))
    sample = _volume_sample(tmp_path, truth, ["labels.nii.gz#label=3"], groups={"target": "liver"})
    exact = _stack(tmp_path, np.where(truth == 3, 1, 0).astype(np.int16))
    present = [score(sample, ModelOutput("[SEG]", masks=[exact])),
               score(sample, ModelOutput("No liver."))]  # a present target without [SEG]
    tasks = summarize(absent + present, ["seg3d", "absent"])

    overall = tasks["absent"]["overall"]
    assert overall["n"] == 5 and overall["false_mask_rate"] == pytest.approx(3 / 5)
    assert overall["false_seg_rate"] == pytest.approx(2 / 5) and overall["false_box_rate"] == pytest.approx(1 / 5)
    assert overall["n_present"] == 2 and overall["seg_emitted_present"] == 0.5
    by_kind = tasks["absent"]["groups"]["absent_kind"]
    assert {kind: m["false_mask_rate"] for kind, m in by_kind.items()} == {
        "lesion_free": 0.5, "out_of_field": 0.5, "not_shown": 1.0}
    seg3d = tasks["seg3d"]["overall"]
    assert seg3d["dice"] == 0.5 and seg3d["volume_error_median"] == pytest.approx(0.5)  # errors 0 and 1
    assert seg3d["seg_emitted"] == 0.5 and seg3d["empty_answers"] == 1
    assert seg3d["hd95_mm_median"] == 0.0 and seg3d["n_hd95"] == 1 and seg3d["hd95_undefined"] == 1
    assert tasks["seg3d"]["groups"]["target"]["liver"]["n"] == 2

    run = {"backend": {"model": "hand-made", "backend": "test"}, "data": ["rows"], "split": "test"}
    report = write_report(tmp_path, run, tasks, None).read_text()
    assert "## Volume and clip segmentation (`seg3d`)" in report and "## Absent targets (`absent`)" in report
    assert "| mean 3-D Dice | 50.0 | ≥ 75.0 | not met |" in report
    assert "| median volume error | 50.0 | ≤ 15.0 | not met |" in report
    assert "| false-mask rate on absent targets | 60.0 | ≤ 5.0 | not met |" in report
    assert "| [SEG] emitted for present targets | 50.0 | ≥ 95.0 | not met |" in report
    assert "By target:" in report and "By absent_kind:" in report


class HandMade:
    """A backend that answers volume questions with the truth shifted by one slice, and absent ones in words,
    except one absent row where it draws a mask."""

    workers, batch_size = 1, 4

    def __init__(self, draws_on: str):
        self.draws_on = draws_on

    def predict(self, samples, images, options):
        from citrus_v.eval.volume_references import reference_stacks

        outputs = []
        for sample in samples:
            if sample.task == "seg3d":
                stacks = reference_stacks(sample).masks
                outputs.append(ModelOutput(" ".join(["[SEG]"] * len(stacks)), masks=[np.roll(m, 1, 0) for m in stacks]))
            elif sample.id == self.draws_on:
                outputs.append(ModelOutput("Here it is [SEG].", masks=[np.ones((8, 20, 16), bool)]))
            else:
                outputs.append(ModelOutput("It is not in this scan."))
        return outputs

    def describe(self):
        return {"backend": "hand-made", "model": "truth shifted by one slice"}


def test_eval_runs_seg3d_and_absent_rows_end_to_end(tmp_path):
    import json

    from citrus_v.eval.runner import EvalConfig, run_eval

    truth = _labels(label3=(slice(4, 9), slice(5, 11), slice(2, 6)), label4=(slice(10, 14), slice(2, 6), slice(1, 5)))
    _nifti(tmp_path / "labels.nii.gz", truth)
    _nifti(tmp_path / "ct.nii.gz", np.zeros(SHAPE_XYZ, np.float32))
    rows = [
        _row("segmentation", "Sure, here is the liver [SEG].", videos=["ct.nii.gz"], masks=["labels.nii.gz#label=3"],
             meta={"target": "liver", "modality": "CT"}),
        _row("segmentation", "Sure, here is the spleen [SEG].", videos=["ct.nii.gz#axis=2"],
             masks=["labels.nii.gz#label=4"], meta={"target": "spleen", "modality": "CT"}),
        _row("segmentation", "There is no lesion in this scan.", videos=["ct.nii.gz"],
             meta={"absent": True, "absent_kind": "lesion_free", "target": "lesion"}),
        _row("detection", "There is no liver in this scan.", videos=["ct.nii.gz"],
             meta={"absent": True, "absent_kind": "out_of_field", "target": "liver"}),
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EvalConfig(tasks=["seg3d", "absent"], data=[str(tmp_path / "rows.jsonl")], out=tmp_path / "out",
                        progress=False)
    result = run_eval(config, HandMade(draws_on="rows:3"))
    seg3d, absent = result.tasks["seg3d"], result.tasks["absent"]
    assert seg3d["counts"] == {"samples": 2, "scored": 2, "unparsable": 0, "failed": 0}, seg3d["failed"]
    # liver: 4 slices shifted by one share 3 (Dice 3/4); spleen the same; equal volumes; the end slices 2.5 mm off
    assert seg3d["overall"]["dice"] == pytest.approx(0.75) and seg3d["overall"]["volume_error_median"] == 0.0
    assert seg3d["overall"]["hd95_mm_median"] == pytest.approx(2.5) and seg3d["overall"]["seg_emitted"] == 1.0
    assert set(seg3d["groups"]["target"]) == {"liver", "spleen"}
    assert absent["overall"]["false_mask_rate"] == 0.5 and absent["overall"]["seg_emitted_present"] == 1.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| false-mask rate on absent targets | 50.0 | ≤ 5.0 | not met |" in report
    assert "| mean 3-D Dice | 75.0 | ≥ 75.0 | met |" in report

    # the command line names the two tasks in its help and prints their headline
    from citrus_v.eval.commands import TASK_HELP, headline

    assert "seg3d" in TASK_HELP and "absent" in TASK_HELP
    lines = headline(result.tasks).splitlines()
    assert lines[0].startswith("seg3d: dice 0.750, volume_error_median 0.000, hd95_mm_median 2.500 (2/2 scored")
    assert lines[1].startswith("absent: false_mask_rate 0.500, seg_emitted_present 1.000 (2/2 scored")
