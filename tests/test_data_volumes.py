"""Volume and clip rows, and absent-target rows, in the synthetic corpus and the data path: the files load through
the media readers on one grid, every present target has a non-empty 3-D mask, "not present" answers carry no
[SEG] or box at the share asked for, and validation and stats take ``"videos"`` rows (and refuse bad ones with
file:line)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

from citrus_v.cli import main
from citrus_v.data.absent_rows import ABSENT_KINDS, AbsentBalance
from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.stats import dataset_stats
from citrus_v.data.validate import ValidationOptions, validate_files
from citrus_v.media import parse_ref, probe_volume, read_volume
from citrus_v.processing.boxes import parse_boxes
from citrus_v.processing.template import ChatTemplate
from citrus_v.processing.tokenizer_builder import build_tokenizer

SPLITS = ("train", "val", "test")
SMALL = dict(n=12, seed=5, volumes=5, test_volumes=1, clips=2, volume_slices=(10, 14), volume_size=(96, 128),
             clip_frames=(8, 10), clip_size=96)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus3d")
    write_corpus(out, CorpusOptions(**SMALL))
    return out


def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for split in SPLITS for line in (root / f"{split}.jsonl").read_text().splitlines()]


def _mask(ref: str, base: Path) -> np.ndarray:
    """A 3-D mask reference as the rows document it: the label volume's frames, the named values selected."""
    return np.isin(read_volume(ref, base).values, parse_ref(ref, base).label)


def test_volumes_and_label_volumes_load_on_one_grid(corpus):
    rows = [r for r in _rows(corpus) if r["meta"].get("kind") == "volume"]
    cases = {r["meta"]["case"]: r for r in rows}
    assert len(cases) == 6 and {r["meta"]["split"] for r in rows} >= {"train", "test"}
    assert {r["meta"]["modality"] for r in rows} <= {"CT", "MR"}
    label_files = {r["meta"]["case"]: m.split("#")[0] for r in rows for m in r.get("masks", [])}
    for case, row in cases.items():
        assert label_files[case] == f"masks/{row['meta']['split']}/{case}_labels.nii.gz"
        video, labels = read_volume(row["videos"][0], corpus), read_volume(label_files[case], corpus)
        assert video.kind == "volume" and video.values.shape == labels.values.shape == tuple(row["meta"]["shape"])
        assert 10 <= video.num_frames <= 14 and 96 <= video.frame_shape[0] <= 128
        np.testing.assert_allclose(video.affine, labels.affine)  # the label volume is on the source grid
        # the spacing the rows state is the file's: 2-3 mm between slices, a body-sized field of view in-plane
        np.testing.assert_allclose(video.spacing, row["meta"]["spacing_mm"], rtol=1e-5)
        assert video.spacing[0] in (2.0, 2.5, 3.0) and 320 <= video.spacing[1] * video.frame_shape[0] <= 400
        source, label_source = nib.load(corpus / row["videos"][0].split("#")[0]), nib.load(corpus / label_files[case])
        assert source.get_data_dtype() == np.int16 and label_source.get_data_dtype() == np.uint8
        np.testing.assert_allclose(source.affine, label_source.affine)
        values = set(np.unique(labels.values).astype(int).tolist())
        assert {0, 1} <= values and values <= {0, 1, 2, 3, 4, 10, 11, 12}  # organs 1-4, lesions from 10
        if row["meta"]["modality"] == "CT":  # Hounsfield units: air around the body, bone in the spine
            assert video.values.min() < -900 and video.values.max() > 300


def test_every_present_target_has_its_3d_mask_and_every_lesion_its_own(corpus):
    rows = [r for r in _rows(corpus) if r["task"] == "segmentation-3d" and not r["meta"].get("absent")]
    assert len(rows) > 15
    multi = 0
    for row in rows:
        answer = row["messages"][1]["content"]
        assert row["messages"][0]["content"].startswith("<video>") and len(row["videos"]) == 1
        assert answer.count("[SEG]") == len(row["masks"]) == len(row["meta"]["targets"])
        assert row["meta"]["target"] in row["messages"][0]["content"]  # what was asked for, as eval groups it
        shape = tuple(row["meta"]["shape"])
        masks = [_mask(ref, corpus) for ref in row["masks"]]
        for mask, (first, last) in zip(masks, row["meta"]["slices"], strict=True):
            assert mask.shape == shape and mask.any()
            frames = np.flatnonzero(mask.any(axis=(1, 2)))
            assert (frames[0], frames[-1]) == (first, last)
        if len(masks) > 1:  # "every lesion": one mask each, apart, numbered left to right as shown
            multi += 1
            assert not np.logical_and.reduce(masks).any()
            columns = [np.nonzero(m)[2].mean() for m in masks]
            assert columns == sorted(columns) and "from left to right" in answer
    assert multi >= 1
    clip_targets = {r["meta"]["targets"][0] for r in rows if r["meta"]["kind"] == "clip"}
    assert clip_targets == {"left ventricle", "myocardium", "right ventricle"}


