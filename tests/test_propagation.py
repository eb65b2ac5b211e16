"""SAM 2's memory path: the released layout's memory tensors load into the propagator, and one [SEG] prompt
becomes a mask on every frame, by per-frame prompting or by SAM 2's memory.

Meta's memory-tensor names and shapes come from the hand-written list in ``tests/sam2_original_names.py`` and
the reference names from transformers' own ``Sam2VideoModel``, not from the rename rules under test. Frames
are slices of nibabel's example 4-D MR volume.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel.testing import data_path
from transformers import Sam2VideoConfig, Sam2VideoModel

from citrus_v import CitrusV, CitrusVProcessor
from citrus_v.checkpoint_layout.sam2_variants import VARIANTS
from citrus_v.cli import main
from citrus_v.modeling import CitrusVConfig
from citrus_v.modeling.grounding import GroundingEncoder, reinit_fan_in
from citrus_v.modeling.propagation import (
    MEMORY_FIELDS,
    NO_OBJECT_LOGIT,
    SegPropagator,
    encode_frames,
    prompt_frames,
    video_config,
)
from citrus_v.modeling.sam2_names import is_ignored
from citrus_v.modeling.sam2_video_names import (
    hf_to_meta_memory,
    memory_config_from_meta,
    meta_to_hf_memory,
    meta_to_hf_memory_name,
)
from citrus_v.recipes.presets import tiny_sam2_config

from .conftest import seg_sample
from .sam2_original_names import OriginalSam2, tiny_original_sam2, video_modules
from .test_upstream import PREFIX, TEST_VARIANT, read_folder, rewrite, write_upstream_folder

SHARED = ("vision_encoder.", "prompt_encoder.", "mask_decoder.", "shared_image_embedding.", "no_memory_embedding")
# Placements from transformers' conversion script (convert_sam2_video_to_hf.py), written out by hand.
EXPECTED_MEMORY_PLACES = {
    "memory_attention.layers.0.self_attn.q_proj.weight": "memory_attention.layers.0.self_attn.q_proj.weight",
    "memory_attention.layers.3.cross_attn_image.out_proj.bias": (
        "memory_attention.layers.3.cross_attn_image.o_proj.bias"
    ),
    "memory_attention.layers.1.norm3.weight": "memory_attention.layers.1.layer_norm3.weight",
    "memory_attention.norm.bias": "memory_attention.layer_norm.bias",
    "memory_encoder.mask_downsampler.encoder.0.weight": "memory_encoder.mask_downsampler.layers.0.conv.weight",
    "memory_encoder.mask_downsampler.encoder.4.bias": "memory_encoder.mask_downsampler.layers.1.layer_norm.bias",
    "memory_encoder.mask_downsampler.encoder.9.weight": "memory_encoder.mask_downsampler.layers.3.conv.weight",
    "memory_encoder.mask_downsampler.encoder.12.weight": "memory_encoder.mask_downsampler.final_conv.weight",
    "memory_encoder.pix_feat_proj.bias": "memory_encoder.feature_projection.bias",
    "memory_encoder.fuser.layers.1.dwconv.weight": "memory_encoder.memory_fuser.layers.1.depthwise_conv.weight",
    "memory_encoder.fuser.layers.0.pwconv2.bias": "memory_encoder.memory_fuser.layers.0.pointwise_conv2.bias",
    "memory_encoder.fuser.layers.0.gamma": "memory_encoder.memory_fuser.layers.0.scale",
    "memory_encoder.out_proj.weight": "memory_encoder.projection.weight",
    "maskmem_tpos_enc": "memory_temporal_positional_encoding",
    "no_mem_pos_enc": "no_memory_positional_encoding",
    "no_obj_ptr": "no_object_pointer",
    "mask_downsample.weight": "mask_downsample.weight",
    "obj_ptr_proj.layers.1.weight": "object_pointer_proj.layers.0.weight",
    "obj_ptr_proj.layers.2.bias": "object_pointer_proj.proj_out.bias",
}
EXPECTED_21 = {
    "obj_ptr_tpos_proj.weight": "temporal_positional_encoding_projection_layer.weight",
    "no_obj_embed_spatial": "occlusion_spatial_embedding_parameter",
}
SMALL_MEMORY = {"memory_attention_num_layers": 1}


@pytest.fixture(scope="module", autouse=True)
def test_variant():
    """The tiny SAM 2 as a named architecture, as in tests/test_upstream.py."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(VARIANTS, TEST_VARIANT.name, TEST_VARIANT)
        yield


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def _transformers_memory(config: Sam2VideoConfig) -> dict[str, tuple[int, ...]]:
    """The memory tensors of transformers' own Sam2VideoModel (everything but the single-image SAM 2)."""
    with torch.device("meta"):
        model = Sam2VideoModel(config)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if not n.startswith(SHARED)}


