"""Volumes and clips through the media layer, on real files: nibabel's NIfTI test volumes, the real CT series
of pydicom's DICOMDIR test set (and a series built from a real CT slice with edited headers), pydicom-data's
enhanced CT/MR, RT dose and ultrasound cine files, and videos written here with PyAV; and the frame sampling
arithmetic of qwen_vl_utils."""

from __future__ import annotations

import copy
import math
import os
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, pixel_array

from citrus_v.media import (
    MedicalImageError,
    VideoSampling,
    Window,
    probe_volume,
    probe_volume_bytes,
    read_nifti,
    read_volume,
    read_volume_bytes,
    sample_frames,
)
from citrus_v.media.frame_sampling import (
    clip_frame_indices,
    frame_pixel_bounds,
    smart_nframes,
    smart_resize,
    volume_frame_indices,
)

av = pytest.importorskip("av")


def _testfile(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return path


DICOMDIR_SET = Path(_testfile("CT_small.dcm")).parent / "dicomdirtests"


# ---- NIfTI ----


@pytest.mark.parametrize("name,t", [("example4d.nii.gz", 1), ("anatomical.nii", None)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_frames_affine_spacing_and_the_source_grid(name, t, axis):
    path = os.path.join(NIBABEL_DATA, name)
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    data = data[..., t] if data.ndim == 4 else data
    ref = f"{path}#axis={axis}" + (f"&t={t}" if t is not None else "")
    volume = read_volume(ref)
    assert volume.kind == "volume" and volume.axis == axis and volume.nifti is not None
    nifti = read_nifti(path, t)
    assert volume.num_frames == nifti.num_slices(axis)
    for k in (0, volume.num_frames // 2, volume.num_frames - 1):  # the same display slices as the 2-D reader
        assert np.array_equal(volume.values[k], nifti.slice(k, axis))
    # every display voxel (column, row, frame) lands through the volume's affine on the file voxel holding it
    frames, rows, cols = np.meshgrid(*(np.arange(s) for s in volume.values.shape), indexing="ij")
    display = np.stack([cols.ravel(), rows.ravel(), frames.ravel(), np.ones(cols.size)])
    voxels = np.rint(np.linalg.inv(image.affine) @ volume.affine @ display)[:3].astype(int)
    assert np.array_equal(data[tuple(voxels)], volume.values.ravel())
    # spacing (between frames, row, column) is the header's zooms, in the display axes' order
    steps = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
    assert np.allclose(steps, [volume.spacing[2], volume.spacing[1], volume.spacing[0]])
    assert sorted(volume.spacing) == sorted(float(z) for z in image.header.get_zooms()[:3])
    # a mask per frame goes back onto the file's own grid
    assert np.array_equal(volume.nifti.volume_from_slices(list(volume.values), axis), data)


def test_nifti_bytes_limits_and_subsets():
    path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    data = Path(path).read_bytes()
    from_path = read_volume(path + "#t=1")
    from_bytes = read_volume_bytes(data, "upload.nii.gz", t=1)
    assert np.array_equal(from_bytes.values, from_path.values) and np.allclose(from_bytes.affine, from_path.affine)
    header = probe_volume_bytes(data, "upload.nii.gz", axis=0)
    assert (header.num_frames, header.height, header.width) == (128, 24, 96)
    some = read_volume(path, frames=[0, 5, 5, 23])
    assert some.source_frames == [0, 5, 5, 23] and np.array_equal(some.values[2], read_volume(path).values[5])
    voxels = 128 * 96 * 24
    too_many = r"upload.nii.gz: 24 frames of 96x128 = 294912 voxels .*--max_voxels"
    with pytest.raises(MedicalImageError, match=too_many) as err:
        read_volume_bytes(data, "upload.nii.gz", max_voxels=voxels - 1)
    assert err.value.reason == "image_too_large"
    assert read_volume_bytes(data, "upload.nii.gz", max_voxels=voxels).num_frames == 24
    with pytest.raises(MedicalImageError, match="over the limit of 10.*--max_frames"):
        read_volume(path, max_frames=10)


# ---- DICOM series ----


def _ct5n() -> list[pydicom.Dataset]:
    folder = DICOMDIR_SET / "98892001" / "CT5N"
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def test_real_ct_series_is_ordered_along_the_normal():
    folder = DICOMDIR_SET / "98892001" / "CT5N"
    files = sorted(folder.iterdir())
    volume = read_volume(folder)
    slices = _ct5n()
    heights = [float(ds.ImagePositionPatient[2]) for ds in slices]
    order = np.argsort(heights)  # the files' names run from the top slice down: the reader reverses them
    assert list(order) == [4, 3, 2, 1, 0]
    assert [r.path for r in volume.references] == [str(files[k]) for k in order]
    assert [r.sop_instance_uid for r in volume.references] == [slices[k].SOPInstanceUID for k in order]
    expected = np.stack([slices[k].pixel_array * float(slices[k].RescaleSlope) + float(slices[k].RescaleIntercept)
                         for k in order])
    assert volume.values.dtype == np.float32 and np.array_equal(volume.values, expected)
    assert volume.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert volume.window == Window(40.0, 400.0)
    assert volume.voxel_ml == pytest.approx(2.5 * 0.488281**2 / 1000)
    for k, index in enumerate(order):  # the affine puts each frame's first pixel at its Image Position Patient
        assert np.allclose(volume.affine @ [0, 0, k, 1], [*slices[index].ImagePositionPatient, 1], atol=1e-4)
    # column 3, row 2 of the first frame: 3 pixels along the row direction (+x), 2 down the column (+y)
    corner = np.add(slices[order[0]].ImagePositionPatient, [3 * 0.488281, 2 * 0.488281, 0])
    assert np.allclose(volume.affine @ [3, 2, 0, 1], [*corner, 1], atol=1e-4)
    assert all("PixelData" not in ds for ds in volume.datasets)
    assert probe_volume(folder).num_frames == 5


def test_real_folders_with_a_gap_or_several_series():
    gapped = DICOMDIR_SET / "77654033" / "CT2"
    gap = r"17106 and .*17136 are 202.5 mm apart where the series steps 1.25 mm \(a missing slice\?\)"
    with pytest.raises(MedicalImageError, match=gap) as err:
        read_volume(gapped)
    assert err.value.reason == "uneven_spacing"
    study = DICOMDIR_SET / "98892001"
    with pytest.raises(MedicalImageError, match=r"holds 2 series.*Scout, 2 file.*#series=") as err:
        read_volume(study)
    assert err.value.reason == "mixed_series"
    uid = _ct5n()[0].SeriesInstanceUID
    picked = read_volume(f"{study}#series={uid}&window=ct-lung")
    assert picked.num_frames == 5 and picked.window == Window(-600.0, 1500.0)
    assert read_volume({"path": str(study), "series": uid}).num_frames == 5
    with pytest.raises(MedicalImageError, match="no series '1.2.3'") as err:
        read_volume(f"{study}#series=1.2.3")
    assert err.value.reason == "bad_reference"


def _write_series(folder: Path, heights: list[float | None], names: list[str] | None = None) -> list[Path]:
    """Copies of the real CT_small.dcm with edited position, UIDs, instance number and intercept."""
    folder.mkdir(parents=True, exist_ok=True)
    source = pydicom.dcmread(_testfile("CT_small.dcm"))
    series = pydicom.uid.generate_uid()
    paths = []
    for k, height in enumerate(heights):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.RescaleIntercept = -1024 + 100 * k  # tells the slices apart after ordering
        if height is None:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = [-158.135803, -179.035797, height]
        path = folder / (names[k] if names else f"slice{k}.dcm")
        ds.save_as(path)
        paths.append(path)
    return paths


def test_built_series_shuffled_zip_bytes_and_stray_files(tmp_path):
    heights = [12.0, 0.0, 8.0, 4.0, 16.0, 20.0]
    _write_series(tmp_path / "ct", heights, names=[f"IM{k:02d}" for k in (5, 2, 0, 4, 1, 3)])
    (tmp_path / "ct" / "README.txt").write_text("exported slices")
    (tmp_path / "ct" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.warns(UserWarning, match=r"1 file\(s\) are not readable DICOM images and were skipped: .*README.txt"):
        volume = read_volume(tmp_path / "ct")
    raw = pydicom.dcmread(_testfile("CT_small.dcm")).pixel_array.astype(np.float32)
    intercepts = [-1024 + 100 * k for k in np.argsort(heights)]  # each slice through its own rescale
    assert np.array_equal(volume.values, np.stack([raw + c for c in intercepts]))
    assert volume.spacing[0] == pytest.approx(4.0)
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "ct").glob("IM*")):
            zf.write(path, f"study/{path.name}")
        zf.writestr("__MACOSX/study/._IM00", b"resource fork")
    zipped = read_volume(archive)
    assert np.array_equal(zipped.values, volume.values) and np.allclose(zipped.affine, volume.affine)
    assert zipped.references[0].path.endswith("ct.zip:study/IM02")
    sent = read_volume_bytes(archive.read_bytes(), "upload.zip", frames=[5, 0])
    assert np.array_equal(sent.values, volume.values[[5, 0]]) and sent.source_frames == [5, 0]
    assert [r.sop_instance_uid for r in sent.references] == [volume.references[k].sop_instance_uid for k in (5, 0)]
    with pytest.raises(MedicalImageError, match="upload.zip: not a readable zip file"):
        read_volume_bytes(b"PK\x03\x04 truncated", "upload.zip")


def test_built_series_duplicates_gaps_and_missing_positions(tmp_path):
    _write_series(tmp_path / "dup", [0.0, 2.0, 2.0, 4.0])
    with pytest.raises(MedicalImageError, match=r"slice1.dcm and .*slice2.dcm lie at the same position") as err:
        read_volume(tmp_path / "dup")
    assert err.value.reason == "uneven_spacing"
    _write_series(tmp_path / "gap", [0.0, 2.0, 4.0, 8.0, 10.0])
    gap = r"slice2.dcm and .*slice3.dcm are 4 mm apart where the series steps 2 mm"
    with pytest.raises(MedicalImageError, match=gap):
        read_volume(tmp_path / "gap")
    _write_series(tmp_path / "nopos", [None, None, None], names=["c.dcm", "a.dcm", "b.dcm"])
    with pytest.warns(UserWarning, match="ordered by Instance Number, spacing unchecked"):
        volume = read_volume(tmp_path / "nopos")
    assert [Path(r.path).name for r in volume.references] == ["c.dcm", "a.dcm", "b.dcm"]
    assert volume.affine is None and volume.spacing == pytest.approx((5.0, 0.661468, 0.661468))  # SliceThickness


def test_series_limits_are_checked_before_any_pixel_is_decoded(tmp_path):
    paths = _write_series(tmp_path / "ct", [0.0, 1.0, 2.0])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 5000])  # a truncated slice: decoding it would fail
    with pytest.raises(MedicalImageError, match=r"3 frames of 128x128 = 49152 voxels is over the limit") as err:
        read_volume(tmp_path / "ct", max_voxels=40000)
    assert err.value.reason == "image_too_large"
    with pytest.raises(MedicalImageError, match="over the limit of 2") as err:
        read_volume(tmp_path / "ct", max_frames=2)
    assert err.value.reason == "image_too_large"
    with pytest.raises(MedicalImageError, match="slice1.dcm") as err:
        read_volume(tmp_path / "ct")
    assert err.value.reason != "image_too_large"
    assert read_volume(tmp_path / "ct", frames=[0, 2]).num_frames == 2  # the broken slice is never decoded
    bomb = tmp_path / "bomb.zip"  # 32 MiB of zeros that deflate to a few kB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("slice.dcm", bytes(32 * 2**20))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(MedicalImageError, match=r"bomb.zip:slice.dcm: 33554432 bytes is more than") as err:
        read_volume_bytes(bomb.read_bytes(), "bomb.zip", max_voxels=1000)
    assert err.value.reason == "image_too_large"


# ---- multi-frame DICOM ----


def test_enhanced_ct_frames_follow_their_functional_groups():
    path = _testfile("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    positions = [f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence]
    # the orientation's normal points to the feet (rows run to the patient's right): frame 2 comes first
    assert [r.frame_number for r in volume.references] == [2, 1]
    assert {r.sop_instance_uid for r in volume.references} == {ds.SOPInstanceUID}
    assert volume.kind == "volume" and volume.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert np.array_equal(volume.values, ds.pixel_array[[1, 0]].astype(np.float32) - 1024.0)
    assert np.allclose(volume.affine @ [0, 0, 0, 1], [*positions[1], 1])
    assert np.allclose(volume.affine @ [0, 0, 1, 1], [*positions[0], 1])
    assert volume.window == Window(49.0, 102.0)  # the frame's own VOI LUT


def test_multiframe_mr_rt_dose_and_limits():
    mr = read_volume(_testfile("emri_small.dcm"))
    ds = pydicom.dcmread(_testfile("emri_small.dcm"))
    assert mr.kind == "volume" and mr.values.shape == (10, 64, 64) and mr.spacing is None and mr.affine is None
    assert np.array_equal(mr.values, ds.pixel_array.astype(np.float32))
    assert [r.frame_number for r in mr.references] == list(range(1, 11))
    dose_path = _testfile("rtdose.dcm")
    dose = read_volume(dose_path)
    ds = pydicom.dcmread(dose_path)
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert dose.spacing == pytest.approx((offsets[1] - offsets[0], 10.0, 10.0))
    assert np.allclose(dose.affine @ [0, 0, 14, 1], [*np.add(ds.ImagePositionPatient, [0, 0, offsets[14]]), 1])
    with pytest.raises(MedicalImageError, match="emri_small.dcm: 10 frames of 64x64 = 40960 voxels") as err:
        read_volume(_testfile("emri_small.dcm"), max_voxels=40959)
    assert err.value.reason == "image_too_large"



def test_deflated_files_and_lying_codestreams_are_refused_before_decoding(tmp_path):
    deflated = _testfile("image_dfl.dcm")  # pydicom would inflate the whole dataset to read its header
    with pytest.raises(MedicalImageError, match="image_dfl.dcm: the deflated transfer syntax is not read") as err:
        read_volume(deflated)
    assert err.value.reason == "unsupported_image"
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(deflated, folder / "IM1")
    with pytest.raises(MedicalImageError, match="IM1: the deflated transfer syntax"):
        read_volume(folder)
    ds = pydicom.dcmread(_testfile("SC_rgb_jpeg_dcmtk.dcm"))  # a JPEG frame of 100 x 100
    ds.Rows, ds.Columns = 10, 10  # the header now claims fewer pixels than the codestream holds
    ds.save_as(tmp_path / "lying.dcm")
    with pytest.raises(MedicalImageError, match=r"lying.dcm: frame 1's compressed data declares 100 x 100 pixels"):
        read_volume(tmp_path / "lying.dcm")
    good = read_volume(_testfile("SC_rgb_jpeg_dcmtk.dcm"))
    assert good.values.shape == (1, 100, 100, 3)


def test_a_multiframe_file_alone_in_a_folder_or_zip_is_read_as_such(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(_testfile("emri_small.dcm"), folder / "IM0001")
    direct = read_volume(_testfile("emri_small.dcm"))
    in_folder = read_volume(folder)
    assert np.array_equal(in_folder.values, direct.values) and in_folder.references[3].frame_number == 4
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(folder / "IM0001", "IM0001")
    zipped = read_volume_bytes(archive.read_bytes(), "export.zip", frames=[9])
    assert np.array_equal(zipped.values[0], direct.values[9]) and zipped.references[0].frame_number == 10


def test_ultrasound_cine_loop_is_a_clip_and_decodes_only_the_frames_asked():
    path = _testfile("color3d_jpeg_baseline.dcm")
    header = probe_volume(path)
    assert (header.kind, header.num_frames, header.height, header.width, header.samples) == ("clip", 120, 480, 640, 3)
    assert header.fps == pytest.approx(1000 / 33.333)  # Frame Time, ms
    clip = read_volume(path, frames=[0, 60, 119])
    assert clip.kind == "clip" and clip.values.dtype == np.uint8 and clip.source_frames == [0, 60, 119]
    assert [r.frame_number for r in clip.references] == [1, 61, 120]
    for k, index in enumerate((0, 60, 119)):
        assert np.array_equal(clip.values[k], pixel_array(path, index=index))
    with pytest.raises(MedicalImageError, match="120 frames .* over the limit") as err:
        read_volume(path, max_voxels=100 * 480 * 640 * 3)
    assert err.value.reason == "image_too_large"
    palette = read_volume(_testfile("OBXXXX1A_2frame.dcm"))
    ds = pydicom.dcmread(_testfile("OBXXXX1A_2frame.dcm"))
    assert palette.kind == "clip" and palette.values.shape == (2, 600, 800, 3)
    assert np.array_equal(palette.values[1], (apply_color_lut(ds.pixel_array[1], ds) >> 8).astype(np.uint8))
    sent = read_volume_bytes(Path(path).read_bytes(), "cine upload", frames=[119])
    assert np.array_equal(sent.values[0], clip.values[2])


# ---- video ----


def _write_video(path: Path, codec: str = "libx264", frames: int = 30, fps: int = 10) -> None:
    """A white 16 px square moving 4 px to the right per frame on black."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for k in range(frames):
            image = np.zeros((64, 96, 3), np.uint8)
            image[20:36, 4 * k % 80: 4 * k % 80 + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _square_left(frame: np.ndarray) -> int:
    return int(np.nonzero(frame[28, :, 0] > 128)[0].min())


@pytest.mark.parametrize("name,codec", [("clip.mp4", "libx264"), ("clip.webm", "libvpx-vp9"), ("clip.avi", "mpeg4")])
def test_video_clips_decode_with_their_frame_rate(tmp_path, name, codec):
    path = tmp_path / name
    _write_video(path, codec)
    header = probe_volume(path)
    assert (header.kind, header.num_frames, header.height, header.width, header.fps) == ("clip", 30, 64, 96, 10.0)
    clip = read_volume(path)
    assert clip.values.shape == (30, 64, 96, 3) and clip.values.dtype == np.uint8 and clip.fps == 10.0
    assert [_square_left(clip.values[k]) for k in range(0, 20, 4)] == pytest.approx([0, 16, 32, 48, 64], abs=1)
    some = read_volume(path, frames=[29, 3, 3])
    assert np.array_equal(some.values, clip.values[[29, 3, 3]]) and some.source_frames == [29, 3, 3]
    sent = read_volume_bytes(path.read_bytes(), "upload", frames=[7])
    assert np.array_equal(sent.values[0], clip.values[7])


def test_video_limits_truncation_and_bad_files(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, frames=30)
    with pytest.raises(MedicalImageError, match=r"30 frames of 64x96x3 = 552960 voxels is over the limit") as err:
        read_volume(path, max_voxels=500_000)
    assert err.value.reason == "image_too_large"
    with pytest.raises(MedicalImageError, match="frame.*40.*do not exist"):
        read_volume(path, frames=[40])
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalImageError, match="cut.mp4"):
        read_volume(tmp_path / "cut.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(MedicalImageError, match="notes.mp4: not a readable video file") as err:
        read_volume(tmp_path / "notes.mp4")
    assert err.value.reason == "unreadable_image"
    (tmp_path / "scan.xyz").write_bytes(b"\0" * 200)
    with pytest.raises(MedicalImageError, match="not a volume or clip this reader knows") as err:
        read_volume(tmp_path / "scan.xyz")
    assert err.value.reason == "unsupported_image"
    with pytest.raises(MedicalImageError, match="names one slice or frame"):
        read_volume(os.path.join(NIBABEL_DATA, "anatomical.nii") + "#slice=3")


# ---- frame sampling (qwen_vl_utils' arithmetic) ----


def _reference_nframes(total: int, video_fps: float, fps: float, min_frames: int, max_frames: int, factor: int) -> int:
    """qwen_vl_utils.smart_nframes, written out: the formula the sampler must reproduce."""
    low = math.ceil(min_frames / factor) * factor
    high = math.floor(min(max_frames, total) / factor) * factor
    count = min(min(max(total / video_fps * fps, low), high), total)
    return math.floor(count / factor) * factor


def test_clip_frame_counts_and_indices_follow_qwen_vl_utils():
    for sampling in (VideoSampling(), VideoSampling(fps_max_frames=12), VideoSampling(fps=1.0, fps_min_frames=3)):
        for total in (2, 3, 4, 5, 9, 31, 120, 301, 2000):
            for video_fps in (1.0, 7.5, 25.0, 30.0, 59.94):
                expected = _reference_nframes(total, video_fps, sampling.fps, sampling.fps_min_frames,
                                              sampling.fps_max_frames, sampling.frame_factor)
                assert smart_nframes(total, video_fps, sampling) == expected
                indices = clip_frame_indices(total, video_fps, sampling)
                assert indices == np.linspace(0, total - 1, expected).round().astype(int).tolist()
    # 10 s at 30 fps: 2 fps gives 20 frames; upstream's deploy line (FPS_MAX_FRAMES=12) caps it at 12
    assert smart_nframes(300, 30.0) == 20 and smart_nframes(300, 30.0, VideoSampling(fps_max_frames=12)) == 12
    assert smart_nframes(8, 30.0) == 4  # under FPS_MIN_FRAMES seconds' worth: the minimum of 4
    assert clip_frame_indices(3, 30.0) == [0, 2]  # never more than the clip, an even count
    with pytest.raises(MedicalImageError, match="a clip of 1 frame"):
        smart_nframes(1, 30.0)


def test_volume_slices_pixel_bounds_and_the_environment():
    assert volume_frame_indices(5) == [0, 1, 2, 3, 4, 4]  # all slices, padded to an even count
    assert volume_frame_indices(1) == [0, 0]
    twelve = volume_frame_indices(100, VideoSampling(fps_max_frames=12))
    assert twelve == np.linspace(0, 99, 12).round().astype(int).tolist() and len(set(twelve)) == 12
    assert volume_frame_indices(100, VideoSampling(fps_max_frames=13)) == twelve  # 13 rounds down to 12
    # per-frame pixels: min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / n * FRAME_FACTOR), never under 1.05 x min
    defaults = VideoSampling()
    assert frame_pixel_bounds(12, defaults) == (128 * 784, 768 * 784)
    small = VideoSampling(video_total_pixels=200 * 784)
    assert frame_pixel_bounds(4, small) == (128 * 784, int(128 * 784 * 1.05))  # 100 x 784 is under the floor
    assert frame_pixel_bounds(2, small)[1] == pytest.approx(200 * 784)
    environ = {"FPS_MAX_FRAMES": "12", "VIDEO_MAX_PIXELS": "50176", "FPS": "1.5", "UNRELATED": "x"}
    sampling = VideoSampling.from_env(environ)
    assert (sampling.fps_max_frames, sampling.video_max_pixels, sampling.fps) == (12, 50176, 1.5)
    assert VideoSampling.from_env(environ, fps_max_frames=6, fps=None).fps_max_frames == 6
    with pytest.raises(MedicalImageError, match="FPS_MIN_FRAMES='many'"):
        VideoSampling.from_env({"FPS_MIN_FRAMES": "many"})


def test_frame_size_matches_transformers_smart_resize_and_sampling_ties_it_together():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for height, width in ((64, 96), (480, 640), (512, 512), (1080, 1920), (30, 2000)):
        for min_pixels, max_pixels in ((128 * 784, 768 * 784), (4 * 784, 16 * 784), (3136, 12845056)):
            ours = smart_resize(height, width, 28, min_pixels, max_pixels)
            assert ours == reference(height, width, 28, min_pixels, max_pixels), (height, width, min_pixels)
    cine = sample_frames(120, 480, 640, fps=30.0, sampling=VideoSampling(fps_max_frames=12, video_max_pixels=50176))
    assert cine.indices == np.linspace(0, 119, 8).round().astype(int).tolist()  # 4 s at 2 fps: 8 frames
    assert cine.sample_fps == pytest.approx(8 / 120 * 30.0)
    assert (cine.height, cine.width) == smart_resize(480, 640, 28, 128 * 784, int(128 * 784 * 1.05))
    ct = sample_frames(5, 16, 16)
    assert ct.indices == [0, 1, 2, 3, 4, 4] and ct.sample_fps is None
    assert (ct.height, ct.width) == reference(16, 16, 28, 128 * 784, 768 * 784) == (336, 336)  # up to the minimum
    single = sample_frames(1, 480, 640, fps=30.0)  # a one-frame cine is shown as a frame list
    assert single.indices == [0, 0]


def test_sampled_video_decodes_only_the_chosen_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, frames=30)
    header = probe_volume(path)
    plan = sample_frames(header.num_frames, header.height, header.width, header.fps)
    assert plan.indices == np.linspace(0, 29, 6).round().astype(int).tolist()  # 3 s at 2 fps
    clip = read_volume(path, frames=plan.indices)
    assert clip.num_frames == 6 and clip.source_frames == plan.indices
    assert [_square_left(f) for f in clip.values] == pytest.approx([4 * k % 80 for k in plan.indices], abs=1)

