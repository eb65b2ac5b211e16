"""Loaders for the public sets in their published layouts (tiny copies written here), and bad input."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from citrus_v.eval.loaders import load_data, modality_from_name
from citrus_v.eval.references import check_sample, pixel_spacing
from citrus_v.eval.samples import EvalDataError


def _image(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return path


def _mask(path: Path, size=(64, 48), box=(10, 10, 30, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 255
    Image.fromarray(mask).save(path)
    return path


def _one(values, **kwargs):
    loaded = load_data(values, **kwargs)
    assert len(loaded) == 1
    return loaded[0]


def test_vqa_rad_keeps_the_test_questions(tmp_path):
    root = tmp_path / "VQA_RAD"
    _image(root / "VQA_RAD Image Folder" / "synpic1.jpg")
    items = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "Yes",
         "answer_type": "CLOSED", "phrase_type": "test_freeform", "image_organ": "CHEST"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "Where is the mass?", "answer": "left lung",
         "answer_type": "OPEN", "phrase_type": "test_para", "image_organ": "CHEST"},
        {"qid": 3, "image_name": "synpic1.jpg", "question": "Train question?", "answer": "no",
         "answer_type": "CLOSED", "phrase_type": "freeform", "image_organ": "CHEST"},
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(items))
    loaded = _one([str(root)])  # recognised from its files
    assert loaded.name == "vqa-rad" and loaded.skipped == {"not_test_split": 1}
    closed, opened = loaded.samples
    assert (closed.task, closed.answer_type, closed.reference, closed.id) == ("vqa", "closed", "Yes", "1")
    assert opened.answer_type == "open" and opened.groups["dataset"] == "VQA-RAD"
    assert closed.prompt == "<image>Is there a mass?"
    check_sample(closed)  # the image is found under "VQA_RAD Image Folder"


def test_slake_keeps_english_and_counts_the_rest(tmp_path):
    root = tmp_path / "Slake1.0"
    _image(root / "imgs" / "xmlab1" / "source.jpg")
    items = [
        {"qid": 10, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung",
         "q_lang": "en", "answer_type": "OPEN", "modality": "CT"},
        {"qid": 11, "img_name": "xmlab1/source.jpg", "question": "哪个器官不正常?", "answer": "肺",
         "q_lang": "zh", "answer_type": "OPEN", "modality": "CT"},
    ]
    (root / "test.json").write_text(json.dumps(items, ensure_ascii=False))
    loaded = _one([str(root)])
    assert loaded.name == "slake" and loaded.skipped == {"other_language": 1}
    (sample,) = loaded.samples
    assert sample.groups["modality"] == "CT" and sample.reference == "Lung"
    check_sample(sample)


def test_pathvqa_pickle_is_read_without_running_code(tmp_path):
    root = tmp_path / "pvqa"
    _image(root / "images" / "test" / "test_0.jpg")
    (root / "qas" / "test").mkdir(parents=True)
    items = [{"image": "test_0", "question": "Is this inflammation?", "answer": "yes"},
             {"image": "test_0", "question": "What is present?", "answer": "granuloma"}]
    with open(root / "qas" / "test" / "test_qa.pkl", "wb") as handle:
        pickle.dump(items, handle)
    loaded = _one([f"pathvqa={root}"])
    assert [s.answer_type for s in loaded.samples] == ["closed", "open"]
    check_sample(loaded.samples[0])

    class Exploit:
        def __reduce__(self):
            return (print, ("this must not run",))

    with open(root / "qas" / "test" / "test_qa.pkl", "wb") as handle:
        pickle.dump([Exploit()], handle)
    with pytest.raises(EvalDataError, match="(?s)not a plain pickle.*expected layout"):
        load_data([f"pathvqa={root}"])


def test_pmc_vqa_multiple_choice(tmp_path):
    root = tmp_path / "PMC-VQA"
    _image(root / "images" / "fig1.jpg")
    with open(root / "test_clean.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
                         "Answer_label"])
        writer.writerow(["fig1.jpg", "What modality is shown?", "CT", "A:MRI", "B:CT", "C:X-ray", "D:PET", "B"])
    (sample,) = _one([str(root)]).samples
    assert sample.options == {"A": "MRI", "B": "CT", "C": "X-ray", "D": "PET"} and sample.reference == "B"
    assert sample.prompt == (
        "<image>What modality is shown?\nA. MRI\nB. CT\nC. X-ray\nD. PET\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert sample.template == "vqa-mc"
    check_sample(sample)


def test_medxpertqa_mm(tmp_path):
    root = tmp_path / "MedXpertQA"
    _image(root / "images" / "MM-1-a.jpeg")
    _image(root / "images" / "MM-1-b.jpeg")
    (root / "MM").mkdir(parents=True)
    item = {"id": "MM-1", "question": "Which is it? Answer Choices: (A) x (B) y (C) z (D) w (E) v",
            "options": {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}, "label": "C",
            "images": ["MM-1-a.jpeg", "MM-1-b.jpeg"], "body_system": "Skeletal", "question_type": "Reasoning"}
    (root / "MM" / "test.jsonl").write_text(json.dumps(item) + "\n")
    (sample,) = _one([str(root)]).samples
    assert sample.id == "MM-1" and len(sample.images) == 2 and sample.prompt.startswith("<image><image>Which")
    assert sample.prompt.endswith("choices directly.") and sample.template == "vqa-mc-inline"
    assert sample.groups["modality"] == "Skeletal"


def test_mecovqa_g_masks_and_modality_from_the_file_name(tmp_path):
    root = tmp_path / "MeCoVQA"
    _image(root / "images" / "ct_00--KiTS--case1--z_0040.png")
    _mask(root / "masks" / "ct_00--KiTS--case1--z_0040_kidney.png")
    item = {"id": "m1", "image": "images/ct_00--KiTS--case1--z_0040.png", "conversations": [
        {"from": "human", "value": "<image>\nPlease segment the left kidney."},
        {"from": "gpt", "value": "<SEG><mask>masks/ct_00--KiTS--case1--z_0040_kidney.png</mask>"}]}
    (root / "test.json").write_text(json.dumps([item]))
    (sample,) = _one([f"mecovqa-g-plus={root / 'test.json'}"]).samples
    assert sample.task == "seg" and sample.groups["modality"] == "CT" and len(sample.reference) == 1
    assert sample.prompt == "<image>Please segment the left kidney."
    check_sample(sample)
    assert modality_from_name("mr_t1--BraTS2021--x--y_0075.png") == "MR"
    assert modality_from_name("scan.png") == "unknown"


def test_medsegbench_and_detection_and_reports(tmp_path):
    _image(tmp_path / "img.png")
    _mask(tmp_path / "seg.png")
    bench = [{"id": "b1", "images": ["img.png"], "masks": ["seg.png"], "conversations": [
        {"from": "human", "value": "<image>Segment the polyp."}, {"from": "gpt", "value": "[SEG]"}],
        "metadata": {"dataset": "Kvasir", "region": "colon"}}]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    detection = {"image": "img.png", "sentence": "polyp", "bbox": [0.1, 0.2, 0.5, 0.6], "width": 64, "height": 48}
    (tmp_path / "det.jsonl").write_text(json.dumps(detection) + "\n")
    with open(tmp_path / "reports.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path_to_image", "section_findings"])
        writer.writerow(["img.png", "No acute cardiopulmonary process."])
        writer.writerow(["img.png", ""])
    loaded = load_data([f"medsegbench={tmp_path / 'bench.json'},detection={tmp_path / 'det.jsonl'}",
                        f"report={tmp_path / 'reports.csv'}"])
    seg, det, report = (result.samples[0] for result in loaded)
    assert seg.groups["dataset"] == "Kvasir" and seg.groups["region"] == "colon"
    assert det.prompt == "<image>Locate the polyp, output its bbox coordinates using JSON format."
    assert det.reference == [pytest.approx([6.4, 9.6, 32.0, 28.8])]
    assert report.reference == "No acute cardiopulmonary process." and loaded[2].skipped == {"no_findings": 1}
    for sample in (seg, det, report):
        check_sample(sample)


def test_missing_and_malformed_sets_name_the_expected_layout(tmp_path):
    with pytest.raises(EvalDataError, match="no such file or folder\nexpected layout \\(VQA-RAD\\)"):
        load_data([f"vqa-rad={tmp_path / 'absent'}"])
    root = tmp_path / "Slake1.0"
    (root / "imgs").mkdir(parents=True)
    (root / "test.json").write_text(json.dumps([{"img_name": "x.jpg", "answer": "yes"}]))
    with pytest.raises(EvalDataError, match=r"test.json:1: \[schema\].*question.*\nexpected layout \(SLAKE 1.0\)"):
        load_data([str(root)])
    (tmp_path / "odd").mkdir()
    with pytest.raises(EvalDataError, match="(?s)layout was not recognised.*vqa-rad:"):
        load_data([str(tmp_path / "odd")])
    with pytest.raises(EvalDataError, match="unknown layout 'nope'"):
        load_data(["nope=/x"])
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(EvalDataError, match="bad.jsonl:1.*invalid JSON"):
        load_data([f"rows={tmp_path / 'bad.jsonl'}"])


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _seg_row(mask: str, row_id: str = "r1") -> dict:
    return {"id": row_id, "task": "segmentation", "images": ["img.png"], "masks": [mask], "messages": [
        {"role": "user", "content": "<image>Segment the lesion."},
        {"role": "assistant", "content": "Sure, it is [SEG]."}]}


def test_duplicate_ids_are_refused_with_both_places(tmp_path):
    _image(tmp_path / "img.png")
    _mask(tmp_path / "m.png")
    _rows(tmp_path / "rows.jsonl", [_seg_row("m.png", "same"), _seg_row("m.png", "same")])
    with pytest.raises(EvalDataError, match=r"duplicate sample id 'same': .*rows.jsonl:2 and .*rows.jsonl:1"):
        load_data([str(tmp_path / "rows.jsonl")])


def test_ground_truth_mask_of_the_wrong_size_names_the_sample(tmp_path):
    _image(tmp_path / "img.png", size=(64, 48))
    _mask(tmp_path / "small.png", size=(32, 24))
    _rows(tmp_path / "rows.jsonl", [_seg_row("small.png", "case-7")])
    (sample,) = _one([str(tmp_path / "rows.jsonl")]).samples
    with pytest.raises(EvalDataError, match=r"sample 'case-7'.*mask 0 is 32x24 \(WxH\) but its image is 64x48"):
        check_sample(sample)


def test_box_outside_the_image_names_the_sample(tmp_path):
    _image(tmp_path / "img.png", size=(64, 48))
    row = {"id": "det-3", "task": "detection", "images": ["img.png"],
           "objects": {"ref": ["lesion"], "bbox": [[10, 10, 70, 40]]},
           "messages": [{"role": "user", "content": "<image>Locate the lesion."},
                        {"role": "assistant", "content": '[{"bbox_2d": <bbox>, "label": "<ref-object>"}]'}]}
    _rows(tmp_path / "rows.jsonl", [row])
    (sample,) = _one([str(tmp_path / "rows.jsonl")]).samples
    assert sample.prompt == "<image>Locate the lesion."
    with pytest.raises(EvalDataError, match=r"sample 'det-3'.*box 0 \[10, 10, 70, 40\] lies outside the 64x48 image"):
        check_sample(sample)


def test_pixel_spacing_from_dicom_and_nifti(tmp_path):
    from citrus_v.data.corpus import write_dicom, write_volume
    from citrus_v.data.phantoms import make_anatomy
    from citrus_v.eval.samples import EvalSample
    from citrus_v.media import image_size

    # NIfTI voxels 0.5 (x) by 0.8 (y) mm: the displayed slice's rows follow y, its columns x
    write_volume(tmp_path / "vol.nii.gz", [np.zeros((30, 40))] * 3, (0.5, 0.8, 2.5), np.int16)
    nifti = EvalSample("n", "seg", "", ["vol.nii.gz#slice=1"], [], "t", base_dir=tmp_path)
    assert image_size("vol.nii.gz#slice=1", tmp_path) == (40, 30)
    assert pixel_spacing(nifti) == pytest.approx((0.8, 0.5))
    anatomy = make_anatomy(np.random.default_rng(0), "CT", "abdomen", 64)
    write_dicom(tmp_path / "ct.dcm", np.zeros((64, 64)), anatomy, "uid", np.random.default_rng(0))
    dicom = EvalSample("d", "seg", "", ["ct.dcm"], [], "t", base_dir=tmp_path)
    assert pixel_spacing(dicom) == pytest.approx((round(anatomy.spacing_mm, 4),) * 2)
    png = EvalSample("p", "seg", "", [str(_image(tmp_path / "a.png"))], [], "t")
    assert pixel_spacing(png) is None
    png.spacing = (0.3, 0.3)  # a row's own meta.spacing wins
    assert pixel_spacing(png) == (0.3, 0.3)
