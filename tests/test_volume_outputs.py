"""3-D masks out: NIfTI on the source grid, DICOM-SEG over a series or a multi-frame file, measures, pictures.

Volumes are built here from real files — nibabel's test NIfTI volumes, a CT series made of copies of pydicom's
``CT_small.dcm`` with edited positions and UIDs, pydicom-data's enhanced CT and two-frame ultrasound — the way
the media layer's readers build them (frames in display orientation, the ``(column, row, frame)`` affine).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from nibabel.orientations import inv_ornt_aff  # noqa: E402
from nibabel.testing import data_path  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from citrus_v.infer.overlay import colour  # noqa: E402
from citrus_v.infer.volume_masks import mask_stacks, write_volume_nifti, write_volume_seg  # noqa: E402
from citrus_v.infer.volume_measures import measure_masks  # noqa: E402
from citrus_v.infer.volume_pictures import (  # noqa: E402
    clip_strip,
    plane_panels,
    strip_frames,
    strip_panels,
    three_planes,
    volume_picture,
)
from citrus_v.media import read_nifti, to_display  # noqa: E402
from citrus_v.media.volume import FrameReference, Volume  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom warns about the test files' values

ANATOMICAL = Path(data_path) / "anatomical.nii"  # 33 x 41 x 25, LAS, 2 mm, qform and sform code 2
STANDARD = Path(data_path) / "standard.nii.gz"  # 4 x 5 x 7, RAS, zooms 1 x 3 x 2, qform code 0, sform code 2
SLICE_MM = 5.0  # CT_small.dcm's slice thickness: the built series' slices are this far apart


# ---------------------------------------------------------------------------------------------- the volumes


def display_affine(volume, axis: int) -> np.ndarray:
    """The ``(column, row, frame)`` -> RAS affine of the display slices along ``axis``, found by pushing the
    voxel-index grids through the display transform (so it follows ``to_display`` whatever it does)."""
    canonical = volume.affine @ inv_ornt_aff(volume.ornt, volume.shape)
    grids = np.indices(volume.data.shape)
    shown = [to_display(np.take(g, 0, axis=axis), axis) for g in grids]  # [3] x [H, W] canonical indices
    origin = np.array([s[0, 0] for s in shown], dtype=float)
    along_column = np.array([s[0, 1] for s in shown], dtype=float) - origin
    along_row = np.array([s[1, 0] for s in shown], dtype=float) - origin
    along_frame = np.eye(3)[axis]
    index = np.eye(4)
    index[:3, 0], index[:3, 1], index[:3, 2], index[:3, 3] = along_column, along_row, along_frame, origin
    return canonical @ index


def nifti_volume(path: Path, axis: int = 2) -> Volume:
    source = read_nifti(path)
    affine = display_affine(source, axis)
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    return Volume(
        values=np.stack(source.slices(axis)).astype(np.float32),
        kind="volume",
        source=str(path),
        spacing=(float(lengths[2]), float(lengths[1]), float(lengths[0])),
        affine=affine,
        nifti=source,
        axis=axis,
    )


def ct_series(folder: Path, count: int = 5) -> tuple[Volume, list[Path]]:
    """``count`` copies of ``CT_small.dcm`` stacked 5 mm apart along the normal, one series, written in
    shuffled order; the volume lists them along the normal, as the series reader does."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    cosines = np.array([float(v) for v in template.ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    series = pydicom.uid.generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    names = np.random.default_rng(0).permutation(count)  # the file names do not follow the order
    paths, datasets, frames = [], [], []
    for k in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * SLICE_MM * normal]
        path = folder / f"slice_{names[k]}.dcm"
        ds.save_as(path)
        paths.append(path)
        frames.append(ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
        header = pydicom.dcmread(path, stop_before_pixels=True)
        datasets.append(header)
    spacing = [float(v) for v in template.PixelSpacing]
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = cosines[:3] * spacing[1], cosines[3:] * spacing[0]
    affine[:3, 2], affine[:3, 3] = normal * SLICE_MM, origin
    volume = Volume(
        values=np.stack(frames),
        kind="volume",
        source=str(folder),
        spacing=(SLICE_MM, spacing[0], spacing[1]),
        affine=affine,
        references=[FrameReference(str(d.SOPClassUID), str(d.SOPInstanceUID), None, str(p))
                    for d, p in zip(datasets, paths, strict=True)],
        datasets=datasets,
    )
    return volume, paths


def multiframe_volume(name: str, kind: str = "volume") -> Volume:
    """Every frame of a multi-frame DICOM file, referenced by frame number."""
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float32)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    references = [FrameReference(str(ds.SOPClassUID), str(ds.SOPInstanceUID), k + 1, path) for k in range(len(values))]
    return Volume(values=values, kind=kind, source=path, references=references, datasets=[header])


