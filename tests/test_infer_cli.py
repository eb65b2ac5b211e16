"""`citrus-v infer`: the answer, the overlay, and masks as PNG, NIfTI (source affine) and DICOM-SEG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from citrus_v.cli import main
from citrus_v.infer.commands import infer_file, load_source

from .conftest import phantom
from .test_serve_support import ScriptedPredictor, png_bytes


@pytest.fixture(scope="module")
def scripted(tiny):
    model, processor = tiny
    return ScriptedPredictor(model, processor)


def test_infer_command_prints_the_answer_and_writes_the_overlay(tiny_dir, tmp_path, capsys):
    image = tmp_path / "scan.png"
    image.write_bytes(png_bytes(phantom(1, size=160).image))
    out = tmp_path / "out"
    code = main(
        [
            "infer",
            "--model",
            str(tiny_dir),
            "--image",
            str(image),
            "--query",
            "Describe the image.",
            "--out",
            str(out),
            "--max_new_tokens",
            "6",
        ]
    )
    assert code == 0
    result = json.loads((out / "prediction.json").read_text())
    printed = capsys.readouterr()
    assert printed.out.strip() == result["answer"].strip()
    assert "wrote" in printed.err and str(out / "overlay.png") in printed.err
    with Image.open(out / "overlay.png") as overlay:
        assert overlay.width == 160 and overlay.height >= 160
    assert result["image"] == {
        "path": str(image),
        "kind": "raster",
        "size": {"width": 160, "height": 160},
        "slice": None,
        "axis": None,
        "frame": None,
        "window": None,
    }


def test_infer_command_names_a_missing_image(tiny_dir, tmp_path, capsys):
    assert main(["infer", "--model", str(tiny_dir), "--image", str(tmp_path / "no.png"), "--query", "q"]) == 2
    assert "no.png" in capsys.readouterr().err


def test_png_masks_and_overlay_with_legend(scripted, tmp_path):
    image = tmp_path / "scan.png"
    image.write_bytes(png_bytes(np.pad(phantom(2, size=120).image, ((0, 0), (0, 40)))))
    result = infer_file(scripted, load_source(image), "Please segment the lesion.", tmp_path / "out")
    assert result["text"] == "Sure, the lesion [SEG] and the organ [SEG]."
    assert [m["label"] for m in result["masks"]] == ["lesion", "organ"]
    direct = scripted.predict(load_source(image).image, "<image>Please segment the lesion.")
    for k, expected in enumerate(direct.masks):
        with Image.open(tmp_path / "out" / f"mask_{k}.png") as written:
            assert written.size == (160, 120)
            assert np.array_equal(np.asarray(written) > 0, expected.mask)
    with Image.open(tmp_path / "out" / "overlay.png") as overlay:
        assert overlay.height > 120  # the legend strip below the image


def test_nifti_masks_keep_the_source_grid_and_affine(scripted, tmp_path):
    nib = pytest.importorskip("nibabel")
    from citrus_v.media import read_mask

    volume = np.stack([phantom(k, size=64).image.astype(np.float32) * 4 - 1000 for k in range(5)], axis=-1)
    affine = np.array([[-0.8, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])  # LPS-like
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    source = load_source(path, slice_index=3, window="ct-abdomen")
    assert source.kind == "nifti" and source.slice == 3 and source.image.size == (64, 64)
    result = infer_file(scripted, source, "Please segment the lesion.", tmp_path / "out")
    assert result["image"]["slice"] == 3 and result["image"]["window"] == "ct-abdomen"
    direct = scripted.predict(source.image, "<image>Please segment the lesion.")
    for k, expected in enumerate(direct.masks):
        written = nib.load(tmp_path / "out" / f"mask_{k}.nii.gz")
        assert written.shape == volume.shape and np.allclose(written.affine, affine)
        data = np.asarray(written.dataobj)
        assert data.sum() == expected.mask.sum()
        assert np.array_equal(read_mask(f"{tmp_path / 'out' / f'mask_{k}.nii.gz'}#slice=3"), expected.mask)


def test_dicom_masks_as_a_dicom_seg(scripted, tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pydicom.data import get_testdata_file

    source_path = get_testdata_file("CT_small.dcm")
    source = load_source(source_path, window="ct-abdomen")
    assert source.kind == "dicom" and source.image.size == (128, 128)
    result = infer_file(scripted, source, "Please segment the lesion.", tmp_path / "out")
    seg_path = tmp_path / "out" / "masks.seg.dcm"
    pngs = [str(tmp_path / "out" / f"mask_{k}.png") for k in range(2)]
    assert result["files"]["masks"] == [*pngs, str(seg_path)] and result["not_written"] == []
    seg = hd.seg.segread(seg_path)
    original = pydicom.dcmread(source_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.number_of_segments == 2
    assert [seg.get_segment_description(k).segment_label for k in (1, 2)] == ["lesion", "organ"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == original.SeriesInstanceUID
    direct = scripted.predict(source.image, "<image>Please segment the lesion.")
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[original.SOPInstanceUID], segment_numbers=[1, 2]
    )[0]
    for k, expected in enumerate(direct.masks):
        assert np.array_equal(pixels[..., k] > 0, expected.mask)


def test_a_dicom_without_patient_birth_date_still_gets_a_valid_seg(scripted, tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pydicom.data import get_testdata_file

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName"):
        delattr(dataset, keyword)
    source_path = tmp_path / "anonymous.dcm"
    dataset.save_as(source_path)
    result = infer_file(scripted, load_source(source_path), "Please segment the lesion.", tmp_path / "out")
    assert result["not_written"] == []
    seg = hd.seg.segread(tmp_path / "out" / "masks.seg.dcm")  # highdicom reads it back
    assert seg.number_of_segments == 2 and seg.PatientBirthDate == ""
    assert "PatientBirthDate" not in pydicom.dcmread(source_path)  # the source file is left as it was


def test_a_format_that_cannot_be_written_loses_neither_the_answer_nor_the_other_files(
    scripted, tiny_dir, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("highdicom")
    from pydicom.data import get_testdata_file

    from citrus_v.infer.predictor import CitrusVPredictor

    # an Enhanced MR frame that highdicom refuses to segment (no per-frame Frame of Reference for one frame)
    source = load_source(get_testdata_file("emri_small.dcm"), frame=3)
    result = infer_file(scripted, source, "Please segment the lesion.", tmp_path / "out")
    assert result["text"] == "Sure, the lesion [SEG] and the organ [SEG]."
    assert result["files"]["masks"] == [str(tmp_path / "out" / f"mask_{k}.png") for k in range(2)]
    assert all((tmp_path / "out" / f"mask_{k}.png").is_file() for k in range(2))
    assert len(result["not_written"]) == 1 and result["not_written"][0].startswith("DICOM-SEG not written (")
    assert json.loads((tmp_path / "out" / "prediction.json").read_text())["text"] == result["text"]
    # the command prints the answer and the one line, and exits 0
    monkeypatch.setattr(CitrusVPredictor, "from_pretrained", classmethod(lambda cls, *a, **k: scripted))
    code = main(["infer", "--model", str(tiny_dir), "--image", get_testdata_file("emri_small.dcm"), "--frame", "3",
                 "--query", "Please segment the lesion.", "--out", str(tmp_path / "cli")])
    printed = capsys.readouterr()
    assert code == 0
    assert printed.out.strip() == result["answer"].strip()
    assert "citrus-v infer: DICOM-SEG not written" in printed.err
