"""`citrus-v infer`: the answer, the overlay, and masks as PNG, NIfTI (source affine) and DICOM-SEG."""

from __future__ import annotations

import json
from pathlib import Path

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
    with Image.open(out / "overlay.png") as overlay:  # small images are drawn enlarged by a whole factor
        assert overlay.width % 160 == 0 and overlay.height >= overlay.width
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
        with Image.open(tmp_path / "out" / f"mask_{k + 1}.png") as written:
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
        written = nib.load(tmp_path / "out" / f"mask_{k + 1}.nii.gz")
        assert written.shape == volume.shape and np.allclose(written.affine, affine)
        data = np.asarray(written.dataobj)
        assert data.sum() == expected.mask.sum()
        assert np.array_equal(read_mask(f"{tmp_path / 'out' / f'mask_{k + 1}.nii.gz'}#slice=3"), expected.mask)


def test_dicom_masks_as_a_dicom_seg(scripted, tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pydicom.data import get_testdata_file

    source_path = get_testdata_file("CT_small.dcm")
    source = load_source(source_path, window="ct-abdomen")
    assert source.kind == "dicom" and source.image.size == (128, 128)
    result = infer_file(scripted, source, "Please segment the lesion.", tmp_path / "out")
    seg_path = tmp_path / "out" / "masks.seg.dcm"
    pngs = [str(tmp_path / "out" / f"mask_{k + 1}.png") for k in range(2)]
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

    # a JPEG-LS file from pydicom's test set with no Study or Series Instance UID: no Segmentation can name it
    path = get_testdata_file("JPEGLSNearLossless_08.dcm")
    result = infer_file(scripted, load_source(path), "Please segment the lesion.", tmp_path / "out")
    assert result["text"] == "Sure, the lesion [SEG] and the organ [SEG]."
    assert result["files"]["masks"] == [str(tmp_path / "out" / f"mask_{k + 1}.png") for k in range(2)]
    assert all((tmp_path / "out" / f"mask_{k + 1}.png").is_file() for k in range(2))
    [problem] = result["not_written"]
    assert problem.startswith("DICOM-SEG not written (ValueError: ")
    assert "StudyInstanceUID, SeriesInstanceUID" in problem
    assert json.loads((tmp_path / "out" / "prediction.json").read_text())["text"] == result["text"]
    # the command prints the answer and the one line, and exits 0
    monkeypatch.setattr(CitrusVPredictor, "from_pretrained", classmethod(lambda cls, *a, **k: scripted))
    code = main(["infer", "--model", str(tiny_dir), "--image", path,
                 "--query", "Please segment the lesion.", "--out", str(tmp_path / "cli")])
    printed = capsys.readouterr()
    assert code == 0
    assert printed.out.strip() == result["answer"].strip()
    assert "citrus-v infer: DICOM-SEG not written" in printed.err


def test_an_enhanced_multiframe_mr_gets_its_seg_on_the_chosen_frame(scripted, tmp_path):
    """emri_small.dcm is an Enhanced MR with a Frame of Reference but no functional groups (no positions):
    highdicom cannot place it in space, so the Segmentation references frame 4 (1-based) by number."""
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small.dcm")
    source = load_source(path, frame=3)
    result = infer_file(scripted, source, "Please segment the lesion.", tmp_path / "out")
    assert result["not_written"] == [] and result["files"]["masks"][-1] == str(tmp_path / "out" / "masks.seg.dcm")
    seg = hd.seg.segread(tmp_path / "out" / "masks.seg.dcm")
    original = pydicom.dcmread(path, stop_before_pixels=True)
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert derivation.ReferencedSOPClassUID == original.SOPClassUID and derivation.ReferencedFrameNumber == 4
    pixels = seg.get_pixels_by_source_frame(
        original.SOPInstanceUID, source_frame_numbers=[4], segment_numbers=[1, 2]
    )[0]
    for k in range(2):
        with Image.open(tmp_path / "out" / f"mask_{k + 1}.png") as png:
            assert np.array_equal(pixels[..., k] > 0, np.asarray(png) > 0)
    assert not seg.get_pixels_by_source_frame(original.SOPInstanceUID, source_frame_numbers=[1]).any()


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "RG1_J2KR.dcm"])
def test_rgb_and_unknown_pixel_spacing_sources_get_a_seg_highdicom_reads_back(name, tmp_path):
    """SC_rgb.dcm: RGB, pixel spacing without slice thickness; RG1_J2KR.dcm: a radiograph with spacing 0\\0.
    highdicom wrote both before, copying those pixel measures, and could not read the result back."""
    hd = pytest.importorskip("highdicom")
    import pydicom
    from pydicom.data import get_testdata_file

    from citrus_v.infer.mask_files import write_dicom_seg

    path = get_testdata_file(name)
    original = pydicom.dcmread(path, stop_before_pixels=True)
    mask = np.zeros((original.Rows, original.Columns), dtype=bool)
    mask[10:40, 20:70] = True
    write_dicom_seg(path, [mask], ["lesion"], tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = seg.get_pixels_by_source_instance([original.SOPInstanceUID], segment_numbers=[1])[0]
    assert np.array_equal(pixels[..., 0] > 0, mask)
    measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    assert measures is None or all(float(v) > 0 for v in measures[0].PixelSpacing)


def test_segments_are_coded_from_their_labels():
    from pydicom.sr.codedict import codes

    from citrus_v.infer.segment_codes import segment_code

    sct = codes.SCT
    heart = segment_code("heart")
    assert (heart.category, heart.type, heart.type_modifier) == (sct.AnatomicalStructure, sct.Heart, None)
    lung = segment_code("the right lung")
    assert (lung.category, lung.type, lung.type_modifier) == (sct.AnatomicalStructure, sct.Lung, sct.Right)
    assert segment_code("Both lungs").type_modifier == sct.Bilateral
    lesion = segment_code("lesion 2")
    assert (lesion.category, lesion.type, lesion.region) == (sct.MorphologicallyAbnormalStructure, sct.Lesion, None)
    cyst = segment_code("cyst in the left kidney")
    assert (cyst.type, cyst.region, cyst.region_modifier) == (sct.Cyst, sct.Kidney, sct.Left)
    assert segment_code("pulmonary nodules").type == sct.Nodule and segment_code("tumour").type == sct.Neoplasm
    assert segment_code("spinal cord").type == sct.SpinalCord and segment_code("organ").type == sct.Organ
    for nonsense in ("zorblax", "", None):
        generic = segment_code(nonsense)
        assert (generic.category, generic.type, generic.matched) == (sct.Tissue, sct.Tissue, False)


def test_the_seg_carries_each_segments_codes(tmp_path):
    hd = pytest.importorskip("highdicom")
    from pydicom.data import get_testdata_file

    from citrus_v.infer.mask_files import write_dicom_seg

    masks = [np.eye(128, dtype=bool), np.ones((128, 128), dtype=bool), np.zeros((128, 128), dtype=bool)]
    labels = ["heart", "right lung", "lesion in the left kidney"]
    write_dicom_seg(get_testdata_file("CT_small.dcm"), masks, labels, tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    heart, lung, lesion = (seg.SegmentSequence[k] for k in range(3))
    assert [s.SegmentLabel for s in (heart, lung, lesion)] == labels
    assert heart.SegmentedPropertyTypeCodeSequence[0].CodeValue == "80891009"  # SCT Heart
    assert heart.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # Anatomical Structure
    assert lung.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # SCT Lung
    assert lung.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"  # Right
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # Morphologically Abnormal
    region = lesion.AnatomicRegionSequence[0]
    assert region.CodeValue == "64033007" and region.AnatomicRegionModifierSequence[0].CodeValue == "7771000"


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz", "example4d.nii.gz"])
def test_nifti_masks_keep_the_sources_qform_and_sform_codes(name, tmp_path):
    """nibabel's own test volumes: qform/sform codes 2/2, 0/2 and 1/1 (4-D); the mask copies them."""
    nib = pytest.importorskip("nibabel")
    from nibabel.testing import data_path

    from citrus_v.infer.mask_files import write_nifti_masks
    from citrus_v.media import read_mask, read_nifti

    path = Path(data_path) / name
    plane = read_nifti(path).slice(1, 2)
    mask = np.zeros(plane.shape, dtype=bool)
    mask[1:3, 1:4] = True
    [written_path] = write_nifti_masks(path, [mask], 1, 2, tmp_path)
    written, source = nib.load(written_path), nib.load(path)
    assert written.shape == source.shape[:3] and np.allclose(written.affine, source.affine)
    for form in ("qform", "sform"):
        assert int(written.header[f"{form}_code"]) == int(source.header[f"{form}_code"])
        assert np.allclose(getattr(written, f"get_{form}")(), getattr(source, f"get_{form}")(), atol=1e-4)
    assert written.header.get_xyzt_units() == source.header.get_xyzt_units()
    assert np.array_equal(read_mask(f"{written_path}#slice=1"), mask)


def test_several_images_in_one_run_load_the_model_once(scripted, tiny_dir, tmp_path, capsys, monkeypatch):
    from pydicom.data import get_testdata_file

    from citrus_v.infer.predictor import CitrusVPredictor

    loads = []
    monkeypatch.setattr(
        CitrusVPredictor, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a) or scripted)
    )
    png = tmp_path / "scan.png"
    png.write_bytes(png_bytes(phantom(3, size=96).image))
    dicom = tmp_path / "ct.dcm"
    dicom.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    out = tmp_path / "out"
    code = main(["infer", "--model", str(tiny_dir), "--image", str(png), str(dicom),
                 "--query", "Describe the image.", "--out", str(out), "--max_new_tokens", "4"])
    printed = capsys.readouterr()
    assert code == 0 and len(loads) == 1
    for folder, image in (("scan", png), ("ct", dicom)):
        result = json.loads((out / folder / "prediction.json").read_text())
        assert result["image"]["path"] == str(image) and result["not_written"] == []
        assert (out / folder / "overlay.png").is_file()
        assert f"{image}: {result['answer']}" in printed.out.splitlines()
    assert "2 answered, 0 skipped" in printed.err