def box_stack(shape: tuple[int, ...], frames: slice, rows: slice, columns: slice) -> np.ndarray:
    stack = np.zeros(shape[:3], dtype=bool)
    stack[frames, rows, columns] = True
    return stack


# ------------------------------------------------------------------------------------------------ NIfTI


@pytest.mark.parametrize(("path", "axis"), [(ANATOMICAL, 2), (ANATOMICAL, 0), (STANDARD, 1)])
def test_nifti_mask_is_on_the_source_grid(tmp_path, path, axis):
    """Shape, affine, qform/sform codes and units are the source's, and a mask of the bright display voxels
    of every frame is exactly the bright voxels of the source file, in its own voxel order."""
    volume = nifti_volume(path, axis)
    threshold = np.percentile(volume.values, 70)
    (written,) = write_volume_nifti(volume, [volume.values > threshold], tmp_path)
    source, mask = nib.load(path), nib.load(written)
    assert mask.shape == source.shape[:3]
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    assert int(mask.header["qform_code"]) == int(source.header["qform_code"])
    assert int(mask.header["sform_code"]) == int(source.header["sform_code"])
    assert mask.header.get_xyzt_units() == source.header.get_xyzt_units()
    raw = np.asarray(source.dataobj)
    raw = raw[..., 0] if raw.ndim == 4 else raw
    np.testing.assert_array_equal(np.asarray(mask.dataobj) == 1, raw > threshold)


@pytest.mark.parametrize(
    ("path", "voxel"), [(STANDARD, lambda x, y, k: (x - 1, y - 1, k)), (ANATOMICAL, lambda x, y, k: (0, y - 1, k))]
)
def test_nifti_mask_on_frame_k_lands_on_its_voxel(tmp_path, path, voxel):
    """An axial display frame shows anterior at the top and the patient's right on the left: its top-left
    pixel is the right-most, most anterior voxel of that slice (x index X-1 in an RAS file, 0 in an LAS one)."""
    volume = nifti_volume(path, 2)
    k = volume.num_frames - 2
    stack = np.zeros(volume.values.shape, dtype=np.uint8)
    stack[k, 0, 0] = 1
    (written,) = write_volume_nifti(volume, stack, tmp_path)
    data = np.asarray(nib.load(written).dataobj)
    x, y, _ = data.shape
    assert list(zip(*np.nonzero(data), strict=True)) == [voxel(x, y, k)]


def test_nifti_of_a_dicom_series_places_voxels_at_their_patient_positions(tmp_path):
    """Voxel ``(column, row, frame)`` of the NIfTI lies where the slice's own header puts that pixel, in RAS."""
    volume, _ = ct_series(tmp_path / "series")
    stack = box_stack(volume.values.shape, slice(1, 4), slice(10, 20), slice(30, 45))
    (written,) = write_volume_nifti(volume, [stack], tmp_path / "out")
    image = nib.load(written)
    assert image.shape == (128, 128, 5)  # (columns, rows, frames)
    assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
    data = np.asarray(image.dataobj)
    assert int(data.sum()) == int(stack.sum())
    for column, row, frame in [(30, 10, 1), (44, 19, 3)]:
        assert data[column, row, frame] == 1
        header = volume.datasets[frame]
        cosines = [float(v) for v in header.ImageOrientationPatient]
        spacing = [float(v) for v in header.PixelSpacing]
        lps = (np.array([float(v) for v in header.ImagePositionPatient]) + column * spacing[1] * np.array(cosines[:3])
               + row * spacing[0] * np.array(cosines[3:]))
        ras = image.affine @ [column, row, frame, 1]
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-3)


