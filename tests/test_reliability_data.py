"""Property tests of the data path (hypothesis): hostile JSONL rows, image bytes, DICOM headers, masks, boxes.

The promise checked for every generated row: ``citrus-v data validate`` and the loader either accept it or
reject it with ``file:line`` and a reason; they never crash or hang; and a row they accept loads and encodes
for the model (one mask per ``[SEG]``). Example counts are bounded so the file runs in well under a minute.
"""

from __future__ import annotations

import io
import json
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from citrus_v.data.dataset import RowDataset, SkippedRow, load_sample
from citrus_v.data.rows import iter_rows
from citrus_v.data.validate import ValidationOptions, validate_files
from citrus_v.media import mask_to_rle
from citrus_v.tokens import IMAGE_PLACEHOLDER, SEG_TOKEN

pytest.importorskip("pydicom")

# Generous: a slow shared CPU must not fail an example, but a hang still does.
SETTINGS = dict(
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same examples every run: a failure in CI is a failure here
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no "explain" phase: it re-runs failures for minutes
)


# --- building blocks ------------------------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _png(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _mask_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _png((rng.random((height, width)) > 0.5).astype(np.uint8) * 255)


sizes = st.tuples(st.integers(1, 96), st.integers(1, 96))
magic = st.sampled_from(
    [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"\0" * 128 + b"DICM"]
)


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    """(file name, bytes): a valid PNG of a random size, random bytes, or a truncated / prefixed real image."""
    kind = draw(st.sampled_from(["png", "random", "truncated", "magic"]))
    width, height = draw(sizes)
    good = _image_bytes(width, height, draw(st.integers(0, 9)))
    if kind == "png":
        return "img.png", good
    if kind == "random":
        return draw(st.sampled_from(["x.png", "x.jpg", "x.dcm", "x.nii", "x"])), draw(st.binary(max_size=600))
    if kind == "truncated":
        return "t.png", good[: draw(st.integers(0, max(len(good) - 1, 0)))]
    return draw(st.sampled_from(["m.png", "m.dcm", "m"])), draw(magic) + draw(st.binary(max_size=300))


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
SPECIAL = st.sampled_from(
    [SEG_TOKEN, SEG_TOKEN, SEG_TOKEN, IMAGE_PLACEHOLDER, "<ref-object>", "<bbox>", "<|im_end|>", "<think>", ""]
)


@st.composite
def contents(draw) -> str:
    return "".join(draw(st.lists(st.one_of(TEXT, SPECIAL), max_size=5)))


numbers = st.one_of(
    st.integers(-10, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10, 300),
)


corners = st.sampled_from([4, 4, 4, 3, 5])


@st.composite
def rle_masks(draw, width: int, height: int):
    size = draw(st.one_of(st.just([height, width]), st.lists(st.integers(-2, 100), max_size=3), st.just("x")))
    counts = draw(st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 5000), max_size=6), st.integers()))
    return {"size": size, "counts": counts}


