"""One question about a volume or clip -> a 3-D mask per [SEG]: SAM 2 on every frame of the source (per-frame
prompting, or memory), "not present" from SAM 2's object score, and `citrus-v infer` on a NIfTI volume, a DICOM
series folder and a multi-frame DICOM (mask files on the source grid, a DICOM-SEG, volumes in mL).

The tiny model's masks are random: these tests check structure and geometry, not quality.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nibabel.testing import data_path as NIBABEL_DATA
from transformers import LogitsProcessorList

from citrus_v.cli import main
from citrus_v.infer import CitrusVPredictor, Request
from citrus_v.infer.mask_frames import DEFAULT_MAX_FRAMES
from citrus_v.infer.predictor import VideoPrediction
from citrus_v.infer.volume_infer import series_folder, volume_source
from citrus_v.media import read_volume
from citrus_v.modeling import CitrusV, CitrusVConfig
from citrus_v.processing import CitrusVProcessor

from .conftest import phantom
from .test_serve_support import ScriptedPredictor, png_bytes

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.data import get_testdata_file  # noqa: E402

from .forcing import ForceAnswer, ObjectScores  # noqa: E402
from .test_volume_outputs import ct_series  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # highdicom warns about the test files' values

ANATOMICAL = os.path.join(NIBABEL_DATA, "anatomical.nii")  # 33 x 41 x 25, 2 mm: 25 axial frames of 41 x 33
ANSWER = "Sure, the brain [SEG]."
SMALL_FRAMES = {"fps_max_frames": 8, "video_min_pixels": 4 * 784, "video_max_pixels": 64 * 784}


@pytest.fixture(scope="module")
def processor(tiny_dir) -> CitrusVProcessor:
    """The tiny model's processor with a few small frames per video: fast."""
    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    processor.set_video_sampling(**SMALL_FRAMES)
    return processor


@pytest.fixture(scope="module")
def predictor(tiny, processor) -> CitrusVPredictor:
    return CitrusVPredictor(tiny[0], processor)


def ask(predictor: CitrusVPredictor, video, answer: str = ANSWER) -> VideoPrediction:
    request = Request(images=[], prompt="<video>Segment the brain.", videos=[video])
    prompt_length = len(predictor.encode(request).row["input_ids"])
    ids = predictor.processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [predictor.eos_token_ids[0]]
    force = LogitsProcessorList([ForceAnswer(ids, prompt_length)])
    [prediction] = predictor.predict_batch([request], logits_processor=force, max_new_tokens=len(ids) + 2)
    return prediction


# ---------------------------------------------------------------------------------------------- the predictor


def test_a_seg_about_a_volume_gets_a_mask_on_every_frame_as_sam2_draws_each_frame_alone(predictor):
    prediction = ask(predictor, ANATOMICAL)
    assert isinstance(prediction, VideoPrediction) and prediction.text == ANSWER and prediction.masks == []
    assert len(prediction.videos[0].frames) == 8  # the language model saw 8 of the 25 slices...
    [mask] = prediction.volume_masks
    volume = read_volume(ANATOMICAL)
    assert mask.mask.shape == volume.values.shape == (25, 41, 33) and mask.mask.dtype == bool  # ...SAM 2 all 25
    assert mask.volume.source_frames is None and prediction.notes == []
    assert mask.label == "brain" and mask.index == 0 and mask.mode == predictor.propagation == "per_frame"
    assert mask.object_scores.shape == (25,) and mask.key_frame == int(mask.object_scores.argmax())
    assert mask.present == bool(mask.object_scores.max() > 0)
    # per-frame prompting is the 2-D path on each frame: the same mask as decoding that frame alone
    window = volume.display_window()
    with torch.no_grad():
        for k in range(volume.num_frames):
            image = volume.frame_image(k, window)
            pixels = predictor.processor.sam_pixel_values(image)[None]
            decoded = predictor.model.decode_masks([torch.stack(prediction.seg_states)], pixels)
            alone = predictor.postprocess_masks(decoded.masks[0], image.size)[0][0]
            expected = alone if mask.object_scores[k] > 0 else np.zeros_like(alone)
            np.testing.assert_array_equal(mask.mask[k], expected)
    assert mask.mask.any()  # the check above compared real masks
    measures = mask.measures()
    assert measures.voxels == int(mask.mask.sum()) and measures.frames == mask.frames
    assert measures.volume_ml == pytest.approx(mask.mask.sum() * 8 / 1000, rel=1e-5)  # 2 x 2 x 2 mm voxels


