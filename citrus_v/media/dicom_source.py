"""A DICOM file opened for decoding, its size checked from the header before any pixel is decoded.

What the header declares (Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated) is checked against
the pixel limit (one frame) and the byte budget (every frame) first. A file in the deflated transfer syntax is
inflated here with a ceiling — pydicom would inflate the whole dataset on read, however large — first far enough
to read the image pixel module, then no further than the pixels it declares. Compressed (encapsulated) frames are
decoded one at a time, after the frame's own codestream header is checked against Rows x Columns, since a
JPEG decoder allocates what its codestream says.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .bounded_inflate import BoundedInflater
from .errors import MedicalImageError, check_decoded_bytes, check_pixels, require_file

DEFLATED = "1.2.840.10008.1.2.1.99"
# Deflated files: the elements other than the pixels may inflate to this many bytes.
HEADER_ALLOWANCE = 1 << 23
# Compressed pixel data takes less room than decoded, give or take; a file holding more than this many times its
# decoded size (plus the header allowance) is not read into memory.
COMPRESSED_RATIO = 2
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DEFLATED}
# JPEG start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC) and JPEG-LS's SOF55
_JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: the codestream's first two markers


@dataclass(frozen=True)
class DeclaredSize:
    """What a DICOM header says its pixel data decodes to."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits: int

    @property
    def nbytes(self) -> int:
        """Every frame, decoded (a sample of 1 to 8 bits takes a byte, of 9 to 16 bits two, ...)."""
        return self.rows * self.columns * self.frames * self.samples * -(-self.bits // 8)

    def describe(self) -> str:
        return (
            f"{self.frames} frame(s) of {self.columns} x {self.rows} pixels x {self.samples} sample(s) of "
            f"{self.bits} bits"
        )

    def check(self, path: Path, max_pixels: int | None, max_bytes: int | None) -> None:
        """One frame against ``max_pixels``, every frame against ``max_bytes``."""
        check_pixels(path, self.rows * self.columns, max_pixels)
        check_decoded_bytes(path, self.nbytes, max_bytes, self.describe())


@dataclass
class DicomSource:
    """A DICOM file ready to decode: its header (no pixels), its declared size, and where the pixels are read
    from (the file itself, or the inflated copy of a deflated file)."""

    header: Any
    declared: DeclaredSize
    pixels: Path | BinaryIO
    transfer_syntax: str


def open_dicom(path: Path, max_pixels: int | None, max_bytes: int | None) -> DicomSource:
    """The header of ``path`` and where its pixels are, once its declared size is within both limits."""
    import pydicom

    require_file(path)
    syntax = _transfer_syntax(path)
    if syntax == DEFLATED:
        pixels, declared = _inflate(path, max_pixels, max_bytes, whole=True)
        pixels.seek(0)
        header = _parsed(path, lambda: pydicom.dcmread(pixels, stop_before_pixels=True))
        return DicomSource(header, declared, pixels, syntax)
    header = _parsed(path, lambda: pydicom.dcmread(path, stop_before_pixels=True))
    declared = declared_size(path, header)
    declared.check(path, max_pixels, max_bytes)
    return DicomSource(header, declared, path, syntax)


def read_declared_size(path: Path, max_pixels: int | None, max_bytes: int | None) -> DeclaredSize:
    """The declared size of ``path`` from its header alone (a deflated file is inflated only that far)."""
    import pydicom

    require_file(path)
    if _transfer_syntax(path) == DEFLATED:
        return _inflate(path, max_pixels, max_bytes, whole=False)[1]
    declared = declared_size(path, _parsed(path, lambda: pydicom.dcmread(path, stop_before_pixels=True)))
    declared.check(path, max_pixels, max_bytes)
    return declared


def declared_size(path: Path, header: Any) -> DeclaredSize:
    """Rows, Columns, NumberOfFrames (1 when absent), SamplesPerPixel and BitsAllocated of a parsed header."""
    if "Rows" not in header or "Columns" not in header:
        raise MedicalImageError(f"{path}: the DICOM file has no pixel data (no Rows and Columns)", "unreadable_image")
    try:
        size = DeclaredSize(
            rows=int(header.Rows),
            columns=int(header.Columns),
            frames=int(header.get("NumberOfFrames", 1) or 1),
            samples=int(header.get("SamplesPerPixel", 1) or 1),
            bits=int(header.get("BitsAllocated", 8) or 8),
        )
    except (TypeError, ValueError) as err:
        raise MedicalImageError(
            f"{path}: Rows, Columns, NumberOfFrames, SamplesPerPixel or BitsAllocated is not an integer ({err})",
            "unreadable_image",
        ) from err
    if min(size.rows, size.columns, size.frames, size.samples, size.bits) < 1:
        raise MedicalImageError(f"{path}: the header declares no pixels ({size.describe()})", "unreadable_image")
    return size


def decode_frame(path: Path, source: DicomSource, index: int) -> np.ndarray:
    """The stored pixels of frame ``index`` alone: ``[H, W]`` grey or ``[H, W, 3]`` colour."""
    from pydicom.pixels import pixel_array

    many = source.declared.frames > 1
    try:
        if source.transfer_syntax in _NATIVE:
            if not isinstance(source.pixels, Path):
                source.pixels.seek(0)
            raw = pixel_array(source.pixels, index=index if many else None)  # reads that frame only
        else:
            raw = _decode_encapsulated(path, source, index)
    except MedicalImageError:
        raise
    except Exception as err:  # decoders raise many types: missing plugin, truncated data, bad stream
        raise MedicalImageError(
            f"{path}: cannot decode the pixel data ({source.transfer_syntax or '?'}): {err}. Fix: check the file "
            "is complete; compressed syntaxes need pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-libjpeg",
            "unreadable_image",
        ) from err
    if not (raw.ndim == 2 or (raw.ndim == 3 and raw.shape[-1] == 3)) or raw.size == 0:
        raise MedicalImageError(
            f"{path}: decoded pixels have shape {tuple(raw.shape)}, not one grey or RGB frame: Rows, Columns, "
            "SamplesPerPixel or NumberOfFrames contradict the pixel data",
            "unreadable_image",
        )
    return raw


def _decode_encapsulated(path: Path, source: DicomSource, index: int) -> np.ndarray:
    """One compressed frame, once its codestream declares no more pixels than Rows x Columns (the file, read
    whole, is at most :data:`COMPRESSED_RATIO` times what its pixels decode to)."""
    import pydicom
    from pydicom.encaps import get_frame
    from pydicom.pixels import pixel_array

    declared = source.declared
    stored = source.pixels.stat().st_size if isinstance(source.pixels, Path) else 0
    if stored > COMPRESSED_RATIO * declared.nbytes + HEADER_ALLOWANCE:
        raise MedicalImageError(
            f"{path}: the file holds {stored} bytes, more than {COMPRESSED_RATIO} times what its compressed pixels "
            f"decode to ({declared.describe()}); refused before reading it. Fix: re-encode the file",
            "image_too_large",
        )
    ds = pydicom.dcmread(source.pixels)
    frames = declared.frames
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    encoded = get_frame(ds.PixelData, index, extended_offsets=extended, number_of_frames=frames)
    size = codestream_size(encoded)
    if size is not None and size[0] * size[1] > declared.rows * declared.columns:
        raise MedicalImageError(
            f"{path}: frame {index}'s compressed data declares {size[0]} x {size[1]} pixels, more than the file's "
            f"Columns x Rows ({declared.columns} x {declared.rows}); refused before decoding. Fix: re-encode the "
            "file",
            "unreadable_image",
        )
    return pixel_array(ds, index=index if frames > 1 else None)


def codestream_size(encoded: bytes) -> tuple[int, int] | None:
    """``(width, height)`` that a JPEG, JPEG-LS or JPEG 2000 codestream declares; ``None`` if not recognised."""
    at = encoded.find(_J2K_SIZ, 0, 1024)
    if at >= 0 and len(encoded) >= at + 24:
        width, height, left, top = struct.unpack(">IIII", encoded[at + 8 : at + 24])
        return width - left, height - top
    if encoded[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 9 <= len(encoded):
        if encoded[offset] != 0xFF:
            return None
        marker = encoded[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
        elif marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", encoded[offset + 5 : offset + 9])
            return width, height
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            offset += 2
        else:
            offset += 2 + struct.unpack(">H", encoded[offset + 2 : offset + 4])[0]
    return None


def _transfer_syntax(path: Path) -> str:
    from pydicom.filereader import read_file_meta_info

    return str(_parsed(path, lambda: read_file_meta_info(path)).get("TransferSyntaxUID", ""))


def _parsed(path: Path, read: Callable[[], Any]) -> Any:
    """``read()``'s result; whatever pydicom raises on a broken file becomes a :class:`MedicalImageError`."""
    try:
        return read()
    except MedicalImageError:
        raise
    except Exception as err:  # pydicom raises many types for broken files
        raise MedicalImageError(f"{path}: not a readable DICOM file ({err})", "unreadable_image") from err


def _inflate(path: Path, max_pixels: int | None, max_bytes: int | None, whole: bool) -> tuple[Any, DeclaredSize]:
    """A deflated file as an in-memory DICOM file in Explicit VR Little Endian (the inflated dataset behind its
    own file meta), and its declared size; with ``whole``, the pixels too, never more than they declare."""
    try:
        with open(path, "rb") as handle:
            buffer, start, inflater = _rewrapped_start(handle)
            declared = _inflated_declared_size(path, buffer, start, inflater)
            declared.check(path, max_pixels, max_bytes)
            if whole:
                _inflate_pixels(path, buffer, inflater, declared)
    except MedicalImageError:
        raise
    except Exception as err:  # OSError, zlib.error, and pydicom's many types for a broken file meta
        raise MedicalImageError(f"{path}: the deflated data cannot be inflated ({err})", "unreadable_image") from err
    return buffer, declared


def _rewrapped_start(handle: BinaryIO) -> tuple[Any, int, BoundedInflater]:
    """A new in-memory file holding ``handle``'s file meta (now naming Explicit VR Little Endian) and the first
    :data:`HEADER_ALLOWANCE` inflated bytes; where the dataset starts in it, and the inflater to go on."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    preamble = read_preamble(handle, False) or b"\0" * 128
    meta = FileMetaDataset(read_dataset(handle, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.write(preamble + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=False)
    start = buffer.tell()
    inflater = BoundedInflater(handle, gzip=False)
    inflater.read_into(buffer, HEADER_ALLOWANCE)
    return buffer, start, inflater


def _inflated_declared_size(path: Path, buffer: Any, start: int, inflater: BoundedInflater) -> DeclaredSize:
    """The declared size from the image pixel module (group 0028) of what was inflated so far."""
    from pydicom.filereader import read_dataset

    buffer.seek(start)
    module = _parsed(
        path, lambda: read_dataset(buffer, False, True, stop_when=lambda tag, vr, length: tag >> 16 > 0x0028)
    )
    buffer.seek(0, 2)
    if "Rows" not in module and not inflater.finished:
        raise MedicalImageError(
            f"{path}: the deflated elements before the image pixel module inflate past {HEADER_ALLOWANCE} bytes; "
            "refused before reading further (a decompression bomb). Fix: store the file uncompressed",
            "image_too_large",
        )
    return declared_size(path, module)


def _inflate_pixels(path: Path, buffer: Any, inflater: BoundedInflater, declared: DeclaredSize) -> None:
    """Inflate the rest into ``buffer``, refusing a stream longer than the declared pixels and the allowance."""
    bound = declared.nbytes + HEADER_ALLOWANCE
    inflater.read_into(buffer, bound - inflater.total)
    if inflater.more_follows():
        raise MedicalImageError(
            f"{path}: the deflated data inflates past {bound} bytes, more than its header declares "
            f"({declared.describe()}, plus {HEADER_ALLOWANCE} bytes for the other elements); refused before reading "
            "further (a decompression bomb). Fix: re-save the file",
            "image_too_large",
        )