def test_the_clip_is_a_cine_dicom_whose_label_stack_follows_the_heartbeat(corpus):
    rows = [r for r in _rows(corpus) if r["meta"].get("kind") == "clip" and not r["meta"].get("absent")]
    by_target = {r["meta"]["targets"][0]: r for r in rows if r["meta"]["case"] == rows[0]["meta"]["case"]}
    clip = read_volume(by_target["left ventricle"]["videos"][0], corpus)
    assert clip.kind == "clip" and by_target["left ventricle"]["videos"][0].endswith(".dcm")
    assert clip.fps == pytest.approx(rows[0]["meta"]["fps"], rel=1e-3) and 8 <= clip.num_frames <= 10
    cavity, wall = (_mask(by_target[t]["masks"][0], corpus) for t in ("left ventricle", "myocardium"))
    assert cavity.shape == wall.shape == clip.values.shape
    areas = cavity.sum(axis=(1, 2))
    assert areas.max() > 1.1 * areas.min()  # the ventricle contracts and relaxes from frame to frame
    # the masks sit on the picture: the cavity is dark (anechoic) and its wall bright, on every frame
    for k in range(clip.num_frames):
        frame = clip.values[k]
        assert frame[cavity[k]].mean() < 0.5 * frame[wall[k]].mean()


def test_absent_rows_answer_in_words_without_seg_or_box(corpus, tmp_path):
    out = tmp_path / "absent"
    write_corpus(out, CorpusOptions(n=40, seed=9, absent_share=0.3, absent_detection=True))
    rows = _rows(out) + _rows(corpus)
    absent = [r for r in rows if r["meta"].get("absent")]
    assert {r["meta"]["absent_kind"] for r in absent} == set(ABSENT_KINDS)
    assert {r["meta"]["asked"] for r in absent} == {"segmentation", "detection"}
    assert any("videos" in r for r in absent) and any("images" in r for r in absent)
    for row in absent:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert "[SEG]" not in answer and not parse_boxes(answer) and "bbox" not in answer
        assert "masks" not in row and "objects" not in row
        assert row["meta"]["target"] in question and row["task"] in ("segmentation", "detection", "segmentation-3d")
        assert row["task"] == row["meta"]["asked"] or row["task"] == "segmentation-3d"
        assert answer.split()[0] in ("There", "No", "I", "The", "This") or "cannot be seen" in answer
    outside = [r for r in absent if r["meta"]["absent_kind"] == "outside_field_of_view"]
    chest = [r for r in outside if r["meta"]["region"] == "chest"]
    assert chest and all(r["meta"]["target"] in ("liver", "spleen", "right kidney", "left kidney") for r in chest)
    assert len({r["messages"][1]["content"].split(" ")[0] for r in absent}) >= 3  # several phrasings


