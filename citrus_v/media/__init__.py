"""Medical media: the one place where images and masks are read, for training, inference, server and app.

One format per module: :mod:`~citrus_v.media.dicom` (pydicom: modality LUT, the file's window, MONOCHROME1,
multi-frame, compressed syntaxes), :mod:`~citrus_v.media.nifti` (nibabel: RAS+ slices in a fixed display
orientation, masks back onto the voxel grid), :mod:`~citrus_v.media.raster` (Pillow), with
:mod:`~citrus_v.media.windowing` (presets such as ``ct-lung``, ``"C,W"``), :mod:`~citrus_v.media.refs` (how a
row names an image: ``scan.nii.gz#slice=40&axis=2``), :mod:`~citrus_v.media.images` (any reference to an RGB
picture), :mod:`~citrus_v.media.mask_codecs` (COCO RLE, polygons, mask references) and
:mod:`~citrus_v.media.boxes` (the box type). Stacks of frames: :mod:`~citrus_v.media.volumes` reads any volume
or clip reference (NIfTI, a DICOM series folder or zip, a multi-frame DICOM, a video through PyAV) as a
:class:`~citrus_v.media.volume.Volume`, and :mod:`~citrus_v.media.frame_sampling` picks the frames the language
model sees.

Light on purpose: numpy and Pillow only; pydicom, nibabel and pycocotools load on first use, and neither torch
nor transformers is imported, so that the web app can read scans without the model's stack.
"""

from .boxes import Box
from .dicom import DicomImage, read_dicom
from .errors import DEFAULT_MAX_IMAGE_PIXELS, MedicalImageError
from .frame_sampling import FrameSample, VideoSampling, sample_frames
from .images import image_size, read_image
from .mask_codecs import mask_to_rle, polygons_to_mask, read_label_map, read_mask, rle_to_mask
from .nifti import NiftiVolume, from_display, read_nifti, to_display
from .raster import read_raster
from .refs import DICOM_SUFFIXES, NIFTI_SUFFIXES, MediaRef, parse_ref
from .volume import DEFAULT_MAX_VOLUME_VOXELS, FrameReference, Volume, VolumeHeader
from .volumes import probe_volume, probe_volume_bytes, read_volume, read_volume_bytes
from .windowing import WINDOW_PRESETS, Window, apply_window, full_range_window, parse_window

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_VOLUME_VOXELS",
    "DICOM_SUFFIXES",
    "NIFTI_SUFFIXES",
    "WINDOW_PRESETS",
    "Box",
    "DicomImage",
    "FrameReference",
    "FrameSample",
    "MediaRef",
    "MedicalImageError",
    "NiftiVolume",
    "VideoSampling",
    "Volume",
    "VolumeHeader",
    "Window",
    "apply_window",
    "from_display",
    "full_range_window",
    "image_size",
    "mask_to_rle",
    "parse_ref",
    "parse_window",
    "polygons_to_mask",
    "probe_volume",
    "probe_volume_bytes",
    "read_dicom",
    "read_image",
    "read_label_map",
    "read_mask",
    "read_nifti",
    "read_raster",
    "read_volume",
    "read_volume_bytes",
    "rle_to_mask",
    "sample_frames",
    "to_display",
]