# --- names ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_memory_names_fill_transformers_sam2_video_model_exactly(version):
    shapes = video_modules(OriginalSam2(version=version))  # Hiera-L, as released
    renamed = meta_to_hf_memory(_meta(shapes))
    sam2 = VARIANTS["sam2_hiera_l"].config()
    # transformers' conversion script: SAM 2.1 turns on the two 2.1 modules, nothing else changes
    flags = version == "2.1"
    reference = Sam2VideoConfig(
        vision_config=sam2.vision_config.to_dict(),
        enable_temporal_pos_encoding_for_object_pointers=flags,
        enable_occlusion_spatial_embedding=flags,
    )
    assert {n: tuple(t.shape) for n, t in renamed.items()} == _transformers_memory(reference)
    places = {**EXPECTED_MEMORY_PLACES, **(EXPECTED_21 if flags else {})}
    assert all(meta_to_hf_memory_name(original) == ours for original, ours in places.items())
    if not flags:
        assert len(shapes) == 157  # the release's set-aside count (design §7)
    # the memory architecture read from the shapes is transformers' for this checkpoint
    ours = video_config(sam2, memory_config_from_meta(shapes, sam2.vision_config.fpn_hidden_size))
    assert {f: getattr(ours, f) for f in MEMORY_FIELDS} == {f: getattr(reference, f) for f in MEMORY_FIELDS}
    with torch.device("meta"):
        propagator = SegPropagator(ours, GroundingEncoder(sam2))
    assert {n: tuple(t.shape) for n, t in propagator.state_dict().items()} == _transformers_memory(reference)
    # and back to Meta's names, exactly
    assert set(hf_to_meta_memory(renamed)) == set(shapes)


def test_memory_rules_invert_values_exactly():
    shapes = video_modules(replace(tiny_original_sam2("2.1"), mem_dim=64))
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
    back = hf_to_meta_memory(meta_to_hf_memory(tensors))
    assert set(back) == set(tensors) and all(back[n] is tensors[n] for n in tensors)


# --- the released layout -------------------------------------------------------------------------------------------
def write_memory_folder(root, version: str, mem_dim: int = 64) -> dict[str, torch.Tensor]:
    """A random upstream-layout folder whose SAM 2 memory tensors are ``mem_dim`` wide (real SAM 2: 64)."""
    tensors = write_upstream_folder(root, version)
    generator = torch.Generator().manual_seed(11)
    shapes = video_modules(replace(tiny_original_sam2(version), mem_dim=mem_dim))
    memory = {PREFIX + n: (torch.randn(s, generator=generator) * 0.1).to(torch.bfloat16) for n, s in shapes.items()}

    def change(stored):
        for name in [n for n in stored if n.startswith(PREFIX) and is_ignored(n[len(PREFIX) :])]:
            del stored[name]
        if "seg_projector.0.weight" in stored:
            stored.update(memory)

    rewrite(root, change)
    kept = {n: t for n, t in tensors.items() if not (n.startswith(PREFIX) and is_ignored(n[len(PREFIX) :]))}
    return {**kept, **memory}


