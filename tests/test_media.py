"""Medical image I/O on the real DICOM and NIfTI files that pydicom, pydicom-data and nibabel ship."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_windowing

from citrus_v.media import (
    WINDOW_PRESETS,
    MedicalImageError,
    Window,
    apply_window,
    image_size,
    mask_to_rle,
    parse_ref,
    parse_window,
    read_dicom,
    read_image,
    read_mask,
    read_nifti,
    rle_to_mask,
)
from citrus_v.processing.images import load_image


def _testfile(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return path


def _pydicom_window(values: np.ndarray, ds: pydicom.Dataset, center: float, width: float) -> np.ndarray:
    """pydicom's own windowing, rescaled from its output range to 0..255 (an independent reference)."""
    ds = ds.copy()
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.VOILUTFunction = "LINEAR"
    out = apply_windowing(values.copy(), ds)
    bits = int(ds.BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    lo, hi = lo * slope + intercept, hi * slope + intercept
    return (out - lo) / (hi - lo) * 255.0


def test_ct_small_rescale_and_presets():
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_dicom(path)
    # Hounsfield units = stored * slope + intercept (slope 1, intercept -1024 in this file)
    assert np.array_equal(image.values, ds.pixel_array.astype(np.float64) - 1024.0)
    assert image.window is None  # the file carries no window: the preset or full range applies
    for name in ("ct-abdomen", "ct-lung", "ct-bone", "ct-brain", "ct-liver"):
        center, width = WINDOW_PRESETS[name]
        ours = image.to_uint8(name).astype(np.float64)
        assert np.abs(ours - _pydicom_window(image.values, ds, center, width)).max() <= 1.0, name
    abdomen = image.to_uint8("ct-abdomen")
    # air (< -160 HU) is black and dense bone (> 240 HU) white in the abdomen window
    assert (abdomen[image.values < -160] == 0).all() and (abdomen[image.values > 240] == 255).all()
    explicit = image.to_uint8("40,400")
    assert np.array_equal(explicit, abdomen)
    # full range without a window: min -> 0, max -> 255
    full = image.to_uint8()
    assert full.min() == 0 and full.max() == 255


def test_mr_small_uses_the_files_window():
    path = _testfile("MR_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_dicom(path)
    assert image.window == Window(600.0, 1600.0)
    ours = np.asarray(read_image(path))[..., 0].astype(np.float64)
    assert np.abs(ours - _pydicom_window(image.values, ds, 600.0, 1600.0)).max() <= 1.0
    # a window named in the reference overrides the file's
    narrow = np.asarray(read_image(path + "#window=600,200"))[..., 0]
    assert np.array_equal(narrow, apply_window(image.values, Window(600, 200)))


def test_compressed_transfer_syntaxes_decode_like_the_uncompressed_files():
    pairs = [("693_J2KR.dcm", "693_UNCR.dcm"), ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm")]
    pairs.append(("MR_small_RLE.dcm", "MR_small.dcm"))
    for compressed, plain in pairs:
        a, b = read_dicom(_testfile(compressed)), read_dicom(_testfile(plain))
        assert np.array_equal(a.values, b.values), compressed
    ct = read_dicom(_testfile("693_J2KR.dcm"))
    assert ct.window == Window(40.0, 100.0) and ct.values.min() < -1000  # HU after the -1024 intercept


def test_monochrome1_is_inverted():
    path = _testfile("RG1_J2KR.dcm")
    image = read_dicom(path)
    assert image.photometric == "MONOCHROME1"
    pixels = np.asarray(read_image(path))[..., 0]
    assert np.array_equal(pixels, 255 - apply_window(image.values, image.window))
    # with MONOCHROME1 high values are dark
    assert pixels.flat[np.argmax(image.values)] < pixels.flat[np.argmin(image.values)]


def test_multiframe_picks_a_frame():
    path = _testfile("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array
    assert frames.shape[0] == 10
    for k in (0, 3, 9):
        assert np.array_equal(read_dicom(path, frame=k).values, frames[k].astype(np.float64))
    assert read_image(path + "#frame=3").size == (64, 64)
    with pytest.raises(MedicalImageError, match="frame 10 does not exist; the file has 10 frame"):
        read_dicom(path, frame=10)


def test_colour_dicom_and_truncated_compressed_data():
    rgb = np.asarray(read_image(_testfile("SC_rgb.dcm")))
    assert rgb.shape == (100, 100, 3) and rgb[..., 0].max() == 255
    with pytest.raises(MedicalImageError) as err:
        read_image(_testfile("emri_small_jpeg_2k_lossless_too_short.dcm"))
    assert err.value.reason == "unreadable_image" and "emri_small_jpeg_2k_lossless_too_short.dcm" in str(err.value)


def test_nifti_4d_slices_orientation_and_mask_write_back(tmp_path):
    path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    raw = nib.load(path)
    assert nib.aff2axcodes(raw.affine) == ("L", "A", "S")
    volume = read_nifti(path, t=1)
    data = np.asarray(raw.dataobj[..., 1])
    # LAS -> RAS flips the first axis only
    assert np.array_equal(volume.data, data[::-1])
    middle = volume.slice(axis=2)
    assert middle.shape == (96, 128)  # rows = anterior..posterior, columns = patient right..left
    assert np.array_equal(middle, data[:, :, 12].T[::-1])  # radiological: image left = patient right
    assert image_size(path) == (128, 96) == read_image(path + "#slice=5&t=1").size
    # one window for the whole volume: the brightest voxel of the volume is 255 in its slice
    k = int(np.unravel_index(np.argmax(volume.data), volume.data.shape)[2])
    assert np.asarray(read_image(f"{path}#slice={k}&t=1"))[..., 0].max() == 255
    # slices -> label volume on the original grid, with the original affine
    slices = [(s > np.percentile(s, 90)).astype(np.uint8) for s in volume.slices(axis=2)]
    label = volume.mask_image(slices, axis=2)
    assert label.shape == raw.shape[:3] and np.allclose(label.affine, raw.affine)
    assert np.array_equal(label.get_fdata() > 0, volume.volume_from_slices(slices, axis=2) > 0)
    nib.save(label, tmp_path / "label.nii.gz")
    back = read_mask(f"{tmp_path / 'label.nii.gz'}#slice=7")
    assert np.array_equal(back, slices[7].astype(bool))
    # other axes give the other planes with matching sizes
    for axis in (0, 1):
        assert read_image(path, window=None).size and volume.slice(3, axis).shape == image_size(
            f"{path}#axis={axis}"
        )[::-1]


def test_nifti_label_values_and_3d_files(tmp_path):
    anatomical = os.path.join(NIBABEL_DATA, "anatomical.nii")
    assert read_image(anatomical).size == image_size(anatomical)
    labels = np.zeros((6, 5, 4), dtype=np.uint8)
    labels[1:3, 1:3, 2] = 1
    labels[4, 3, 2] = 2
    nib.save(nib.Nifti1Image(labels, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "seg.nii.gz")
    both = read_mask(f"{tmp_path / 'seg.nii.gz'}#slice=2")
    two = read_mask({"path": str(tmp_path / "seg.nii.gz"), "slice": 2, "label": 2})
    assert both.sum() == 5 and two.sum() == 1 and (both & two).sum() == 1


def test_png_jpeg_tiff_16bit_and_windows(tmp_path):
    gradient = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    Image.fromarray(gradient).save(tmp_path / "a.png")
    Image.fromarray(gradient).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(gradient).save(tmp_path / "a.tif")
    for name in ("a.png", "a.tif"):
        assert np.array_equal(np.asarray(read_image(tmp_path / name))[..., 0], gradient)
    assert np.abs(np.asarray(read_image(tmp_path / "a.jpg"))[..., 0].astype(int) - gradient).max() < 8
    deep = (np.arange(64 * 64).reshape(64, 64) * 10).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    pixels = np.asarray(read_image(tmp_path / "deep.png"))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255  # full range of a 16-bit image
    windowed = np.asarray(read_image(f"{tmp_path / 'deep.png'}#window=20000,10000"))[..., 0]
    assert np.array_equal(windowed, apply_window(deep.astype(np.float64), Window(20000, 10000)))


def test_bad_files_get_reasons(tmp_path):
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    cases = {
        tmp_path / "missing.png": "missing_file",
        tmp_path / "cut.png": "truncated_image",
        tmp_path / "junk.png": "unreadable_image",
        tmp_path / "junk.dcm": "unreadable_image",
    }
    for path, reason in cases.items():
        with pytest.raises(MedicalImageError) as err:
            read_image(path)
        assert err.value.reason == reason and path.name in str(err.value), path
    with pytest.raises(MedicalImageError, match="90000 pixels is over the limit of 1000") as err:
        read_image(tmp_path / "full.png", max_pixels=1000)
    assert err.value.reason == "image_too_large"
    with pytest.raises(MedicalImageError, match="pixels is over the limit"):
        read_image(_testfile("CT_small.dcm"), max_pixels=100)
    with pytest.raises(MedicalImageError, match="unknown window 'ct-heart'"):
        parse_window("ct-heart")


def test_references_and_processor_delegation(tmp_path):
    ref = parse_ref("scans/a.nii.gz#slice=3&axis=1&window=ct-lung", tmp_path)
    assert (ref.path, ref.slice, ref.axis, ref.window, ref.kind) == (
        tmp_path / "scans/a.nii.gz",
        3,
        1,
        "ct-lung",
        "nifti",
    )
    assert parse_ref("odd#name.png").path.name == "odd#name.png"  # not a fragment
    with pytest.raises(MedicalImageError, match="slice='x' is not an integer"):
        parse_ref("a.nii#slice=x")
    # the processor's load_image reads DICOM and NIfTI through this module
    mr = _testfile("MR_small.dcm")
    assert np.array_equal(np.asarray(load_image(mr)), np.asarray(read_image(mr)))
    nifti = os.path.join(NIBABEL_DATA, "example4d.nii.gz") + "#slice=4"
    assert load_image(nifti).size == (128, 96)


def test_rle_and_polygon_masks():
    mask = np.zeros((40, 30), bool)
    mask[5:20, 10:25] = True
    rle = mask_to_rle(mask)
    assert rle["size"] == [40, 30] and isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_mask(rle), mask)
    assert np.array_equal(read_mask(rle), mask)
    # uncompressed counts (column-major run lengths): 5 background, 3 foreground, rest background
    flat = read_mask({"size": [4, 4], "counts": [5, 3, 8]})
    assert flat.sum() == 3 and flat[1:4, 1].all()
    square = read_mask({"polygons": [[10, 10, 20, 10, 20, 20, 10, 20]]}, size=(30, 40))
    assert square.shape == (40, 30) and 90 <= square.sum() <= 121
    with pytest.raises(MedicalImageError, match="at least 3"):
        read_mask({"polygons": [[1, 2, 3, 4]], "size": [5, 5]})


def test_nifti_from_bytes_names_its_source():
    """A volume sent as bytes (a data: URL) reads like the file; every error names where the bytes came from."""
    from citrus_v.media.nifti import is_nifti, read_nifti_bytes

    for name in ("example4d.nii.gz", "anatomical.nii", "example_nifti2.nii.gz"):  # gzip, plain, NIfTI-2
        path = os.path.join(NIBABEL_DATA, name)
        with open(path, "rb") as handle:
            data = handle.read()
        assert is_nifti(data)
        from_bytes, from_file = read_nifti_bytes(data, "the data: URL"), read_nifti(path)
        assert np.array_equal(from_bytes.data, from_file.data) and np.array_equal(from_bytes.affine, from_file.affine)
        assert from_bytes.picture(3) == read_image(f"{path}#slice=3")  # the same RGB slice as a file reference
    with open(os.path.join(NIBABEL_DATA, "example4d.nii.gz"), "rb") as handle:
        gz = handle.read()
    assert not is_nifti(b"\x89PNG\r\n\x1a\n" + bytes(600)) and not is_nifti(gz[:40])
    for broken, reason in ((gz[: len(gz) // 2], "not a readable NIfTI file"), (b"GIF89a" + bytes(600), "not a NIfTI")):
        with pytest.raises(MedicalImageError, match=f"^the data: URL: {reason}") as caught:
            read_nifti_bytes(broken, "the data: URL")
        assert "BytesIO" not in str(caught.value)
    with pytest.raises(MedicalImageError, match="^the data: URL: 294912 pixels is over the limit") as caught:
        read_nifti_bytes(gz, "the data: URL", max_pixels=1000)  # refused from the header, before inflating
    assert caught.value.reason == "image_too_large" and "--max_image_pixels" in str(caught.value)
    with pytest.raises(MedicalImageError, match="not a NIfTI volume"):  # CIFTI-2 in a .nii file
        read_nifti(os.path.join(NIBABEL_DATA, "row_major.dconn.nii"))