def test_nifti_of_a_clip_without_geometry_says_unknown(tmp_path):
    clip = multiframe_volume("OBXXXX1A_2frame.dcm", kind="clip")
    stack = box_stack(clip.values.shape, slice(1, 2), slice(5, 9), slice(5, 9))
    (written,) = write_volume_nifti(clip, stack, tmp_path)
    image = nib.load(written)
    assert image.shape == (clip.values.shape[2], clip.values.shape[1], 2)
    assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 0
    assert int(np.asarray(image.dataobj)[5:9, 5:9, 1].sum()) == 16


def test_sampled_frames_go_back_to_their_source_slices(tmp_path):
    """A volume holding every other slice writes its masks on those slices of the full grid."""
    full = nifti_volume(STANDARD, 2)
    volume = nifti_volume(STANDARD, 2)
    volume.values, volume.source_frames = full.values[::2], [0, 2, 4, 6]
    stack = np.zeros(volume.values.shape, dtype=bool)
    stack[2, 0, 0] = True  # sampled frame 2 is source slice 4
    (written,) = write_volume_nifti(volume, [stack], tmp_path)
    data = np.asarray(nib.load(written).dataobj)
    assert list(zip(*np.nonzero(data), strict=True)) == [(3, 4, 4)]


# --------------------------------------------------------------------------------------------- DICOM-SEG


def test_seg_of_a_series_has_one_frame_per_slice_with_mask(tmp_path):
    volume, _ = ct_series(tmp_path / "series")
    liver = box_stack(volume.values.shape, slice(1, 4), slice(20, 60), slice(30, 70))
    lesion = box_stack(volume.values.shape, slice(2, 3), slice(40, 45), slice(50, 52))
    (path,) = write_volume_seg(volume, [liver, lesion], ["the liver", "liver lesion"], tmp_path / "masks.seg.dcm")
    seg = hd.seg.segread(path)
    uids = [str(d.SOPInstanceUID) for d in volume.datasets]
    assert seg.number_of_frames == 3 + 1  # liver on 3 slices, the lesion on 1; empty frames left out
    instances = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    referenced = [str(item.ReferencedSOPInstanceUID) for item in instances]
    assert sorted(referenced) == sorted(uids)  # the segmentation names the whole series
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = uids.index(str(source.ReferencedSOPInstanceUID))
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in volume.datasets[frame].ImagePositionPatient], atol=1e-3)
    for number, stack in ((1, liver), (2, lesion)):
        for frame, uid in enumerate(uids):
            if not stack[frame].any():
                continue
            pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[number])
            np.testing.assert_array_equal(pixels[0, :, :, 0] > 0, stack[frame])
    assert seg.get_segment_description(1).segmented_property_type.meaning == "Liver"
    assert seg.get_segment_description(2).segmented_property_type.meaning == "Lesion"


def test_seg_of_an_enhanced_ct_references_frame_numbers(tmp_path):
    volume = multiframe_volume("eCT_Supplemental.dcm")
    stack = box_stack(volume.values.shape, slice(1, 2), slice(100, 200), slice(150, 300))
    (path,) = write_volume_seg(volume, [stack], ["lesion"], tmp_path / "masks.seg.dcm")
    seg = pydicom.dcmread(path)
    assert int(seg.NumberOfFrames) == 1
    source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert str(source.ReferencedSOPInstanceUID) == str(volume.datasets[0].SOPInstanceUID)
    assert int(source.ReferencedFrameNumber) == 2
    read = hd.seg.segread(path)
    pixels = read.get_pixels_by_source_frame(str(volume.datasets[0].SOPInstanceUID), [2], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0] > 0, stack[1])