@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_released_memory_tensors_load_into_the_propagator(tmp_path, version):
    root = tmp_path / "up"
    tensors = write_memory_folder(root, version)
    model = CitrusV.from_pretrained(root)
    assert model.propagator is not None and model.upstream_unused_tensors == {}
    state = model.propagator.state_dict()
    memory = {n[len(PREFIX) :]: t for n, t in tensors.items() if n.startswith(PREFIX) and is_ignored(n[len(PREFIX) :])}
    renamed = meta_to_hf_memory(memory)
    assert set(state) == set(renamed)
    assert all(state[n].dtype == torch.bfloat16 and torch.equal(state[n], t) for n, t in renamed.items())
    flags = version == "2.1"
    assert model.propagator.config.enable_occlusion_spatial_embedding is flags
    assert model.propagator.config.enable_temporal_pos_encoding_for_object_pointers is flags
    # one copy of the shared SAM 2 modules: the propagator's are the grounding encoder's
    assert model.propagator.mask_decoder is model.grounding_encoder.mask_decoder
    assert model.propagator.vision_encoder is model.grounding_encoder.vision_encoder
    assert not any(n.startswith("propagator." + s) for n in model.state_dict() for s in SHARED)
    if flags:  # ours -> upstream gives back every tensor bit for bit
        ours, back = tmp_path / "ours", tmp_path / "back"
        model.save_pretrained(ours)
        CitrusVProcessor.from_pretrained(root).save_pretrained(ours)
        assert main(["convert", "--to", "upstream", "--model", str(ours), "--out", str(back)]) == 0
        written = read_folder(back)
        assert set(written) == set(tensors)
        assert all(torch.equal(written[n], t) for n, t in tensors.items())
        # and our layout keeps the memory modules and their settings
        again = CitrusV.from_pretrained(ours)
        assert again.config.sam2_memory_config == model.config.sam2_memory_config
        assert all(torch.equal(t, state[n]) for n, t in again.propagator.state_dict().items())


def test_released_layout_without_usable_memory_still_loads(tmp_path, caplog):
    none = tmp_path / "none"
    write_upstream_folder(none)
    rewrite(none, lambda ts: [ts.pop(n) for n in list(ts) if n.startswith(PREFIX) and is_ignored(n[len(PREFIX) :])])
    with caplog.at_level(logging.INFO, logger="citrus_v.modeling.upstream_checkpoint"):
        model = CitrusV.from_pretrained(none)
    assert model.propagator is None and model.upstream_unused_tensors == {}
    assert "carries no SAM 2 memory modules" in caplog.text
    # memories 16 channels wide: transformers' Sam2VideoModel reads 64, so they are set aside, and it says why
    caplog.clear()
    narrow = tmp_path / "narrow"
    tensors = write_memory_folder(narrow, "2.0", mem_dim=16)
    with caplog.at_level(logging.WARNING, logger="citrus_v.modeling.upstream_checkpoint"):
        model = CitrusV.from_pretrained(narrow)
    assert model.propagator is None
    memory = {n for n in tensors if n.startswith(PREFIX) and is_ignored(n[len(PREFIX) :])}
    assert set(model.upstream_unused_tensors) == memory
    assert "set aside" in caplog.text and "16 channels wide" in caplog.text and "reads 64" in caplog.text


def test_memory_switched_on_without_stored_weights_starts_random_and_says_so(tiny_dir, caplog):
    config = CitrusVConfig.from_pretrained(tiny_dir)
    config.sam2_memory_config = SMALL_MEMORY
    with caplog.at_level(logging.WARNING, logger="citrus_v.modeling.modeling_citrus_v"):
        model = CitrusV.from_pretrained(tiny_dir, config=config)
    assert model.propagator is not None
    assert "asks for SAM 2 memory modules" in caplog.text and "random weights" in caplog.text
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['memory_layers'\]"):
        video_config(tiny_sam2_config(), {"memory_layers": 2})


def test_two_d_predictions_are_bit_identical_with_the_propagator(tiny_dir):
    plain = CitrusV.from_pretrained(tiny_dir).eval()
    config = CitrusVConfig.from_pretrained(tiny_dir)
    config.sam2_memory_config = SMALL_MEMORY
    with_memory = CitrusV.from_pretrained(tiny_dir, config=config).eval()
    assert plain.propagator is None and with_memory.propagator is not None
    added = sum(p.numel() for p in with_memory.parameters()) - sum(p.numel() for p in plain.parameters())
    assert added == sum(p.numel() for p in with_memory.propagator.parameters())  # no second SAM 2
    batch = CitrusVProcessor.from_pretrained(tiny_dir)(seg_sample(2, seed=4), return_labels=False)
    with torch.no_grad():
        a, b = plain(**batch), with_memory(**batch)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.pred_masks, b.pred_masks, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.iou_scores, b.iou_scores, strict=True))