@st.composite
def rows(draw, folder: Path) -> dict:
    """A row shaped like ms-swift's, with hostile values anywhere: counts, roles, files, masks, boxes."""
    width, height = draw(sizes)
    image = st.just(("good.png", _image_bytes(width, height, 0)))
    image_name, image_data = draw(st.one_of(image, image, image, image_files()))
    (folder / image_name).write_bytes(image_data)
    refs = [image_name, image_name + "#window=40,400", image_name + "#frame=3", "missing.png", image_name + "#slice=x"]
    images = draw(st.one_of(st.just([image_name]), st.just([image_name]), st.lists(st.sampled_from(refs), max_size=2)))
    placeholders = draw(st.sampled_from([len(images)] * 4 + [0, len(images) + 1]))
    messages = [{"role": "user", "content": IMAGE_PLACEHOLDER * placeholders + draw(contents())}]
    role = draw(st.sampled_from(["assistant"] * 6 + ["user", "robot"]))
    messages.append({"role": role, "content": draw(contents())})
    row: dict = {"messages": messages, "images": images}
    num_seg = sum(m["content"].count(SEG_TOKEN) for m in messages)
    masks: list = []
    for k in range(draw(st.sampled_from([num_seg] * 4 + [num_seg + 1, max(num_seg - 1, 0)]))):
        kind = draw(st.sampled_from(["png"] * 5 + ["png_other_size", "rle", "rle_good", "polygon", "junk"]))
        if kind == "png":
            (folder / f"mask{k}.png").write_bytes(_mask_bytes(width, height, k))
            masks.append(f"mask{k}.png")
        elif kind == "png_other_size":
            w, h = draw(sizes)
            (folder / f"mask{k}.png").write_bytes(_mask_bytes(w, h, k))
            masks.append(f"mask{k}.png")
        elif kind == "rle":
            masks.append(draw(rle_masks(width, height)))
        elif kind == "rle_good":
            masks.append(mask_to_rle(np.random.default_rng(k).random((height, width)) > 0.5))
        elif kind == "polygon":
            polygons = draw(st.lists(st.lists(numbers, max_size=8), max_size=2))
            masks.append({"polygons": polygons, "size": [height, width]})
        else:
            masks.append(draw(st.one_of(st.integers(), st.text(max_size=10), st.none(), st.lists(st.integers()))))
    if masks:
        row["masks"] = masks
    if draw(st.booleans()):
        count = draw(st.integers(0, 2))
        row["objects"] = {
            "ref": draw(st.lists(TEXT, max_size=count)),
            "bbox": [draw(st.lists(numbers, min_size=n, max_size=n)) for n in draw(st.lists(corners, max_size=count))],
        }
        messages[-1]["content"] += "<ref-object><bbox>" * count
    return row


def _event(text: str) -> None:
    """Count outcomes in ``--hypothesis-show-statistics`` (only inside a hypothesis test)."""
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():
        event(text)


# --- the promise ----------------------------------------------------------------------------------------------
def check_file(path: Path, processor, lines: int) -> None:
    """Validate ``path`` and load it: accepted rows encode for the model, rejected ones have file:line + reason."""
    options = ValidationOptions.for_processor(processor)
    report = validate_files([path], options)
    assert report.ok + report.rejected == lines, report.format()
    for issue in report.skips.issues:
        assert issue.file == str(path) and 1 <= issue.line <= lines and issue.reason and issue.message, issue
        _event(f"rejected: {issue.reason}")
    _event(f"accepted {report.ok} of {lines}")
    dataset = RowDataset.from_jsonl([path], processor, decode=True)
    assert len(dataset) == report.ok, (report.format(), dataset.skips.summary())
    for index in range(len(dataset)):
        item = dataset[index]
        assert not isinstance(item, SkippedRow), item.issue  # validation passed, so loading must too
        record = dataset.records[index]
        sample = load_sample(record, dataset.options)
        encoded = processor.encode_sample(sample)
        num_seg = sum(m["content"].count(SEG_TOKEN) for m in record.row["messages"])
        got = 0 if encoded["gt_masks"] is None else int(encoded["gt_masks"].shape[0])
        assert got == num_seg, f"{record.where}: {num_seg} [SEG] but {got} masks"


@settings(max_examples=60, **SETTINGS)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_random_bytes_as_jsonl_lines_never_crash(tiny, lines):
    _, processor = tiny
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        # blank lines are not rows; every other line is one
        lines = [line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines]
        path.write_bytes(b"\n".join(lines) + b"\n")
        counted = sum(1 for line in lines if line.strip(b" \t\x0b\x0c\x1c\x1d\x1e\x1f\x85"))
        report = validate_files([path], ValidationOptions.for_processor(processor))
        assert report.ok == 0 or counted
        for issue in report.skips.issues:
            assert issue.file == str(path) and issue.line >= 1 and issue.reason, issue


@settings(max_examples=150, **SETTINGS)
@given(st.data())
def test_random_rows_are_accepted_and_encodable_or_rejected_with_a_reason(tiny, data):
    _, processor = tiny
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        generated = [data.draw(rows(folder)) for _ in range(data.draw(st.integers(1, 3)))]
        path = folder / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in generated))
        check_file(path, processor, len(generated))