def test_seg_of_a_cine_loop_without_frame_of_reference_is_one_file_per_frame(tmp_path):
    clip = multiframe_volume("OBXXXX1A_2frame.dcm", kind="clip")
    stack = box_stack(clip.values.shape, slice(1, 2), slice(100, 150), slice(200, 260))
    paths = write_volume_seg(clip, [stack], ["mass"], tmp_path / "masks.seg.dcm")
    assert [p.name for p in paths] == ["masks_frame1.seg.dcm"]
    seg = pydicom.dcmread(paths[0])
    source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert int(source.ReferencedFrameNumber) == 2
    assert str(source.ReferencedSOPInstanceUID) == str(clip.datasets[0].SOPInstanceUID)
    np.testing.assert_array_equal(seg.pixel_array > 0, stack[1])


def test_seg_needs_a_dicom_source(tmp_path):
    volume = nifti_volume(STANDARD)
    with pytest.raises(ValueError, match="not a DICOM source"):
        write_volume_seg(volume, [volume.values > 0], None, tmp_path / "masks.seg.dcm")


def test_a_mask_of_another_shape_is_refused_with_both_shapes():
    volume = nifti_volume(STANDARD)
    with pytest.raises(ValueError, match=r"mask 1 is \(7, 4, 4\) but the volume is \(7, 5, 4\)"):
        mask_stacks([np.zeros((7, 4, 4), bool)], volume.values.shape)


# ----------------------------------------------------------------------------------------------- measures


def test_measures_of_a_box_in_a_series(tmp_path):
    volume, _ = ct_series(tmp_path)
    stack = box_stack(volume.values.shape, slice(1, 4), slice(10, 20), slice(30, 45))
    (measures,) = measure_masks(volume, [stack], ["liver"])
    row_mm, column_mm = volume.spacing[1], volume.spacing[2]
    assert measures.voxels == 3 * 10 * 15
    assert measures.volume_ml == pytest.approx(450 * SLICE_MM * row_mm * column_mm / 1000, rel=1e-5)
    assert measures.frames == [1, 2, 3]
    assert [a.area_px for a in measures.areas] == [150] * 3
    assert measures.areas[0].area_mm2 == pytest.approx(150 * row_mm * column_mm, rel=1e-5)
    box = measures.bbox3d
    assert (box.frames, box.rows, box.columns) == ((1, 4), (10, 20), (30, 45))
    assert box.size_mm == pytest.approx((3 * SLICE_MM, 10 * row_mm, 15 * column_mm), rel=1e-5)
    payload = json.loads(json.dumps(measures.to_json()))
    assert payload["volume_ml"] == measures.volume_ml and payload["spacing"] == list(volume.spacing)
    assert payload["bbox3d"]["frames"] == [1, 4] and payload["areas"][0]["frame"] == 1


def test_measures_of_a_label_stack_and_of_clips():
    clip = multiframe_volume("OBXXXX1A_2frame.dcm", kind="clip")
    labels = np.zeros(clip.values.shape, dtype=np.uint8)
    labels[0, 0:2, 0:3] = 1
    labels[1, 5:6, 5:9] = 3  # label 2 absent: an empty target
    first, absent, third = measure_masks(clip, labels)
    assert (first.voxels, first.frames, third.voxels, third.frames) == (6, [0], 4, [1])
    assert absent.voxels == 0 and absent.bbox3d is None and absent.frames == []
    assert first.volume_ml is None and first.areas[0].area_mm2 is None  # no spacing
    clip.spacing = (1.0, 0.5, 0.5)
    (calibrated,) = measure_masks(clip, [labels == 1])
    assert calibrated.volume_ml is None  # a clip's frames are moments, not slices
    assert calibrated.areas[0].area_mm2 == pytest.approx(1.5)
    assert calibrated.bbox3d.size_mm == (None, 1.0, 1.5)


def test_a_sample_of_every_other_slice_has_no_volume_but_source_frames():
    volume = nifti_volume(STANDARD, 2)
    volume.values, volume.source_frames = volume.values[::2], [0, 2, 4, 6]
    stack = box_stack(volume.values.shape, slice(1, 3), slice(0, 2), slice(0, 2))
    (measures,) = measure_masks(volume, [stack])
    assert measures.frames == [2, 4] and measures.bbox3d.frames == (2, 5)
    assert measures.volume_ml is None