def test_a_target_sam2_finds_on_no_frame_is_not_present_and_the_words_stand(predictor):
    with ObjectScores(predictor.model, -3.0):
        prediction = ask(predictor, ANATOMICAL)
    [mask] = prediction.volume_masks
    assert prediction.text == ANSWER  # the model's words are the model's
    assert mask.present is False and not mask.mask.any() and mask.frames == []
    assert mask.mask.shape == (25, 41, 33) and np.all(mask.object_scores == -3.0)
    assert mask.measures().volume_ml == 0.0 and mask.measures().bbox3d is None


def test_more_frames_than_max_frames_are_segmented_on_evenly_spaced_ones_and_said(tiny, processor):
    predictor = CitrusVPredictor(tiny[0], processor, max_frames=5)
    prediction = ask(predictor, ANATOMICAL)
    [mask] = prediction.volume_masks
    assert mask.mask.shape == (5, 41, 33) and mask.source_frames == [0, 6, 12, 18, 24]
    assert len(prediction.notes) == 1 and "5 evenly spaced frames of 25" in prediction.notes[0]
    assert "--max_frames" in prediction.notes[0]
    assert mask.measures().volume_ml is None  # slices skipped between the samples are not measured
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
        CitrusVPredictor(tiny[0], processor, max_frames=0)


def test_memory_propagation_is_the_default_with_the_memory_modules(tiny, tiny_dir, processor):
    with pytest.raises(ValueError, match="needs SAM 2's memory modules.*use per_frame"):
        CitrusVPredictor(tiny[0], processor, propagation="memory")
    config = CitrusVConfig.from_pretrained(tiny_dir)
    config.sam2_memory_config = {"memory_attention_num_layers": 1}
    model = CitrusV.from_pretrained(tiny_dir, config=config).eval()  # random memory modules
    with_memory = CitrusVPredictor(model, processor)
    assert with_memory.propagation == "memory"
    frames = [phantom(k, size=48).image for k in range(6)]  # a frame list: a clip of 6 frames
    with ObjectScores(model, 2.0):
        prediction = ask(with_memory, frames)
    [mask] = prediction.volume_masks
    assert mask.mode == "memory" and mask.mask.shape == (6, 48, 48) and mask.present
    per_frame = CitrusVPredictor(model, processor, propagation="per_frame")
    with ObjectScores(model, 2.0):
        [alone] = ask(per_frame, frames).volume_masks
    assert alone.mode == "per_frame" and alone.mask.shape == mask.mask.shape
    # the prompted key frame is the same in both modes; the tracked frames come from SAM 2's memory
    np.testing.assert_array_equal(mask.mask[mask.key_frame], alone.mask[mask.key_frame])
    # a checkpoint that records its mode (config.propagation, as the tiny base does) gets it unless asked otherwise
    model.config.propagation = "per_frame"
    assert CitrusVPredictor(model, processor).propagation == "per_frame"
    assert CitrusVPredictor(model, processor, propagation="memory").propagation == "memory"
    model.config.propagation = "sideways"
    with pytest.raises(ValueError, match="propagation 'sideways' is not one of per_frame, memory"):
        CitrusVPredictor(model, processor)


# ------------------------------------------------------------------------------------------- citrus-v infer


