"""Hostile containers: every DICOM, NIfTI and raster image is bounded from its header before it is decoded.

Each bomb is built in memory in a few milliseconds (compressed zeros, or a header that claims more than the file
holds), refused with the reason that names the limit, and followed by a valid file of the same kind that reads.
The server cases go through ``citrus-v deploy`` in a subprocess, whose peak resident memory is read from
``/proc`` before and after.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit

from citrus_v.media import MedicalImageError, image_size, parse_ref, read_dicom, read_image, read_nifti
from citrus_v.media import nifti as nifti_module
from citrus_v.media.dicom import dicom_size
from citrus_v.media.errors import DEFAULT_MAX_DECODED_BYTES
from citrus_v.media.nifti import read_nifti_bytes
from citrus_v.media.raster import read_raster

from .test_serve_support import data_url, deployed_server, free_port, image_message

GIB = 1 << 30
MIB = 1 << 20
REFUSAL_MEMORY = 100 * MIB  # what refusing a bomb may allocate at most
SIZE_CODES = {"image_too_large", "request_memory_exceeded"}
_ZERO_BLOCK = 1 << 24


# --- building bombs -----------------------------------------------------------------------------------------------
def _zeros_deflated(head: bytes, zeros: int) -> bytes:
    """A raw deflate stream of ``head`` then ``zeros`` zero bytes, built from one compressed 16 MiB block repeated
    (a full flush makes every block independent of what came before)."""
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = first.compress(head) + first.flush(zlib.Z_FULL_FLUSH)
    fresh = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = fresh.compress(bytes(_ZERO_BLOCK)) + fresh.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(zeros, _ZERO_BLOCK)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    return stream + block * count + last.compress(bytes(rest)) + last.flush()


def _zeros_gzip(head: bytes, zeros: int) -> bytes:
    """A valid gzip file (header, deflate stream, CRC-32 and length) of ``head`` then ``zeros`` zero bytes."""
    crc = zlib.crc32(head)
    chunk = bytes(_ZERO_BLOCK)
    for start in range(0, zeros, _ZERO_BLOCK):
        crc = zlib.crc32(chunk[: min(_ZERO_BLOCK, zeros - start)], crc)
    trailer = struct.pack("<II", crc, (len(head) + zeros) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + _zeros_deflated(head, zeros) + trailer


def _ct_header(rows: int, columns: int, frames: int = 1) -> pydicom.Dataset:
    """pydicom's CT_small.dcm without its pixels, claiming ``rows`` x ``columns`` x ``frames`` 16-bit pixels."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _dicom_file(ds: pydicom.Dataset, syntax: str, body: bytes) -> bytes:
    """Preamble, file meta naming ``syntax``, then ``body`` (the encoded data set, deflated or not)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    return out.getvalue() + body


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def deflated_dicom_bomb(rows: int, columns: int, pixel_bytes: int) -> bytes:
    """A deflated DICOM whose header claims ``rows`` x ``columns`` 16-bit pixels and whose pixel data element
    inflates to ``pixel_bytes`` zeros."""
    ds = _ct_header(rows, columns)
    pixel_element = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)
    return _dicom_file(ds, DeflatedExplicitVRLittleEndian, _zeros_deflated(_encoded(ds) + pixel_element, pixel_bytes))


def nifti_header_bytes(shape: tuple[int, ...], dtype, slope: float | None = None) -> bytes:
    """The 352 bytes before the voxels of a single-file NIfTI-1 of ``shape`` and ``dtype`` (identity affine)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    if slope is not None:
        header.set_slope_inter(slope, 0.0)
    return header.binaryblock + b"\0" * 4