# ----------------------------------------------------------------------------------------------- pictures


def palette_pixels(image, k: int) -> np.ndarray:
    """Where the picture shows mask ``k``'s own colour exactly (its outline)."""
    return np.all(np.asarray(image.convert("RGB")) == colour(k), axis=-1)


def test_three_planes_of_a_series_are_named_scaled_and_oriented(tmp_path):
    volume, _ = ct_series(tmp_path)
    top = box_stack(volume.values.shape, slice(4, 5), slice(40, 60), slice(40, 80))  # the most superior slice
    panels = plane_panels(volume, [top], (4, 50, 60))
    assert [p.caption for p in panels] == ["axial (frame 4)", "coronal (row 50)", "sagittal (column 60)"]
    axial, coronal, sagittal = panels
    # scaled by the spacing: 5 slices of 5 mm against 128 pixels of 0.66 mm
    ratio = coronal.image.height / coronal.image.width
    assert ratio == pytest.approx(5 * SLICE_MM / (128 * volume.spacing[2]), rel=0.05)
    assert sagittal.image.height == coronal.image.height and axial.image.width == coronal.image.width
    # the superior slice is drawn at the top of the coronal and sagittal planes
    for panel in (coronal, sagittal):
        rows = np.flatnonzero(panel.masks[0].any(axis=1))
        assert rows.max() < panel.image.height / 5 + 1
    for panel in panels:  # the mask's colour where the mask is, and nowhere else
        shown = palette_pixels(panel.image, 0)
        assert shown.any() and not (shown & ~panel.masks[0]).any()


def test_three_planes_of_a_sagittal_nifti_stack(tmp_path):
    volume = nifti_volume(ANATOMICAL, 0)
    stack = np.zeros(volume.values.shape, bool)
    stack[10:14, 20:26, 15:22] = True
    second = np.zeros_like(stack)
    second[20:22, 5:8, 5:8] = True
    panels = plane_panels(volume, [stack, second], (12, 22, 18))
    assert [p.caption.split(" (")[0] for p in panels] == ["sagittal", "axial", "coronal"]
    picture = three_planes(volume, [stack, second], ["liver", "lesion"])
    picture.save(tmp_path / "planes.png")
    assert palette_pixels(picture, 0).any() and palette_pixels(picture, 1).any()
    for panel in panels:
        assert not (palette_pixels(panel.image, 0) & ~panel.masks[0]).any()


def test_clip_strip_shows_the_frames_with_mask_numbered(tmp_path):
    clip = multiframe_volume("OBXXXX1A_2frame.dcm", kind="clip")
    clip.fps = 10.0
    stack = box_stack(clip.values.shape, slice(1, 2), slice(200, 300), slice(300, 420))
    panels = strip_panels(clip, [stack], [1])
    assert panels[0].caption == "frame 1 · 0.10 s"
    shown = palette_pixels(panels[0].image, 0)
    assert shown.any() and not (shown & ~panels[0].masks[0]).any()
    picture = volume_picture(clip, [stack], ["mass"])
    assert picture.width < 2 * 192 + 100  # one frame holds the mask: one tile
    nothing = [np.zeros_like(stack)]
    assert strip_frames(nothing, clip.num_frames) == [0, 1]  # no frame with mask: the frames spread evenly
    assert not any(palette_pixels(p.image, 0).any() for p in strip_panels(clip, nothing, [0, 1]))
    assert clip_strip(clip, nothing).width >= 2 * 192


def test_strip_frames_thins_evenly_keeping_first_and_last():
    stack = np.zeros((100, 2, 2), bool)
    stack[10:50] = True
    frames = strip_frames([stack], 100, max_frames=16)
    assert len(frames) == 16 and frames[0] == 10 and frames[-1] == 49 and frames == sorted(set(frames))
    assert strip_frames([np.zeros((5, 2, 2), bool)], 5) == [0, 1, 2, 3, 4]