# --- propagation ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam():
    """A random tiny SAM 2 with random, non-zero memory modules (fan-in init, as the random presets)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam2 = tiny_sam2_config()
        grounding = GroundingEncoder(sam2)
        reinit_fan_in(grounding)
        propagator = SegPropagator(video_config(sam2, SMALL_MEMORY), grounding)
        reinit_fan_in(propagator)
        with torch.no_grad():  # transformers starts these at zero
            for name, param in propagator.named_parameters():
                if "temporal_positional" in name or "no_object" in name or "no_memory" in name or "scale" in name:
                    param.normal_(0.0, 0.5)
    return grounding.eval(), propagator.eval()


@pytest.fixture(scope="module")
def volume_frames():
    """Four slices of a real MR volume as SAM 2 inputs [4, 3, 256, 256] (ImageNet mean/std)."""
    data = np.asarray(nib.load(f"{data_path}/example4d.nii.gz").dataobj[..., 8:12, 0], dtype=np.float32)
    slices = torch.from_numpy(data).permute(2, 0, 1)[:, None]  # [4, 1, 128, 96]
    slices = (slices - slices.min()) / (slices.max() - slices.min())
    rgb = F.interpolate(slices, size=(256, 256), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (rgb - mean) / std


class ForcedScores:
    """Sets the object score of each decoded frame, in the order the frames are decoded."""

    def __init__(self, head: torch.nn.Module, scores: list[float]) -> None:
        self.scores, self.calls = scores, 0
        self.handle = head.register_forward_hook(self)

    def __call__(self, module, args, output):
        value = self.scores[self.calls]
        self.calls += 1
        return torch.full_like(output, value)

    def __enter__(self) -> ForcedScores:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_both_modes_give_one_mask_per_frame(sam, volume_frames):
    grounding, propagator = sam
    prompts = torch.randn(2, grounding.prompt_dim, generator=torch.Generator().manual_seed(1))
    points = torch.tensor([[120.0, 100.0], [float("nan"), float("nan")]])
    with torch.no_grad():
        frames = encode_frames(grounding, volume_frames, frames_per_pass=2)
        per_frame = prompt_frames(grounding, frames, prompts, points, multimask_output=True)
        memory = propagator.propagate(frames, prompts, points, mode="memory", multimask_output=True)
        features = grounding.image_features(volume_frames)
    assert len(frames) == 4 and len(per_frame) == len(memory) == 2
    for result, mode in [(r, "per_frame") for r in per_frame] + [(r, "memory") for r in memory]:
        assert result.mode == mode and result.masks.shape == (4, 64, 64) and result.masks.dtype == torch.float32
        assert result.object_scores.shape == result.iou_scores.shape == result.present.shape == (4,)
        assert result.present.dtype == torch.bool and isinstance(result.key_frame, int)
    for k in range(2):  # the key frame: where the per-frame object score is highest
        assert memory[k].key_frame == per_frame[k].key_frame == int(per_frame[k].object_scores.argmax())
    # per-frame prompting is the 2-D path on each frame: the same masks as GroundingEncoder.decode
    for t in range(4):
        decoded = grounding.decode(features.select(t), prompts, multimask_output=True, points=points)
        for k in range(2):
            if per_frame[k].present[t]:
                assert torch.equal(per_frame[k].masks[t], decoded.logits[k])
            else:
                assert (per_frame[k].masks[t] == NO_OBJECT_LOGIT).all()


def test_memory_propagation_uses_the_memory(sam, volume_frames):
    grounding, propagator = sam
    prompt = torch.randn(1, grounding.prompt_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        frames = encode_frames(grounding, volume_frames)
        # present everywhere; the highest score on frame 2 makes it the key frame
        order = [0, 1, 2, 3] + [3, 1, 0]  # per-frame pass, then tracked: forward from 2, then backward
        scores = [5.0 + (t == 2) for t in order]
        with ForcedScores(grounding.mask_decoder.pred_obj_score_head, scores):
            per_frame = propagator.propagate(frames, prompt, mode="per_frame", multimask_output=False)[0]
        with ForcedScores(grounding.mask_decoder.pred_obj_score_head, scores) as forced:
            memory = propagator.propagate(frames, prompt, mode="memory", multimask_output=False)[0]
        assert forced.calls == len(order)
        # a different memory gives different tracked masks, and the same key frame
        encoder = propagator.memory_encoder.projection.weight
        saved = encoder.clone()
        encoder.mul_(-1.0)
        try:
            with ForcedScores(grounding.mask_decoder.pred_obj_score_head, scores):
                other = propagator.propagate(frames, prompt, mode="memory", multimask_output=False)[0]
        finally:
            encoder.copy_(saved)
    assert per_frame.key_frame == memory.key_frame == 2
    assert torch.equal(memory.masks[2], per_frame.masks[2])
    for t in (0, 1, 3):
        assert (memory.masks[t] - per_frame.masks[t]).abs().max() > 1e-3, t
        assert (other.masks[t] - memory.masks[t]).abs().max() > 1e-3, t
    assert torch.equal(other.masks[2], memory.masks[2])


@pytest.mark.parametrize("mode", ["per_frame", "memory"])
def test_a_frame_with_a_negative_object_score_gets_no_mask(sam, volume_frames, mode):
    grounding, propagator = sam
    prompt = torch.randn(1, grounding.prompt_dim, generator=torch.Generator().manual_seed(3))
    frame_score = {0: 9.0, 1: 4.0, 2: -4.0, 3: 4.0}
    order = [0, 1, 2, 3] + ([1, 2, 3] if mode == "memory" else [])
    with torch.no_grad():
        frames = encode_frames(grounding, volume_frames[:4])
    with torch.no_grad(), ForcedScores(grounding.mask_decoder.pred_obj_score_head, [frame_score[t] for t in order]):
        result = propagator.propagate(frames, prompt, mode=mode)[0]
    assert result.key_frame == 0 and result.present.tolist() == [True, True, False, True]
    assert (result.masks[2] == NO_OBJECT_LOGIT).all() and not (result.masks[2] > 0).any()
    assert all((result.masks[t] != NO_OBJECT_LOGIT).any() for t in (0, 1, 3))
    # absent from every frame: nothing is tracked, no frame gets a mask
    with torch.no_grad(), ForcedScores(grounding.mask_decoder.pred_obj_score_head, [-1.0] * 4) as forced:
        absent = propagator.propagate(frames, prompt, mode=mode)[0]
    assert forced.calls == 4 and not absent.present.any() and (absent.masks == NO_OBJECT_LOGIT).all()


def test_memory_propagation_carries_gradients(sam, volume_frames):
    grounding, propagator = sam
    prompt = torch.randn(1, grounding.prompt_dim, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with torch.no_grad():  # the image encoder's gradient is the 2-D path's; here the memory's is checked
        frames = encode_frames(grounding, volume_frames[:3])
    with ForcedScores(grounding.mask_decoder.pred_obj_score_head, [2.0, 1.0, 1.0] + [1.0, 1.0]):
        result = propagator.propagate(frames, prompt, mode="memory")[0]
    result.masks[1:].sigmoid().mean().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert propagator.memory_attention.layers[0].cross_attn_image.k_proj.weight.grad.abs().sum() > 0
    assert propagator.memory_encoder.projection.weight.grad.abs().sum() > 0
    propagator.zero_grad(set_to_none=True)
    grounding.zero_grad(set_to_none=True)


def test_bad_requests_are_refused_with_the_reason(sam, volume_frames):
    grounding, propagator = sam
    with torch.no_grad():
        frames = encode_frames(grounding, volume_frames[:2])
    prompt = torch.zeros(1, grounding.prompt_dim)
    with pytest.raises(ValueError, match=r"unknown propagation mode 'both'; choose one of per_frame, memory"):
        propagator.propagate(frames, prompt, mode="both")
    with pytest.raises(ValueError, match=r"no frames to segment"):
        propagator.propagate([], prompt)
    with pytest.raises(ValueError, match=r"\[K, 64\] with K >= 1 .*got \(64,\)"):
        prompt_frames(grounding, frames, prompt[0])
    with pytest.raises(ValueError, match=r"\[K, 64\] with K >= 1 .*got \(1, 128\)"):
        propagator.propagate(frames, torch.zeros(1, 128))
    with pytest.raises(ValueError, match=r"points must be \[K, 2\] for 1 prompt\(s\), got \(2, 2\)"):
        prompt_frames(grounding, frames, prompt, points=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"frames must be \[N, 3, S, S\]"):
        encode_frames(grounding, volume_frames[0])
