"""Converters: each public layout, on a small hand-made file in that layout, converts to rows that validate."""

from __future__ import annotations

import json
import pickle
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


# --- the public releases as published, in miniature: no --image_root, splits kept ---------------------------
def _jpeg(path: Path, size=(40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _split_of(rows: list[dict]) -> set[str]:
    return {r["meta"]["split"] for r in rows}


def test_vqa_rad_release_folder_keeps_its_split(tmp_path, capsys):
    root = tmp_path / "VQA_RAD"
    for name in ("synpic1.jpg", "synpic2.jpg"):
        _jpeg(root / "VQA_RAD Image Folder" / name)
    base = {"image_organ": "CHEST", "question_type": "PRES"}
    items = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "No",
         "answer_type": "CLOSED", "phrase_type": "freeform", **base},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "Is a bone broken?", "answer": "No",
         "answer_type": "CLOSED", "phrase_type": "para", **base},
        {"qid": 3, "image_name": "synpic2.jpg", "question": "What organ is shown?", "answer": "lung",
         "answer_type": "OPEN", "phrase_type": "test_freeform", **base},
        {"qid": 4, "image_name": "synpic2.jpg", "question": "Which organ is this?", "answer": "lung",
         "answer_type": "OPEN", "phrase_type": "test_para", **base},
        {"qid": 5, "image_name": "synpic9.jpg", "question": "Is it normal?", "answer": "yes",
         "answer_type": "CLOSED", "phrase_type": "freeform", **base},  # its image is not in the release
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(items))
    out = tmp_path / "rows"
    assert main(["data", "convert", "--from", "vqa-rad", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    train, test = _rows(out / "train.jsonl"), _rows(out / "test.jsonl")
    assert [r["meta"]["id"] for r in train] == [1, 2] and [r["meta"]["id"] for r in test] == [3, 4]
    assert _split_of(train) == {"train"} and _split_of(test) == {"test"}
    assert test[0]["meta"]["phrase_type"] == "test_freeform"
    assert train[0]["images"] == ["../VQA_RAD/VQA_RAD Image Folder/synpic1.jpg"]
    assert "images under " + str((root / "VQA_RAD Image Folder").resolve()) in printed
    assert f"{out / 'train.jsonl'}: 2 row(s), split train" in printed
    assert f"{out / 'test.jsonl'}: 2 row(s), split test" in printed
    assert "wrote 4 row(s); skipped 1 row(s): missing_image 1" in printed
    assert "VQA_RAD Image Folder/synpic9.jpg not found (looked under" in printed and "--image_root" in printed
    assert "validation of the written rows: 4 row(s) ok, 0 rejected (2 file(s))" in printed
    # an output file name gets one file per split next to it
    assert main(["data", "convert", "--from", "vqa-rad", str(root / "VQA_RAD Dataset Public.json"),
                 "--out", str(tmp_path / "rad.jsonl")]) == 0
    assert len(_rows(tmp_path / "rad_train.jsonl")) == 2 and len(_rows(tmp_path / "rad_test.jsonl")) == 2
    assert not (tmp_path / "rad.jsonl").exists()


def test_slake_release_folder_one_file_per_split(tmp_path, capsys):
    root = tmp_path / "Slake1.0"
    for k in range(3):
        _jpeg(root / "imgs" / f"xmlab{k}" / "source.jpg")
    for k, name in enumerate(("train", "validate", "test")):
        items = [
            {"img_id": k, "img_name": f"xmlab{k}/source.jpg", "question": f"Which organ is shown in {name}?",
             "answer": "Lung", "q_lang": "en", "answer_type": "OPEN", "modality": "CT", "location": "Chest",
             "qid": 10 * k},
            {"img_id": k, "img_name": f"xmlab{k}/source.jpg", "question": "哪个器官?", "answer": "肺",
             "q_lang": "zh", "answer_type": "OPEN", "modality": "CT", "qid": 10 * k + 1},
        ]
        (root / f"{name}.json").write_text(json.dumps(items, ensure_ascii=False))
    out = tmp_path / "slake_rows"
    assert main(["data", "convert", "--from", "slake", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for split, k in (("train", 0), ("val", 1), ("test", 2)):
        (row,) = _rows(out / f"{split}.jsonl")
        assert row["meta"]["split"] == split and row["images"] == [f"../Slake1.0/imgs/xmlab{k}/source.jpg"]
    assert "skipped 3 row(s): language 3" in printed and "one file per split" in printed
    assert validate_files(sorted(out.glob("*.jsonl"))).ok == 3


def test_pathvqa_release_folder_pickles_and_split_image_folders(tmp_path, capsys):
    root = tmp_path / "pvqa"
    for split in ("train", "val", "test"):
        _jpeg(root / "images" / split / f"{split}_0000.jpg")
        (root / "qas" / split).mkdir(parents=True)
        items = [{"image": f"{split}_0000", "question": "Is this malignant?", "answer": "yes"}]
        with open(root / "qas" / split / f"{split}_qa.pkl", "wb") as handle:
            pickle.dump(items, handle)
    out = tmp_path / "pvqa_rows"
    assert main(["data", "convert", "--from", "pathvqa", str(root), "--out", str(out)]) == 0
    for split in ("train", "val", "test"):
        (row,) = _rows(out / f"{split}.jsonl")
        assert row["images"] == [f"../pvqa/images/{split}/{split}_0000.jpg"] and row["meta"]["split"] == split
    assert "validation of the written rows: 3 row(s) ok" in capsys.readouterr().out


def test_mecovqa_g_finds_sa_med2d_beside_the_file(tmp_path):
    root = tmp_path / "MeCoVQA"
    _image(root / "SAMed2Dv1" / "images" / "ct_00--case--x_0040.png")
    _mask(root / "SAMed2Dv1" / "masks" / "ct_00--case--x_0040--liver.png")
    items = [{"id": "a1", "image": "images/ct_00--case--x_0040.png", "conversations": [
        {"from": "human", "value": "<image>\nPlease segment the liver."},
        {"from": "gpt", "value": "<SEG><mask>masks/ct_00--case--x_0040--liver.png</mask>"}]}]
    (root / "MeCoVQA_Grounding_test.json").write_text(json.dumps(items))
    out = tmp_path / "seg.jsonl"
    report = convert_file("mecovqa-g", root / "MeCoVQA_Grounding_test.json", out)
    assert report.ok and report.outputs == {"test": (out, 1)}
    (row,) = _rows(out)
    assert row["images"] == ["MeCoVQA/SAMed2Dv1/images/ct_00--case--x_0040.png"]
    assert row["masks"] == ["MeCoVQA/SAMed2Dv1/masks/ct_00--case--x_0040--liver.png"]
    assert row["meta"]["split"] == "test"


def test_wrong_image_root_and_unreadable_images_fail_with_the_fix(tmp_path, capsys):
    root = tmp_path / "Slake1.0"
    _jpeg(root / "imgs" / "xmlab0" / "source.jpg")
    items = [{"img_name": "xmlab0/source.jpg", "question": "Is this CT?", "answer": "Yes", "q_lang": "en",
              "answer_type": "CLOSED"}]
    (root / "test.json").write_text(json.dumps(items))
    (tmp_path / "empty").mkdir()
    args = ["data", "convert", "--from", "slake", str(root), "--out", str(tmp_path / "o"), "--image_root"]
    assert main(args + [str(tmp_path / "empty")]) == 1
    printed = capsys.readouterr().out
    assert "wrote 0 row(s); skipped 1 row(s): missing_image 1" in printed
    assert f"not found (looked under {(tmp_path / 'empty').resolve()}): give --image_root the folder" in printed
    # a file that exists but is no image: written, then rejected by validation (exit 1, the reason printed)
    (root / "imgs" / "xmlab0" / "source.jpg").write_bytes(b"not a jpeg at all")
    assert main(args[:-1]) == 1
    printed = capsys.readouterr().out
    assert "wrote 1 row(s)" in printed and "validation of the written rows: 0 row(s) ok, 1 rejected" in printed
