"""Converters: each public layout, on a small hand-made file in that layout, converts to rows that validate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from citrus_v.cli import main
from citrus_v.data.converters import convert_file
from citrus_v.data.validate import ValidationOptions, validate_files


def _image(path: Path, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), 80, np.uint8)).save(path)


def _mask(path: Path, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[5:15, 5:25] = 255
    Image.fromarray(mask).save(path)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mecovqa_g(tmp_path):
    src = tmp_path / "src"
    _image(src / "imgs" / "ct_1.png")
    _mask(src / "masks" / "ct_1_liver.png")
    items = [
        {"id": "a1", "image": "imgs/ct_1.png", "conversations": [
            {"from": "human", "value": "<image>\nPlease segment the liver."},
            {"from": "gpt", "value": "<SEG><mask>masks/ct_1_liver.png</mask>"}]},
        {"id": "a2", "image": "imgs/ct_1.png", "conversations": [
            {"from": "human", "value": "Segment it."}, {"from": "gpt", "value": "<SEG>"}]},  # no mask path
    ]
    (src / "mecovqa.json").write_text(json.dumps(items))
    out = tmp_path / "out" / "rows.jsonl"
    report = convert_file("mecovqa-g", src / "mecovqa.json", out)
    assert report.written == 1 and report.skips.counts == {"seg_mask_count": 1}
    assert f"{src / 'mecovqa.json'}:2:" in str(report.skips.issues[0])
    row = _rows(out)[0]
    assert row["messages"] == [
        {"role": "user", "content": "<image>Please segment the liver."},
        {"role": "assistant", "content": "Sure, it is [SEG]."},
    ]
    assert row["images"] == ["../src/imgs/ct_1.png"] and row["masks"] == ["../src/masks/ct_1_liver.png"]
    assert validate_files([out]).ok == 1


def test_medsegbench(tmp_path):
    _image(tmp_path / "data" / "img.png")
    _mask(tmp_path / "data" / "m1.png")
    _mask(tmp_path / "data" / "m2.png")
    item = {
        "id": 7, "images": ["img.png"], "masks": ["m1.png", "m2.png"],
        "conversations": [{"from": "human", "value": "<image>Segment the polyps."},
                          {"from": "gpt", "value": "Here: <SEG> and <SEG>."}],
        "metadata": {"dataset": "Kvasir", "region": "colon"},
    }
    (tmp_path / "msb.jsonl").write_text(json.dumps(item) + "\n")
    out = tmp_path / "msb_rows.jsonl"
    assert convert_file("medsegbench", tmp_path / "msb.jsonl", out, image_root=tmp_path / "data").written == 1
    row = _rows(out)[0]
    assert row["messages"][1]["content"] == "Here: [SEG] and [SEG]."
    assert row["masks"] == ["data/m1.png", "data/m2.png"]
    assert row["meta"]["dataset"] == "Kvasir" and row["meta"]["region"] == "colon"
    assert validate_files([out]).ok == 1


def test_detection(tmp_path, capsys):
    _image(tmp_path / "x.png", (200, 100))
    lines = [
        {"image": "x.png", "sentence": "nodule", "bbox": [20, 10, 60, 50], "width": 200, "height": 100},
        {"image": "x.png", "sentence": "heart", "bbox": [0.1, 0.2, 0.5, 0.6], "width": 200, "height": 100},
        {"image": "x.png", "sentence": "missing box"},
    ]
    (tmp_path / "det.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    out = tmp_path / "det_rows.jsonl"
    assert main(["data", "convert", "--from", "detection", str(tmp_path / "det.jsonl"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 row(s); skipped 2 row(s): invalid_json 1, schema 1" in printed
    first, second = _rows(out)
    assert first["messages"][0]["content"] == "<image>Locate the nodule, output its bbox coordinates using JSON format."
    assert first["objects"] == {"ref": ["nodule"], "bbox": [[20, 10, 60, 50]]}
    assert second["objects"]["bbox"] == [[20, 20, 100, 60]]  # fractions of width/height -> pixels
    report = validate_files([out], ValidationOptions(min_pixels=200 * 100, max_pixels=200 * 100))
    assert report.ok == 2


def test_vqa_rad_slake_pathvqa(tmp_path):
    _image(tmp_path / "images" / "synpic1.jpg")
    _image(tmp_path / "images" / "xmlab1" / "source.jpg")
    _image(tmp_path / "images" / "train_0001.jpg")
    rad = [{"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "No",
            "answer_type": "CLOSED", "image_organ": "CHEST"},
           {"qid": 2, "image_name": "synpic1.jpg", "question": "What organ?", "answer": "lung",
            "answer_type": "OPEN"}]
    slake = [{"qid": 10, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung",
              "q_lang": "en", "answer_type": "OPEN", "modality": "CT", "location": "Chest"},
             {"qid": 11, "img_name": "xmlab1/source.jpg", "question": "哪个器官?", "answer": "肺", "q_lang": "zh",
              "answer_type": "OPEN"}]
    path = [{"image": "train_0001", "question": "Is this malignant?", "answer": "yes"}]
    for name, data in (("rad.json", rad), ("slake.json", {"data": slake}), ("path.json", path)):
        (tmp_path / name).write_text(json.dumps(data, ensure_ascii=False))
    images = tmp_path / "images"
    convert_file("vqa-rad", tmp_path / "rad.json", tmp_path / "rad.jsonl", image_root=images)
    report = convert_file("slake", tmp_path / "slake.json", tmp_path / "slake.jsonl", image_root=images)
    assert report.written == 1 and report.skips.counts == {"language": 1}
    convert_file("pathvqa", tmp_path / "path.json", tmp_path / "path.jsonl", image_root=images)
    rad_rows, slake_rows, path_rows = (_rows(tmp_path / f) for f in ("rad.jsonl", "slake.jsonl", "path.jsonl"))
    assert [r["task"] for r in rad_rows] == ["vqa-closed", "vqa-open"]
    assert rad_rows[0]["messages"][1]["content"] == "No" and rad_rows[0]["meta"]["organ"] == "CHEST"
    assert slake_rows[0]["meta"]["modality"] == "CT" and slake_rows[0]["images"] == ["images/xmlab1/source.jpg"]
    assert path_rows[0]["images"] == ["images/train_0001.jpg"] and path_rows[0]["task"] == "vqa-closed"
    files = [tmp_path / f for f in ("rad.jsonl", "slake.jsonl", "path.jsonl")]
    assert validate_files(files).ok == 4
    assert main(["data", "convert", "--from", "nope", str(tmp_path / "rad.json"), "--out", str(tmp_path / "o")]) == 1