@pytest.fixture
def scripted_cli(tiny, processor, monkeypatch):
    """`citrus-v infer` loads a scripted predictor ("segment" -> two [SEG]) with the command line's settings."""
    settings = []

    def from_pretrained(cls, directory, device=None, dtype=None, **given):
        settings.append(given)
        return ScriptedPredictor(tiny[0], processor, **given)

    monkeypatch.setattr(CitrusVPredictor, "from_pretrained", classmethod(from_pretrained))
    return settings


def infer(*arguments: str) -> int:
    return main(["infer", "--model", "tiny-base", "--query", "Please segment the lesion.", *arguments])


def test_infer_on_a_nifti_volume_writes_masks_on_its_grid_and_volumes_in_ml(scripted_cli, tmp_path, capsys):
    out = tmp_path / "out"
    assert infer("--image", ANATOMICAL, "--out", str(out)) == 0
    assert scripted_cli == [{"propagation": None, "max_frames": DEFAULT_MAX_FRAMES}]
    printed = capsys.readouterr()
    result = json.loads((out / "prediction.json").read_text())
    assert printed.out.strip() == result["answer"] == "Sure, the lesion [SEG] and the organ [SEG]."
    assert result["video"]["format"] == "nifti" and result["video"]["segmented_frames"] == 25
    assert result["video"]["model_frames"] == [0, 3, 7, 10, 14, 17, 21, 24]
    assert result["not_written"] == [] and result["video"]["spacing"] == [2.0, 2.0, 2.0]
    source = nib.load(ANATOMICAL)
    assert [m["label"] for m in result["masks"]] == ["lesion", "organ"]
    for k, entry in enumerate(result["masks"]):
        assert {"present", "frames", "volume_ml", "spacing", "areas", "bbox3d", "key_frame"} <= set(entry)
        written = nib.load(out / f"mask_{k + 1}.nii.gz")
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        voxels = int(np.asarray(written.dataobj).sum())
        assert voxels == entry["voxels"] and entry["volume_ml"] == pytest.approx(voxels * 8 / 1000, rel=1e-5)
        assert len(entry["object_scores"]) == 25 and entry["present"] == (max(entry["object_scores"]) > 0)
    assert any(entry["frames"] for entry in result["masks"])
    assert result["files"]["masks"] == [str(out / "mask_1.nii.gz"), str(out / "mask_2.nii.gz")]
    assert result["files"]["overlay"] == str(out / "overlay.png") and (out / "overlay.png").is_file()
    assert "3-D mask(s)" in printed.err
    # one slice named: the 2-D path, as before
    flat = tmp_path / "flat"
    assert infer("--image", f"{ANATOMICAL}#slice=3", "--out", str(flat)) == 0
    result = json.loads((flat / "prediction.json").read_text())
    assert result["image"]["kind"] == "nifti" and result["image"]["slice"] == 3 and "video" not in result
    assert nib.load(flat / "mask_1.nii.gz").shape == source.shape


def test_infer_on_a_dicom_series_folder_writes_a_seg_with_one_frame_per_slice_with_mask(scripted_cli, tmp_path):
    volume, paths = ct_series(tmp_path / "series")  # 5 slices of CT_small.dcm, 5 mm apart, shuffled names
    (tmp_path / "series" / "README.txt").write_text("not an image")
    out = tmp_path / "out"
    assert infer("--image", str(tmp_path / "series"), "--out", str(out), "--propagation", "per_frame") == 0
    assert scripted_cli[0]["propagation"] == "per_frame"
    result = json.loads((out / "prediction.json").read_text())
    assert result["video"]["format"] == "dicom_series" and result["not_written"] == []
    assert result["files"]["masks"][-1] == str(out / "masks.seg.dcm")
    assert all(m["volume_ml"] is not None and m["spacing"][0] == pytest.approx(5.0) for m in result["masks"])
    uids = [str(d.SOPInstanceUID) for d in volume.datasets]  # along the normal, as the reader orders them
    seg = hd.seg.segread(out / "masks.seg.dcm")
    with_mask = {(k + 1, uids[f]) for k, m in enumerate(result["masks"]) for f in m["frames"]}
    assert with_mask and seg.number_of_frames == len(with_mask)  # one frame per slice with mask, per segment
    found = set()
    for item in seg.PerFrameFunctionalGroupsSequence:
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        found.add((number, str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)))
    assert found == with_mask
    for k in range(len(result["masks"])):  # the NIfTI: voxels (column, row, frame) over the 5 slices
        assert nib.load(out / f"mask_{k + 1}.nii.gz").shape == (128, 128, 5)