@settings(max_examples=60, **SETTINGS)
@given(image_files(), sizes)
def test_random_image_bytes_are_accepted_and_encodable_or_rejected(tiny, image, mask_size):
    _, processor = tiny
    name, payload = image
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / name).write_bytes(payload)
        (folder / "mask.png").write_bytes(_mask_bytes(*mask_size, 1))
        row = {
            "messages": [
                {"role": "user", "content": f"{IMAGE_PLACEHOLDER}Segment the lesion."},
                {"role": "assistant", "content": f"Sure, {SEG_TOKEN}."},
            ],
            "images": [name],
            "masks": ["mask.png"],
        }
        path = folder / "rows.jsonl"
        path.write_text(json.dumps(row) + "\n")
        check_file(path, processor, 1)


# --- DICOM headers --------------------------------------------------------------------------------------------
@st.composite
def dicom_files(draw) -> bytes:
    """A DICOM file whose pixel tags may be missing, contradictory or of the wrong value type."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["x"])
    meta.TransferSyntaxUID = draw(
        st.sampled_from([ExplicitVRLittleEndian] * 4 + ["1.2.840.10008.1.2.4.50", "1.2.3.4"])
    )
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    # a coherent image first, then a few faults: a tag dropped, set to a contradictory or unparsable value
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    colour = draw(st.booleans())
    bits = draw(st.sampled_from([8, 16]))
    tags: dict[str, object] = {
        "Rows": rows,
        "Columns": cols,
        "BitsAllocated": bits,
        "BitsStored": bits,
        "HighBit": bits - 1,
        "SamplesPerPixel": 3 if colour else 1,
        "PixelRepresentation": draw(st.sampled_from([0, 1])) if not colour else 0,
        "PhotometricInterpretation": "RGB" if colour else draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"])),
        "NumberOfFrames": "1",
        "RescaleSlope": "1",
        "RescaleIntercept": "-1024",
        "WindowCenter": "40",
        "WindowWidth": "400",
    }
    if colour:
        tags["PlanarConfiguration"] = 0
    hostile = {
        "Rows": [0, 65535],
        "Columns": [0, 65535],
        "BitsAllocated": [1, 12, 32, 0],
        "BitsStored": [0, 33, 12],
        "HighBit": [0, 33],
        "SamplesPerPixel": [3, 2, 0, 1],
        "PixelRepresentation": [2, 1],
        "PhotometricInterpretation": ["RGB", "YBR_FULL", "PALETTE COLOR", "BOGUS", "MONOCHROME2"],
        "NumberOfFrames": ["2", "0", "-1", "abc", "1.5"],
        "RescaleSlope": ["0", "-2.5", "nan", "abc", "1e308"],
        "RescaleIntercept": ["abc", "inf"],
        "WindowCenter": ["abc", "nan", "40\\50"],
        "WindowWidth": ["0", "-5", "abc", "inf"],
        "PlanarConfiguration": [1, 7],
    }
    for name in draw(st.lists(st.sampled_from(sorted(hostile)), max_size=3, unique=True)):
        tags[name] = draw(st.sampled_from([None, *hostile[name]]))
    unparsable: dict[bytes, bytes] = {}
    for index, (name, value) in enumerate(tags.items()):
        if value == "abc":  # pydicom will not write a DS/IS that is not a number: patch the bytes afterwards
            value = f"9{index:03d}"
            unparsable[value.encode()] = b"abc "
        if value is not None:
            setattr(ds, name, value)
    expected = rows * cols * (3 if colour else 1) * bits // 8
    length = draw(st.sampled_from([expected, expected, expected, expected // 2, expected + 7, 0, None]))
    if length is not None:
        data = draw(st.binary(min_size=length, max_size=length))
        if meta.TransferSyntaxUID != ExplicitVRLittleEndian:  # compressed (or unknown) syntaxes hold fragments
            data = encapsulate([data or b"\0\0"])
        ds.add_new(0x7FE00010, "OB", data)  # PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    payload = buffer.getvalue()
    for placeholder, value in unparsable.items():
        payload = payload.replace(placeholder, value)
    return payload


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid values it is given
@settings(max_examples=80, **SETTINGS)
@given(dicom_files())
def test_random_dicom_headers_are_accepted_and_encodable_or_rejected(tiny, payload):
    _, processor = tiny
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "scan.dcm").write_bytes(payload)
        row = {
            "messages": [
                {"role": "user", "content": f"{IMAGE_PLACEHOLDER}What is shown?"},
                {"role": "assistant", "content": "A scan."},
            ],
            "images": ["scan.dcm"],
        }
        path = folder / "rows.jsonl"
        path.write_text(json.dumps(row) + "\n")
        check_file(path, processor, 1)


def test_iter_rows_reports_undecodable_bytes_with_file_and_line(tmp_path):
    """A found case: bytes that are not UTF-8 in the middle of a JSONL file."""
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path.write_bytes(good.encode() + b"\n\xff\xfe\x80{\n" + good.encode() + b"\n")
    from citrus_v.data.rows import SkipCounter

    skips = SkipCounter()
    assert len(list(iter_rows([path], skips))) == 2
    assert [(i.line, i.reason) for i in skips.issues] == [(2, "invalid_encoding")]


# --- regression tests: each case the properties above found ---------------------------------------------------
def _one_row_file(folder: Path, row: dict) -> Path:
    path = folder / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def _seg_row(mask) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}Segment."},
            {"role": "assistant", "content": f"{SEG_TOKEN}"},
        ],
        "images": ["good.png"],
        "masks": [mask],
    }


@pytest.mark.parametrize(
    "mask",
    [{"size": [], "counts": ""}, {"size": "x", "counts": "abc"}, {"size": [8, 8], "counts": 5},
     {"polygons": [[1, "a", 3]], "size": [8, 8]}, {"polygons": [[0, 0, 1, float("nan"), 2, 2]], "size": [8, 8]}],
)
def test_malformed_mask_objects_are_rejected_as_bad_mask(tiny, tmp_path, mask):
    (tmp_path / "good.png").write_bytes(_image_bytes(8, 8, 0))
    path = _one_row_file(tmp_path, _seg_row(mask))
    report = validate_files([path], ValidationOptions.for_processor(tiny[1]))
    assert report.ok == 0 and [i.reason for i in report.skips.issues] == ["bad_mask"], report.format()
    assert f"{path}:1" in str(report.skips.issues[0])


def test_images_without_placeholders_go_before_the_user_text_or_are_rejected(tiny, tmp_path):
    (tmp_path / "good.png").write_bytes(_image_bytes(8, 8, 0))
    # ms-swift convention: no placeholder at all puts the image before the first user text; it must encode
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    check_file(_one_row_file(tmp_path, {"messages": messages, "images": ["good.png"]}), tiny[1], 1)
    assert validate_files([tmp_path / "rows.jsonl"], ValidationOptions.for_processor(tiny[1])).ok == 1
    # no user message for the image to go before: rejected, not failed later in the template
    messages = [{"role": "system", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    row = {"messages": messages, "images": ["good.png"]}
    report = validate_files([_one_row_file(tmp_path, row)], ValidationOptions.for_processor(tiny[1]))
    assert [i.reason for i in report.skips.issues] == ["image_count"], report.format()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("tag", ["NumberOfFrames", "RescaleSlope", "WindowCenter"])
def test_dicom_with_an_unparsable_number_is_rejected_or_read(tiny, tmp_path, tag):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds, meta = Dataset(), FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, SecondaryCaptureImageStorage, generate_uid()
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel, ds.PixelRepresentation = 8, 8, 7, 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    setattr(ds, tag, "9000")
    ds.add_new(0x7FE00010, "OB", bytes(range(16)))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    (tmp_path / "scan.dcm").write_bytes(buffer.getvalue().replace(b"9000", b"abc "))
    row = {"messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}?"}, {"role": "assistant", "content": "A."}],
           "images": ["scan.dcm"]}
    path = _one_row_file(tmp_path, row)
    check_file(path, tiny[1], 1)  # accepted and encodable, or rejected with a reason
    if tag == "NumberOfFrames":  # the frame count decides which pixels to read: no guessing
        report = validate_files([path], ValidationOptions.for_processor(tiny[1]))
        assert [i.reason for i in report.skips.issues] == ["unreadable_image"], report.format()
        assert tag in report.skips.issues[0].message


def test_cli_validate_answers_hostile_files_with_file_and_line(tmp_path, capsys):
    from citrus_v.cli import main

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"messages": 5}\n\xff\xfe\nnot json\n[1, 2]\n{"messages": [{"role": "user", "content": "x"}]}\n')
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "0 row(s) ok, 5 rejected" in out
    for line in range(1, 6):
        assert f"{path}:{line}:" in out
