"""Rows and validation: the synthetic corpus validates clean; every kind of bad input is named with file:line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from citrus_v.cli import main
from citrus_v.data.corpus import CorpusOptions, write_corpus
from citrus_v.data.rows import DataError, check_schema, render_objects
from citrus_v.data.validate import ValidationOptions, validate_files
from citrus_v.media import mask_to_rle, read_image, read_mask
from citrus_v.processing.boxes import BoxScaler, parse_boxes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, CorpusOptions(n=40, seed=3))
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_synthetic_corpus_validates_and_covers_every_task(corpus, capsys):
    assert main(["data", "validate", *(str(corpus / f"{s}.jsonl") for s in ("train", "val", "test"))]) == 0
    out = capsys.readouterr().out
    rows = sum(len(_rows(corpus / f"{s}.jsonl")) for s in ("train", "val", "test"))
    assert out.startswith(f"{rows} row(s) ok, 0 rejected (3 file(s))")
    everything = [r for s in ("train", "val", "test") for r in _rows(corpus / f"{s}.jsonl")]
    tasks = {r["task"] for r in everything}
    assert tasks == {"segmentation", "detection", "vqa-closed", "vqa-open", "report", "cot", "document"}
    formats = {r["meta"]["format"] for r in everything}
    assert {"png", "dicom", "nifti"} <= formats
    assert {r["meta"]["modality"] for r in everything} >= {"CT", "MR", "X-ray", "document"}
    prompts = {r["messages"][0]["content"] for r in everything if r["task"] == "segmentation"}
    assert "<image>Segment every lesion." in prompts and "<image>Segment the lesion." in prompts
    assert any("left kidney" in p for p in prompts) and any("liver" in p for p in prompts)
    multi = [r for r in everything if r["messages"][1]["content"].count("[SEG]") > 1]
    assert multi and all(len(r["masks"]) == r["messages"][1]["content"].count("[SEG]") for r in multi)
    assert any(isinstance(m, dict) and "counts" in m for r in everything for m in r.get("masks", []))
    assert any(r["messages"][1]["content"].startswith("<think>") for r in everything)
    assert any("mm" in r["messages"][1]["content"] for r in everything if r["task"] == "report")


def test_splits_share_no_image_and_generation_is_deterministic(corpus, tmp_path):
    def images(split: str) -> set[str]:
        return {r["images"][0].split("#")[0] for r in _rows(corpus / f"{split}.jsonl")}

    train, val, test = images("train"), images("val"), images("test")
    assert train and val and test and not (train & val) and not (train & test) and not (val & test)
    again = tmp_path / "again"
    write_corpus(again, CorpusOptions(n=40, seed=3))

    def digest(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert digest(corpus) == digest(again)
    other = tmp_path / "other"
    write_corpus(other, CorpusOptions(n=40, seed=4))
    assert digest(other) != digest(corpus)


def test_extra_test_images_leave_the_training_images_as_they_were(corpus, tmp_path, capsys):
    """``--test_images`` grows the held-out split alone: train and val stay byte-identical, the old test rows
    come first, and the new images are new (none shared with any split), lab reports among them."""
    bigger = tmp_path / "bigger"
    argv = ["data", "synth", "--out", str(bigger), "--n", "40", "--seed", "3", "--test_images", "30"]
    assert main(argv) == 0
    assert "test: " in capsys.readouterr().out
    for split in ("train", "val"):
        assert (bigger / f"{split}.jsonl").read_bytes() == (corpus / f"{split}.jsonl").read_bytes()
    old, new = _rows(corpus / "test.jsonl"), _rows(bigger / "test.jsonl")
    assert new[: len(old)] == old and len(new) > len(old)
    added = new[len(old) :]
    cases = {r["meta"]["case"] for r in added}
    assert cases == {f"case_{index:05d}" for index in range(40, 70)}
    seen = {r["images"][0].split("#")[0] for s in ("train", "val", "test") for r in _rows(corpus / f"{s}.jsonl")}
    assert not seen & {r["images"][0].split("#")[0] for r in added}
    assert {"document", "segmentation", "vqa-closed"} <= {r["task"] for r in added}
    assert main(["data", "validate", str(bigger / "test.jsonl")]) == 0
    with pytest.raises(ValueError, match="--test_images must be 0 or more"):
        write_corpus(tmp_path / "bad", CorpusOptions(n=10, test_images=-1))


def test_extra_training_reports_leave_the_held_out_images_as_they_were(corpus, tmp_path):
    """``--train_documents`` adds lab reports to the train split alone: val and test stay byte-identical, the
    old training rows come first, and every added row reads a new lab report."""
    more = tmp_path / "more"
    argv = ["data", "synth", "--out", str(more), "--n", "40", "--seed", "3", "--train_documents", "12"]
    assert main(argv) == 0
    for split in ("val", "test"):
        assert (more / f"{split}.jsonl").read_bytes() == (corpus / f"{split}.jsonl").read_bytes()
    old, new = _rows(corpus / "train.jsonl"), _rows(more / "train.jsonl")
    assert new[: len(old)] == old and len(new) > len(old)
    added = new[len(old) :]
    assert {r["task"] for r in added} == {"document"}
    assert {r["meta"]["case"] for r in added} == {f"case_{index:05d}" for index in range(40, 52)}
    seen = {r["images"][0].split("#")[0] for s in ("train", "val", "test") for r in _rows(corpus / f"{s}.jsonl")}
    assert not seen & {r["images"][0].split("#")[0] for r in added}
    assert main(["data", "validate", str(more / "train.jsonl")]) == 0
    with pytest.raises(ValueError, match="--train_documents must be 0 or more"):
        write_corpus(tmp_path / "bad", CorpusOptions(n=10, train_documents=-1))


def test_every_lesion_does_not_tell_how_many_there_are(corpus):
    """Scans with several lesions are asked for "every lesion"; those with one or none are asked that way too, and
    the answer then gives one [SEG] or says there is none (an absent-target row) — "every" is not "two or more"."""
    everything = [r for s in ("train", "val", "test") for r in _rows(corpus / f"{s}.jsonl")
                  if r["task"] == "segmentation"]
    every = [r for r in everything if r["messages"][0]["content"] == "<image>Segment every lesion."]
    single = [r for r in everything if r["messages"][0]["content"] == "<image>Segment the lesion."]
    counts = {r["messages"][1]["content"].count("[SEG]") for r in every}
    assert {0, 1} <= counts and max(counts) >= 2
    assert all(r["messages"][1]["content"].count("[SEG]") <= 1 for r in single)
    for row in every:
        answer, masks = row["messages"][1]["content"], row.get("masks", [])
        assert answer.count("[SEG]") == len(masks)
        if not masks:
            assert answer == "There is no lesion in this image." and row["meta"]["absent"] is True
        elif len(masks) == 1:
            assert answer == "There is 1 lesion: lesion 1 [SEG]."


def test_masks_match_what_the_rows_say(corpus):
    rows = _rows(corpus / "train.jsonl")
    checked = 0
    for row in rows:
        if row["task"] != "segmentation" or not row.get("masks"):
            continue
        image = np.asarray(read_image(row["images"][0], corpus))[..., 0]
        masks = [read_mask(m, corpus) for m in row["masks"]]
        assert all(m.shape == image.shape and m.sum() > 0 for m in masks)
        if len(masks) > 1:  # several lesions: separate, non-overlapping masks
            assert not np.logical_and.reduce(masks).any()
        checked += 1
    assert checked > 10


def test_detection_rows_render_boxes_in_model_coordinates(corpus):
    row = next(r for r in _rows(corpus / "train.jsonl") if r["task"] == "detection")
    options = ValidationOptions(min_pixels=448 * 448, max_pixels=448 * 448)  # a 2x upscale
    scaler = options.scaler(224, 224)
    answer = render_objects(row, scaler)[1]["content"]
    boxes = parse_boxes(answer)
    assert [b.xyxy for b in boxes] == [[2 * v for v in box] for box in row["objects"]["bbox"]]
    assert [b.label for b in boxes] == row["objects"]["ref"]
    identity = render_objects(row, BoxScaler((224, 224), (224, 224)))[1]["content"]
    assert [b.xyxy for b in parse_boxes(identity)] == row["objects"]["bbox"]


def _bad_dataset(root: Path) -> Path:
    image = np.full((64, 64), 90, dtype=np.uint8)
    Image.fromarray(image).save(root / "ok.png")
    Image.fromarray(np.zeros((2000, 2000), np.uint8)).save(root / "big.png")
    data = (root / "ok.png").read_bytes()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "noise.png")
    noise = (root / "noise.png").read_bytes()
    (root / "cut.png").write_bytes(noise[: len(noise) // 2])
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "small_mask.png")
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:20] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "mask.png")
    del data

    def seg(image: str, masks: list, answer: str = "Sure, it is [SEG].") -> str:
        return json.dumps({
            "messages": [{"role": "user", "content": "<image>Segment the lesion."},
                         {"role": "assistant", "content": answer}],
            "images": [image], "masks": masks,
        })

    lines = [
        seg("ok.png", ["mask.png"]),                                   # 1 ok
        "{not json",                                                    # 2 invalid_json
        seg("missing.png", ["mask.png"]),                               # 3 missing_file
        seg("cut.png", ["mask.png"]),                                   # 4 truncated_image
        seg("big.png", []),                                             # 5 image_too_large (limit below)
        seg("ok.png", ["small_mask.png"]),                              # 6 mask_size
        seg("ok.png", ["mask.png"], "Sure, [SEG] and [SEG]."),          # 7 seg_mask_count
        json.dumps({"messages": [{"role": "user", "content": "<image>Locate."},
                                 {"role": "assistant", "content": "<bbox>"}],
                    "images": ["ok.png"], "objects": {"ref": ["x"], "bbox": [[10, 10, 80, 20]]}}),  # 8 bbox_outside
        json.dumps({"messages": [{"role": "doctor", "content": "hi"}]}),  # 9 schema
        "",                                                              # blank lines are not rows
        seg("ok.png", [mask_to_rle(mask)]),                              # 11 ok (inline RLE)
        json.dumps({"messages": [{"role": "user", "content": "<image>Where?"},
                                 {"role": "assistant", "content": '```json\n[{"bbox_2d": [1, 2, 5000, 9]}]\n```'}],
                    "images": ["ok.png"]}),                              # 12 answer box outside the model image
    ]
    path = root / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_rejected_with_file_line_and_reason(tmp_path, capsys):
    path = _bad_dataset(tmp_path)
    report = validate_files([path], ValidationOptions(max_image_pixels=1_000_000))
    found = {issue.line: issue.reason for issue in report.skips.issues}
    assert report.ok == 2
    assert found == {
        2: "invalid_json",
        3: "missing_file",
        4: "truncated_image",
        5: "image_too_large",
        6: "mask_size",
        7: "seg_mask_count",
        8: "bbox_outside",
        9: "schema",
        12: "bbox_outside",
    }
    messages = {issue.line: str(issue) for issue in report.skips.issues}
    assert messages[3].startswith(f"{path}:3: [missing_file]") and "missing.png" in messages[3]
    assert "more [SEG] than masks" in messages[7]
    assert "masks[0] is 32x32 but images[0] is 64x64" in messages[6]
    # the CLI prints the same summary and exits 1; --strict stops at the first bad row
    assert main(["data", "validate", str(path), "--max_image_pixels", "1000000"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("2 row(s) ok, 9 rejected (1 file(s))") and "  invalid_json: 1" in out
    assert f"{path}:4: [truncated_image]" in out
    assert main(["data", "validate", str(path), "--strict"]) == 1
    assert f"{path}:2: [invalid_json]" in capsys.readouterr().err
    with pytest.raises(DataError, match=":2: .invalid_json"):
        validate_files([path], strict=True)


def test_schema_checks():
    with pytest.raises(ValueError, match="non-empty list"):
        check_schema({"messages": []})
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        check_schema({"messages": [{"role": "user", "content": "<image><image>"},
                                   {"role": "assistant", "content": "x"}], "images": ["a.png"]})
    with pytest.raises(ValueError, match=r"objects.bbox\[0\] must be"):
        check_schema({"messages": [{"role": "assistant", "content": "x"}], "objects": {"bbox": [[1, 2]]}})
    with pytest.raises(ValueError, match="no assistant message"):
        check_schema({"messages": [{"role": "user", "content": "x"}]})


def test_stats_counts_tasks_modalities_and_lengths(corpus, capsys):
    assert main(["data", "stats", str(corpus / "train.jsonl"), "--min_pixels", "50176", "--max_pixels", "50176"]) == 0
    out = capsys.readouterr().out
    assert "rows per task:" in out and "segmentation" in out and "rows per modality:" in out and "CT" in out
    line = next(x for x in out.splitlines() if x.startswith("token length:"))
    values = [int(part.split()[1]) for part in line.split(": ")[1].split(", ")[:5]]
    assert values == sorted(values) and values[0] > 64  # every image row holds 64 image tokens at 224 px