def test_infer_on_a_multiframe_dicom_is_about_the_whole_stack(scripted_cli, tmp_path):
    out = tmp_path / "out"
    path = get_testdata_file("emri_small.dcm")  # an Enhanced MR of 10 frames of 64 x 64
    assert infer("--image", path, "--out", str(out)) == 0
    result = json.loads((out / "prediction.json").read_text())
    assert result["video"]["format"] == "dicom" and result["video"]["segmented_frames"] == 10
    assert nib.load(out / "mask_1.nii.gz").shape == (64, 64, 10)
    assert all(len(m["object_scores"]) == 10 for m in result["masks"])
    # no frame positions: highdicom segments it a frame at a time, one Segmentation per frame with mask
    frames = sorted({f for m in result["masks"] for f in m["frames"]})
    assert frames and result["not_written"] == []
    assert result["files"]["masks"][2:] == [str(out / f"masks_frame{f}.seg.dcm") for f in frames]
    flat = tmp_path / "flat"
    assert infer("--image", path, "--frame", "2", "--out", str(flat)) == 0
    assert json.loads((flat / "prediction.json").read_text())["image"]["frame"] == 2


def test_infer_on_a_video_clip_draws_a_strip_and_measures_no_volume(scripted_cli, tmp_path):
    av = pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:  # a white square moving right on black, 10 frames at 5 fps
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(10):
            image = np.zeros((48, 64, 3), np.uint8)
            image[16:32, 4 * k : 4 * k + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "out"
    assert infer("--image", str(clip), "--out", str(out)) == 0
    result = json.loads((out / "prediction.json").read_text())
    assert result["video"]["kind"] == "clip" and result["video"]["segmented_frames"] == 10
    assert all(m["volume_ml"] is None for m in result["masks"])  # frames in time: no millilitres
    assert result["files"]["masks"] == [str(out / "mask_1.nii.gz"), str(out / "mask_2.nii.gz")]  # no SEG
    assert nib.load(out / "mask_1.nii.gz").shape == (64, 48, 10) and (out / "overlay.png").is_file()


def test_what_is_a_volume_and_what_is_an_image(tmp_path):
    assert volume_source(ANATOMICAL).format == "nifti"
    assert volume_source(ANATOMICAL, axis=0).reference.endswith("#axis=0")
    assert volume_source(f"{ANATOMICAL}#slice=4") is None and volume_source(ANATOMICAL, slice_index=4) is None
    assert volume_source(get_testdata_file("CT_small.dcm")) is None  # one frame: an image
    assert volume_source(get_testdata_file("emri_small.dcm")).format == "dicom"
    assert volume_source(get_testdata_file("emri_small.dcm"), frame=0) is None
    png = tmp_path / "scan.png"
    png.write_bytes(png_bytes(phantom(0, size=32).image))
    assert volume_source(png) is None and volume_source(tmp_path / "missing.nii.gz") is None
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")  # by its name: the reader says what is wrong with its contents
    assert volume_source(clip).format == "video"
    _, paths = ct_series(tmp_path / "series", count=3)
    assert series_folder(tmp_path / "series") == (True, None)
    shutil.copy(png, tmp_path / "series" / "scan.png")  # a picture among the slices: a folder of images
    assert series_folder(tmp_path / "series") == (False, None)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(paths[0], single / "a.dcm")
    assert series_folder(single) == (False, None)  # one slice: an image
    Path(single / "b.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    one_volume, why = series_folder(single)  # two series: answered one by one, and said why
    assert not one_volume and "2 series" in why