def _peak_of(action) -> tuple[Exception | None, int, float]:
    """What ``action()`` raised, the most memory it held (tracemalloc) and how long it took."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        action()
        raised = None
    except Exception as err:  # the refusal under test
        raised = err
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak, time.perf_counter() - start


def _refused(action, reason: str, words: str) -> MedicalImageError:
    raised, peak, seconds = _peak_of(action)
    assert isinstance(raised, MedicalImageError), raised
    assert raised.reason == reason and words in str(raised), str(raised)
    assert peak < REFUSAL_MEMORY and seconds < 10, (peak, seconds)
    return raised


# --- DICOM --------------------------------------------------------------------------------------------------------
def test_deflated_dicom_inflating_to_gigabytes_is_refused_then_a_deflated_file_reads(tmp_path):
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(deflated_dicom_bomb(128, 128, 2 * GIB))  # 2 GiB of pixels behind a 128 x 128 header
    assert bomb.stat().st_size < 4 * MIB
    err = _refused(lambda: read_dicom(bomb), "image_too_large", "inflates past")
    assert "1 frame(s) of 128 x 128 pixels" in str(err) and "re-save" in str(err)
    assert dicom_size(bomb) == (128, 128)  # the header alone is fine, and only it is inflated
    claims = tmp_path / "claims.dcm"
    claims.write_bytes(deflated_dicom_bomb(30000, 30000, 2 * GIB))  # the header itself is over both limits
    _refused(lambda: read_dicom(claims), "image_too_large", "900000000 pixels is over the limit")
    _refused(lambda: dicom_size(claims), "image_too_large", "900000000 pixels is over the limit")
    _refused(lambda: read_dicom(claims, max_pixels=None), "image_too_large", "--max_decoded_bytes")

    path = get_testdata_file("image_dfl.dcm")  # a real deflated file
    ds = pydicom.dcmread(path)
    image = read_dicom(path)
    expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    assert image.values.shape == (512, 512) and np.array_equal(image.values, expected)
    assert dicom_size(Path(path)) == (512, 512) and read_image(path).size == (512, 512)


def test_every_frame_counts_against_the_byte_budget_and_one_frame_is_decoded(tmp_path):
    header_only = tmp_path / "frames.dcm"
    header_only.write_bytes(_dicom_file(_ct_header(4096, 4096, 1000), ExplicitVRLittleEndian, _encoded(
        _ct_header(4096, 4096, 1000))))  # claims 32 GiB, holds no pixels
    err = _refused(lambda: read_dicom(header_only), "image_too_large", "1000 frame(s) of 4096 x 4096 pixels")
    assert f"limit of {DEFAULT_MAX_DECODED_BYTES} bytes" in str(err)
    _refused(lambda: image_size(str(header_only)), "image_too_large", "1000 frame(s)")

    path = get_testdata_file("emri_small.dcm")  # 10 frames of 64 x 64, 16 bits: 80 KiB decoded
    _refused(lambda: read_dicom(path, 3, max_bytes=80 * 1024 - 1), "image_too_large", "10 frame(s) of 64 x 64")
    frames = pydicom.dcmread(path).pixel_array
    assert np.array_equal(read_dicom(path, 3, max_bytes=80 * 1024).values, frames[3].astype(np.float64))


def _jpeg_dicom(side: int, claimed: tuple[int, int] | None = None, padding: int = 0) -> bytes:
    """A baseline JPEG DICOM of a ``side`` x ``side`` grey square; ``claimed`` rewrites the JPEG's own size,
    ``padding`` adds a private element of that many bytes."""
    picture = np.zeros((side, side), np.uint8)
    picture[side // 4 : side // 2, side // 4 : side // 2] = 200
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=95)
    jpeg = bytearray(buffer.getvalue())
    if claimed is not None:
        sof = jpeg.index(b"\xff\xc0")
        jpeg[sof + 5 : sof + 9] = struct.pack(">HH", claimed[1], claimed[0])
    ds = _ct_header(side, side)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    if padding:
        ds.add_new(0x00090010, "LO", "PADDING")
        ds.add_new(0x00091000, "OB", bytes(padding))
    ds.PixelData = encapsulate([bytes(jpeg)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _dicom_file(ds, JPEGBaseline8Bit, _encoded(ds))


def test_a_compressed_frame_claiming_more_pixels_than_its_header_is_refused_undecoded(tmp_path):
    lying = tmp_path / "lying.dcm"
    lying.write_bytes(_jpeg_dicom(64, claimed=(60000, 60000)))  # the decoder would allocate 3.6 GB
    _refused(lambda: read_dicom(lying), "unreadable_image", "declares 60000 x 60000 pixels")
    padded = tmp_path / "padded.dcm"
    padded.write_bytes(_jpeg_dicom(64, padding=9 * MIB))  # far more bytes than 64 x 64 pixels decode to
    _refused(lambda: read_dicom(padded), "image_too_large", "more than 2 times what its compressed pixels")
    honest = tmp_path / "honest.dcm"
    honest.write_bytes(_jpeg_dicom(64))
    values = read_dicom(honest).values
    assert values.shape == (64, 64) and abs(values[20, 20] - 200) < 8 and abs(values[5, 5]) < 8


# --- NIfTI --------------------------------------------------------------------------------------------------------
def test_a_gzip_nifti_inflating_to_a_gigabyte_is_refused_from_its_header(tmp_path):
    bomb = _zeros_gzip(nifti_header_bytes((1024, 1024, 1024), np.uint8), GIB)  # 1 GiB of voxels in 1 MiB
    assert len(bomb) < 2 * MIB
    _refused(lambda: read_nifti_bytes(bomb, "the data: URL"), "image_too_large", "1024 x 1024 x 1024 voxels")
    local = tmp_path / "bomb.nii.gz"
    local.write_bytes(bomb)
    for read in (lambda: read_nifti(local), lambda: read_image(str(local)), lambda: image_size(str(local))):
        _refused(read, "image_too_large", "--max_decoded_bytes")
    good = Path(NIBABEL_DATA, "example4d.nii.gz")
    assert read_nifti_bytes(good.read_bytes(), "the data: URL").data.shape == (128, 96, 24)
    assert image_size(str(good)) == read_image(str(good)).size


@pytest.mark.parametrize(
    ("shape", "dtype", "slope", "reason", "words"),
    [
        ((1024, 1024, 512), np.float64, None, "image_too_large", "held as 8-byte values"),  # 4 GiB
        ((256, 256, 256, 40), np.uint8, None, "image_too_large", "256 x 256 x 256 x 40 voxels"),  # every volume
        ((512, 512, 300), np.uint8, 2.0, "image_too_large", "held as 8-byte values"),  # scaled: read as float64
        ((64, 64, 8, 1, 2), np.int16, None, "unsupported_image", "5-D volume"),
        ((64, 64, 8), np.complex64, None, "unsupported_image", "complex64"),
        ((64, 64, 8), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), None, "unsupported_image", "RGB"),
    ],
    ids=["float64-4GiB", "4d-all-volumes", "scaled-uint8", "5d", "complex", "rgb"],
)
def test_nifti_of_any_type_and_dimension_is_checked_from_the_header(tmp_path, shape, dtype, slope, reason, words):
    head = nifti_header_bytes(shape, dtype, slope)  # the header alone: the file claims what it does not hold
    _refused(lambda: read_nifti_bytes(head, "the data: URL"), reason, words)
    _refused(lambda: read_nifti_bytes(_zeros_gzip(head, 1024), "the data: URL"), reason, words)
    local = tmp_path / "claims.nii"
    local.write_bytes(head)
    _refused(lambda: read_nifti(local), reason, words)
    _refused(lambda: image_size(str(local)), reason, words)


def test_gzip_data_longer_than_its_header_declares_is_refused():
    volume = np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4)
    data = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    padded = _zeros_gzip(data, 64 * MIB)  # the same file, then 64 MiB the header does not declare
    _refused(lambda: read_nifti_bytes(padded, "the data: URL"), "image_too_large", "inflates past the")
    exact = _zeros_gzip(data, 0)
    assert np.array_equal(read_nifti_bytes(exact, "the data: URL").data, volume)


def test_the_volume_cache_is_bounded_in_bytes(tmp_path, monkeypatch):
    cache = nifti_module._CACHE
    cache.clear()
    volume_bytes = 32 * 32 * 16 * 2
    monkeypatch.setattr(cache, "budget", 3 * volume_bytes)
    paths = []
    for k in range(5):
        paths.append(tmp_path / f"v{k}.nii.gz")
        nib.save(nib.Nifti1Image(np.full((32, 32, 16), k, np.int16), np.eye(4)), paths[-1])
        read_nifti(paths[-1])
        assert cache.nbytes <= 3 * volume_bytes
    assert read_nifti(paths[-1]) is read_nifti(paths[-1])  # the newest is kept
    assert read_nifti(paths[0]) is not read_nifti(paths[0]) or cache.nbytes <= 3 * volume_bytes
    big = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4)), big)
    assert read_nifti(big) is not read_nifti(big)  # larger than the whole budget: never kept
    assert cache.nbytes <= 3 * volume_bytes
    cache.clear()


# --- rasters ------------------------------------------------------------------------------------------------------
def _apng(frames: int, side: int, claimed_frames: int | None = None) -> bytes:
    pictures = [Image.fromarray(np.full((side, side), 40 * k, np.uint8)) for k in range(frames)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="PNG", save_all=True, append_images=pictures[1:])
    data = bytearray(buffer.getvalue())
    if claimed_frames is not None:  # rewrite the animation control chunk's frame count (and its CRC)
        at = data.index(b"acTL")
        data[at + 4 : at + 8] = struct.pack(">I", claimed_frames)
        data[at + 12 : at + 16] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 12])))
    return bytes(data)


def _tiff_with_strips(side: int, strips: int) -> bytes:
    """An uncompressed 8-bit TIFF of ``side`` x ``side`` whose strip table lists ``strips`` strips."""
    pixels = bytes(side)
    offsets_at = 8 + len(pixels)
    counts_at = offsets_at + 4 * strips
    table_at = counts_at + 4 * strips
    tags = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (273, 4, strips, offsets_at), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, counts_at)]  # fmt: skip
    table = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + bytes(4)
    return (b"II*\0" + struct.pack("<I", table_at) + pixels + struct.pack(f"<{strips}I", *[8] * strips)
            + struct.pack(f"<{strips}I", *[side] * strips) + table)  # fmt: skip


def test_multi_frame_rasters_are_bounded_and_only_the_first_frame_is_decoded(tmp_path):
    claims = tmp_path / "claims.png"
    claims.write_bytes(_apng(2, 512, claimed_frames=1 << 20))  # 2^20 frames of 512 x 512 claimed
    _refused(lambda: read_raster(claims), "image_too_large", "1048576 frame(s) of 512 x 512")
    _refused(lambda: image_size(str(claims)), "image_too_large", "1048576 frame(s)")
    strips = tmp_path / "strips.tif"
    strips.write_bytes(_tiff_with_strips(64, 20_000))
    _refused(lambda: read_raster(strips), "unreadable_image", "20000 pieces")

    pages = tmp_path / "pages.tif"
    pictures = [Image.fromarray(np.full((256, 256), 50 * (k + 1), np.uint8)) for k in range(4)]
    pictures[0].save(pages, save_all=True, append_images=pictures[1:], compression="tiff_adobe_deflate")
    _refused(lambda: read_raster(pages, max_bytes=4 * 256 * 256 - 1), "image_too_large", "4 frame(s)")
    first = np.asarray(read_raster(pages))
    assert first.shape == (256, 256, 3) and (first == 50).all()
    animated = tmp_path / "animated.png"
    animated.write_bytes(_apng(3, 64))
    assert (np.asarray(read_raster(animated)) == 0).all() and image_size(str(animated)) == (64, 64)


# --- paths --------------------------------------------------------------------------------------------------------
def test_paths_the_system_refuses_are_unreadable_images_naming_the_path(tmp_path):
    names = {}
    for suffix in ("", ".dcm", ".png", ".nii.gz"):
        (tmp_path / f"loop{suffix}").symlink_to(f"loop{suffix}")  # a link to itself
        names[str(tmp_path / f"loop{suffix}")] = "Too many levels of symbolic links"
        names[str(tmp_path / ("x" * 300 + suffix))] = "File name too long"
        names[str(tmp_path / f"nul\0byte{suffix}")] = "embedded null byte"
    for name, words in names.items():
        probes = [lambda name=name: image_size(name), lambda name=name: read_image(name)]
        if "." not in Path(name).name:  # no suffix: the format is told by the file's first bytes
            probes.append(lambda name=name: parse_ref(name).kind)
        for probe in probes:
            err = _refused(probe, "unreadable_image", words)
            assert "Fix: check the path" in str(err) and name in str(err)
    _refused(lambda: read_dicom(tmp_path / ("x" * 300 + ".dcm")), "unreadable_image", "File name too long")
    _refused(lambda: read_raster(tmp_path / "a\0.png"), "unreadable_image", "embedded null byte")
    with pytest.raises(MedicalImageError, match="Fix: give the full path") as caught:
        parse_ref("~no-such-user-here/scan.png")
    assert caught.value.reason == "bad_reference"
    assert read_image(get_testdata_file("CT_small.dcm")).size == (128, 128)


# --- the server ---------------------------------------------------------------------------------------------------
def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _ask(url: str, image: str) -> httpx.Response:
    body = {"model": "tiny", "messages": image_message(image, "Describe it."), "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_the_server_refuses_container_bombs_with_413_and_stays_small(tiny_dir, tmp_path):
    (tmp_path / "bomb.nii.gz").write_bytes(_zeros_gzip(nifti_header_bytes((1024, 1024, 1024), np.uint8), GIB))
    dicom = "application/dicom"
    bombs = {
        "deflated DICOM, 2 GiB behind a small header": data_url(deflated_dicom_bomb(128, 128, 2 * GIB), dicom),
        "deflated DICOM claiming 30000 x 30000": data_url(deflated_dicom_bomb(30000, 30000, GIB), dicom),
        "gzip NIfTI of 1024^3 voxels": data_url(_zeros_gzip(nifti_header_bytes((1024,) * 3, np.uint8), GIB)),
        "NIfTI header claiming 4 GiB of float64": data_url(nifti_header_bytes((1024, 1024, 512), np.float64)),
        "APNG claiming 2^20 frames": data_url(_apng(2, 512, claimed_frames=1 << 20)),
        "local gzip NIfTI of 1024^3 voxels": str(tmp_path / "bomb.nii.gz"),
    }
    flags = ("--served_model_name", "tiny", "--allowed_local_media_path", str(tmp_path), "--log_level", "warning")
    port = free_port()
    with deployed_server(tiny_dir, port, flags) as (process, _log):
        url = f"http://127.0.0.1:{port}"
        before = _memory_kib(process.pid)
        for case, image in bombs.items():
            start = time.perf_counter()
            response = _ask(url, image)
            seconds = time.perf_counter() - start
            assert response.status_code == 413, (case, response.text)
            # the request's own memory estimate may refuse it from the headers before the image's reader does
            assert response.json()["error"]["code"] in SIZE_CODES and seconds < 10, (case, response.text, seconds)
            assert ".dcm:" not in response.json()["error"]["message"]  # named as sent, not by a server file
            print(f"{case}: {response.status_code} {response.json()['error']['code']} in {seconds:.2f} s")
        grown = _memory_kib(process.pid)["VmHWM"] - before["VmRSS"]
        print(f"server: resident {before['VmRSS']} KiB before, peak {grown} KiB above it after the bombs")
        assert grown * 1024 < REFUSAL_MEMORY, f"the server's peak grew by {grown} KiB refusing the bombs"
        deflated = Path(get_testdata_file("image_dfl.dcm")).read_bytes()
        nifti = Path(NIBABEL_DATA, "example4d.nii.gz").read_bytes()
        for image in (data_url(deflated, dicom), data_url(nifti, "application/octet-stream")):
            assert _ask(url, image).status_code == 200