def test_the_absent_share_is_honoured_in_each_split(tmp_path):
    def share(rows: list[dict]) -> float:
        grounded = [r for r in rows if r["task"] in ("segmentation", "detection", "segmentation-3d")]
        return sum(bool(r["meta"].get("absent")) for r in grounded) / len(grounded)

    out = tmp_path / "share"
    write_corpus(out, CorpusOptions(n=60, seed=2, absent_share=0.3))
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert share(train) == pytest.approx(0.3, abs=0.03)
    # the balance itself: a share is met over many scenes of one split, and other splits keep their own count
    balance = AbsentBalance(0.2)
    present = [{"task": "segmentation", "meta": {}}] * 3
    extras = [balance.extra("train", present) for _ in range(100)]
    assert sum(extras) / (sum(extras) + 300) == pytest.approx(0.2, abs=0.01)
    assert balance.extra("test", present) == 0  # 0.75 owed in the test split: not yet a row
    with pytest.raises(ValueError, match="^--absent_share must be at least 0 and below 1, got 1.0"):
        write_corpus(tmp_path / "bad", CorpusOptions(n=3, absent_share=1.0))
    with pytest.raises(ValueError, match="^--volume_absent_share must be at least 0 and below 1, got -0.1"):
        write_corpus(tmp_path / "bad", CorpusOptions(n=3, volume_absent_share=-0.1))
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_image_rows_stay_as_they_were_when_volumes_are_added(corpus, tmp_path):
    plain = tmp_path / "plain"
    write_corpus(plain, CorpusOptions(n=SMALL["n"], seed=SMALL["seed"]))
    for split in SPLITS:
        with_volumes = [line for line in (corpus / f"{split}.jsonl").read_text().splitlines() if '"case_' in line]
        assert with_volumes == (plain / f"{split}.jsonl").read_text().splitlines()
    again = tmp_path / "again"
    write_corpus(again, CorpusOptions(**SMALL))
    for path in sorted(corpus.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (again / path.relative_to(corpus)).read_bytes(), path


def test_validation_accepts_the_corpus_and_refuses_bad_video_rows(corpus, capsys):
    report = validate_files([corpus / f"{s}.jsonl" for s in SPLITS])
    assert report.rejected == 0 and report.ok == len(_rows(corpus))
    rows = [r for r in _rows(corpus) if r["task"] == "segmentation-3d" and r.get("masks")]
    row = next(r for r in rows if r["meta"]["kind"] == "volume")
    other = next(r for r in rows if r["meta"]["kind"] == "volume" and r["meta"]["shape"] != row["meta"]["shape"])
    lines = [
        dict(row),                                                                                   # 1 ok
        dict(row, messages=[dict(row["messages"][0], content="<video><video>" + "Segment it."),
                            row["messages"][1]]),                                                   # 2 video_count
        dict(row, masks=other["masks"][:1]),                                                         # 3 mask_size
        dict(row, masks=[row["masks"][0].split("#")[0] + "#label=99"]),                             # 4 empty_mask
        dict(row, videos=[row["videos"][0].split("#")[0] + "#slice=3"]),                            # 5 bad_reference
        dict(row, messages=[row["messages"][0], dict(row["messages"][1], content="<video> [SEG]")]),  # 6 video_count
        dict(row, videos=[os.path.join(NIBABEL_DATA, "anatomical.nii")]),                            # 7 mask_size
        dict(row, videos=[]),                                                                        # 8 video_count
    ]
    path = corpus / "bad_videos.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = validate_files([path])
    found = {issue.line: issue.reason for issue in report.skips.issues}
    assert report.ok == 1
    assert found == {2: "video_count", 3: "mask_size", 4: "empty_mask", 5: "bad_reference", 6: "video_count",
                     7: "mask_size", 8: "video_count"}
    messages = {issue.line: str(issue) for issue in report.skips.issues}
    assert messages[2].startswith(f"{path}:2: [video_count]") and "2 <video> placeholder(s) for 1 video" in messages[2]
    assert "masks[0] is" in messages[3] and "but videos[0] is" in messages[3]
    # headers only: the same wrong shape is found without decoding, and a volume over the voxel budget is refused
    fast = validate_files([path], ValidationOptions(decode=False))
    assert {i.line: i.reason for i in fast.skips.issues}[3] == "mask_size" and 4 not in {
        i.line for i in fast.skips.issues}
    small = validate_files([path], ValidationOptions(decode=False, max_volume_voxels=1000))
    assert {i.line: i.reason for i in small.skips.issues}[1] == "image_too_large"
    assert "--max_voxels" in str(small.skips.issues[0])
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("1 row(s) ok, 7 rejected") and f"{path}:4: [empty_mask]" in out
    path.unlink()


def test_stats_count_videos_frames_and_absent_rows(corpus):
    files = [corpus / f"{s}.jsonl" for s in SPLITS]
    stats = dataset_stats(files, ChatTemplate(build_tokenizer()))
    rows = _rows(corpus)
    videos = [r for r in rows if "videos" in r]
    assert stats.video_refs == len(videos)
    assert len(stats.video_files) == len({r["videos"][0].split("#")[0] for r in videos}) == 8
    assert stats.video_frames == sum(r["meta"]["shape"][0] for r in videos)
    # the model sees every slice of a volume (an odd count padded to pairs) and, of a clip under a second long
    # sampled at 2 frames per second, qwen_vl_utils' least of 4 frames
    seen = [n + n % 2 if r["meta"]["kind"] == "volume" else 4 for r in videos for n in [r["meta"]["shape"][0]]]
    assert stats.model_frames == sum(seen)
    assert stats.absent == sum(bool(r["meta"].get("absent")) for r in rows) > 0
    text = stats.format()
    assert f"video references {len(videos)} (distinct video files 8)" in text and "absent-target rows" in text
    # a video row is measured with its video tokens: far longer than its text
    header = probe_volume(videos[0]["videos"][0], corpus)
    assert max(stats.lengths) > header.num_frames // 2 * (header.height // 28) * (header.width // 28)