def test_a_folder_of_images_skips_the_unreadable_ones_and_goes_on(scripted, tiny_dir, tmp_path, capsys, monkeypatch):
    from citrus_v.infer.predictor import CitrusVPredictor

    monkeypatch.setattr(CitrusVPredictor, "from_pretrained", classmethod(lambda cls, *a, **k: scripted))
    folder = tmp_path / "scans"
    folder.mkdir()
    for k in (2, 1):
        (folder / f"scan{k}.png").write_bytes(png_bytes(phantom(k, size=96).image))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = main(["infer", "--model", str(tiny_dir), "--image", str(folder), "--query", "Describe the image.",
                 "--out", str(out), "--max_new_tokens", "4"])
    printed = capsys.readouterr()
    assert code == 1  # some were skipped
    answered = [line.split(":")[0] for line in printed.out.splitlines()]
    assert answered == [str(folder / "scan1.png"), str(folder / "scan2.png")]  # sorted by name
    assert sorted(p.name for p in out.iterdir()) == ["scan1", "scan2"]
    assert "2 answered, 1 skipped; 1 non-image file(s) ignored" in printed.err
    assert f"skipped {folder / 'broken.png'}: " in printed.err and "notes.txt" not in printed.err


def test_output_folders_are_named_for_their_images(tmp_path):
    from citrus_v.infer.commands import output_folders

    paths = [Path("a/scan.nii.gz"), Path("a/ct.png"), Path("a/ct.dcm"), Path("b/ct.dcm"), Path("a/x")]
    assert [f.name for f in output_folders(paths, tmp_path)] == ["scan", "ct.png", "ct.dcm", "ct.dcm-2", "x"]
    assert output_folders(paths[:1], tmp_path) == [tmp_path]  # one image: files directly in --out


def test_every_infer_flag_has_help():
    from citrus_v.cli import make_parser

    parser = make_parser()
    infer = next(a for a in parser._subparsers._group_actions if "infer" in a.choices).choices["infer"]
    flags = [a for a in infer._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} >= {"max_new_tokens", "temperature", "image", "out"}
    assert all(a.help for a in flags), [a.dest for a in flags if not a.help]
    assert all("_" in s or "-" not in s[2:] for a in flags for s in a.option_strings)  # underscore spelling
