"""The released checkpoint layout and Meta's original SAM 2 weights, loaded unchanged.

The upstream-layout fixture is written from a hand-written list of Meta's SAM 2 names and shapes
(``tests/sam2_original_names.py``), not derived from the rename rules under test.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from citrus_v import CitrusV, CitrusVProcessor
from citrus_v.checkpoint_layout import CheckpointError, is_upstream_folder
from citrus_v.checkpoint_layout.sam2_variants import (
    VARIANTS,
    Sam2Variant,
    Sam2VariantError,
    resolve_variant,
    variant_from_name,
)
from citrus_v.cli import main
from citrus_v.modeling.grounding import GroundingEncoder
from citrus_v.modeling.sam2_names import IGNORED_MODULES, hf_to_meta, meta_to_hf
from citrus_v.modeling.seg_projector import ResidualSegProjector
from citrus_v.modeling.upstream_checkpoint import UNUSED_FILE, ShardedTensors
from citrus_v.processing.tokenizer_builder import build_tokenizer
from citrus_v.recipes.presets import TINY_PIXELS, tiny_mllm_config, tiny_sam2_config

from .conftest import seg_sample
from .sam2_original_names import OriginalSam2, original_sam2_shapes, tiny_original_sam2

PREFIX = "grounding_encoder.sam2_model."
# Design §7: the SAM 2.0 video/memory tensors of the release; SAM 2.1 adds the last two.
DOCUMENTED_IGNORED_20 = {
    "obj_ptr_proj",
    "no_obj_ptr",
    "memory_attention",
    "memory_encoder",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "mask_downsample",
}
DOCUMENTED_IGNORED_21 = DOCUMENTED_IGNORED_20 | {"no_obj_embed_spatial", "obj_ptr_tpos_proj"}
TEST_VARIANT = Sam2Variant("sam2_hiera_test", tiny_sam2_config, embed_dim=32, num_blocks=4)

# Placement of the renamed tensors, written out by hand (Meta name -> transformers name).
EXPECTED_PLACES = {
    "image_encoder.trunk.pos_embed": "vision_encoder.backbone.pos_embed",
    "image_encoder.trunk.pos_embed_window": "vision_encoder.backbone.pos_embed_window",
    "image_encoder.trunk.patch_embed.proj.weight": "vision_encoder.backbone.patch_embed.projection.weight",
    "image_encoder.trunk.blocks.0.norm1.weight": "vision_encoder.backbone.blocks.0.layer_norm1.weight",
    "image_encoder.trunk.blocks.3.attn.qkv.weight": "vision_encoder.backbone.blocks.3.attn.qkv.weight",
    "image_encoder.trunk.blocks.2.attn.proj.bias": "vision_encoder.backbone.blocks.2.attn.proj.bias",
    "image_encoder.trunk.blocks.1.proj.weight": "vision_encoder.backbone.blocks.1.proj.weight",
    "image_encoder.trunk.blocks.2.mlp.layers.0.weight": "vision_encoder.backbone.blocks.2.mlp.proj_in.weight",
    "image_encoder.trunk.blocks.2.mlp.layers.1.bias": "vision_encoder.backbone.blocks.2.mlp.proj_out.bias",
    "image_encoder.neck.convs.0.conv.weight": "vision_encoder.neck.convs.0.weight",
    "image_encoder.neck.convs.2.conv.bias": "vision_encoder.neck.convs.2.bias",
    "sam_prompt_encoder.not_a_point_embed.weight": "prompt_encoder.not_a_point_embed.weight",
    "sam_prompt_encoder.no_mask_embed.weight": "prompt_encoder.no_mask_embed.weight",
    "sam_prompt_encoder.mask_downscaling.0.weight": "prompt_encoder.mask_embed.conv1.weight",
    "sam_prompt_encoder.mask_downscaling.1.weight": "prompt_encoder.mask_embed.layer_norm1.weight",
    "sam_prompt_encoder.mask_downscaling.3.weight": "prompt_encoder.mask_embed.conv2.weight",
    "sam_prompt_encoder.mask_downscaling.4.bias": "prompt_encoder.mask_embed.layer_norm2.bias",
    "sam_prompt_encoder.mask_downscaling.6.weight": "prompt_encoder.mask_embed.conv3.weight",
    "sam_mask_decoder.transformer.layers.1.self_attn.out_proj.weight": (
        "mask_decoder.transformer.layers.1.self_attn.o_proj.weight"
    ),
    "sam_mask_decoder.transformer.layers.0.cross_attn_image_to_token.k_proj.bias": (
        "mask_decoder.transformer.layers.0.cross_attn_image_to_token.k_proj.bias"
    ),
    "sam_mask_decoder.transformer.layers.1.norm4.weight": "mask_decoder.transformer.layers.1.layer_norm4.weight",
    "sam_mask_decoder.transformer.layers.0.mlp.layers.1.weight": (
        "mask_decoder.transformer.layers.0.mlp.proj_out.weight"
    ),
    "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.bias": (
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.bias"
    ),
    "sam_mask_decoder.transformer.norm_final_attn.weight": "mask_decoder.transformer.layer_norm_final_attn.weight",
    "sam_mask_decoder.iou_token.weight": "mask_decoder.iou_token.weight",
    "sam_mask_decoder.mask_tokens.weight": "mask_decoder.mask_tokens.weight",
    "sam_mask_decoder.obj_score_token.weight": "mask_decoder.obj_score_token.weight",
    "sam_mask_decoder.output_upscaling.0.weight": "mask_decoder.upscale_conv1.weight",
    "sam_mask_decoder.output_upscaling.1.bias": "mask_decoder.upscale_layer_norm.bias",
    "sam_mask_decoder.output_upscaling.3.weight": "mask_decoder.upscale_conv2.weight",
    "sam_mask_decoder.conv_s0.weight": "mask_decoder.conv_s0.weight",
    "sam_mask_decoder.conv_s1.bias": "mask_decoder.conv_s1.bias",
    "sam_mask_decoder.output_hypernetworks_mlps.3.layers.0.weight": (
        "mask_decoder.output_hypernetworks_mlps.3.proj_in.weight"
    ),
    "sam_mask_decoder.output_hypernetworks_mlps.1.layers.1.weight": (
        "mask_decoder.output_hypernetworks_mlps.1.layers.0.weight"
    ),
    "sam_mask_decoder.output_hypernetworks_mlps.0.layers.2.bias": (
        "mask_decoder.output_hypernetworks_mlps.0.proj_out.bias"
    ),
    "sam_mask_decoder.iou_prediction_head.layers.1.weight": "mask_decoder.iou_prediction_head.layers.0.weight",
    "sam_mask_decoder.pred_obj_score_head.layers.2.weight": "mask_decoder.pred_obj_score_head.proj_out.weight",
    "no_mem_embed": "no_memory_embedding",
}


@pytest.fixture(scope="module", autouse=True)
def test_variant():
    """Register the tiny SAM 2 as a named architecture, as a real release name would be."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(VARIANTS, TEST_VARIANT.name, TEST_VARIANT)
        yield


def _random(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=generator) * 0.1).to(dtype) for name, shape in shapes.items()}


def write_upstream_folder(root: Path, version: str = "2.0", residual: bool = False) -> dict[str, torch.Tensor]:
    """A random-weight Citrus-V folder in the released layout (bf16, two shards with an index); returns its tensors."""
    dtype = torch.bfloat16
    sized_tokenizer = build_tokenizer()  # room for [SEG], <bbox>, </bbox> in the embedding
    tokenizer = build_tokenizer(citrus_tokens=False)  # upstream's files lack them
    qwen_config = tiny_mllm_config(sized_tokenizer)
    torch.manual_seed(3)
    mllm = Qwen2_5_VLForConditionalGeneration(qwen_config)
    language = {f"mllm.{name}": t.detach().to(dtype).clone() for name, t in mllm.state_dict().items()}
    hidden, prompt = 128, 64
    if residual:
        projector_shapes = {
            "seg_projector.linear1.weight": (hidden, hidden),
            "seg_projector.linear1.bias": (hidden,),
            "seg_projector.linear2.weight": (prompt, hidden),
            "seg_projector.linear2.bias": (prompt,),
            "seg_projector.residual_mapping.weight": (prompt, hidden),
            "seg_projector.residual_mapping.bias": (prompt,),
        }
    else:
        projector_shapes = {
            "seg_projector.0.weight": (hidden, hidden),
            "seg_projector.0.bias": (hidden,),
            "seg_projector.2.weight": (prompt, hidden),
            "seg_projector.2.bias": (prompt,),
        }
    sam_shapes = {PREFIX + name: shape for name, shape in original_sam2_shapes(tiny_original_sam2(version)).items()}
    rest = _random({**sam_shapes, **projector_shapes}, seed=5, dtype=dtype)

    root.mkdir(parents=True, exist_ok=True)
    shards = {"model-00001-of-00002.safetensors": language, "model-00002-of-00002.safetensors": rest}
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, root / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    text = qwen_config.text_config
    config = {
        "architectures": ["CitrusV"],
        "model_type": "citrus_v",
        "hidden_size": hidden,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": text.rms_norm_eps,
        "hidden_act": "silu",
        "rope_theta": 10.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "attention_dropout": 0.0,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": 4,
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_heads": 4,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [3],
            "hidden_act": "silu",
            "in_chans": 3,
        },
        "image_token_id": qwen_config.image_token_id,
        "video_token_id": qwen_config.video_token_id,
        "vision_start_token_id": qwen_config.vision_start_token_id,
        "vision_end_token_id": qwen_config.vision_end_token_id,
        "seg_token_idx": len(tokenizer),  # the first id after the built-in tokens
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.4",
        "grounding_encoder_config": {
            "apply_postprocessing": True,
            "cfg_path": "/mnt/workspace/sam2/sam2/configs/sam2/sam2_hiera_test.yaml",
            "torch_dtype": "bfloat16",
        },
        "frozen_sam2_decoder": False,
        "loss_mask_config": {"use_sigmoid": True, "reduction": "mean", "loss_weight": 2.0},
        "loss_dice_config": {"use_sigmoid": True, "activate": True, "naive_dice": True, "eps": 1.0, "loss_weight": 1.0},
    }
    if residual:
        config["use_res_seg_projector"] = True
    (root / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(root)
    Qwen2VLImageProcessorPil(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS).save_pretrained(root)
    return {**language, **rest}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name == UNUSED_FILE:
            continue
        with safe_open(shard, framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def rewrite(folder: Path, change) -> None:
    """Apply ``change(tensors)`` to every shard of ``folder`` and rewrite the index."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        change(tensors)
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream") / "Citrus-V-tiny"
    tensors = write_upstream_folder(root)
    return root, tensors


@pytest.fixture(scope="module")
def loaded(upstream):
    root, _ = upstream
    return CitrusV.from_pretrained(root)


# --- rename rules on the real architectures ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "original"),
    [
        ("sam2_hiera_t", OriginalSam2(embed_dim=96, stages=(1, 2, 7, 2))),
        ("sam2_hiera_s", OriginalSam2(embed_dim=96, stages=(1, 2, 11, 2))),
        ("sam2_hiera_b+", OriginalSam2(embed_dim=112, stages=(2, 3, 16, 3), background=(14, 14))),
        ("sam2_hiera_l", OriginalSam2()),
        ("sam2_hiera_l", OriginalSam2(version="2.1")),
    ],
)
def test_original_names_fill_each_released_architecture_exactly(variant, original):
    shapes = original_sam2_shapes(original)
    renamed, ignored = meta_to_hf({name: torch.empty(shape, device="meta") for name, shape in shapes.items()})
    with torch.device("meta"):
        encoder = GroundingEncoder(VARIANTS[variant].config())
    expected = {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in renamed.items()} == expected
    documented = DOCUMENTED_IGNORED_21 if original.version == "2.1" else DOCUMENTED_IGNORED_20
    assert {name.split(".")[0] for name in ignored} == documented
    assert set(IGNORED_MODULES) == DOCUMENTED_IGNORED_21
    # transformers' Sam2Model has none of the ignored modules
    assert not any(name.split(".")[0] in documented for name in expected)
    # shapes alone identify the architecture
    assert resolve_variant([], shapes, "test").name == variant
    if variant == "sam2_hiera_l" and original.version == "2.0":
        # the release's counts (design §7): 900 SAM 2 tensors, 594 image encoder, 157 set aside
        assert len(shapes) == 900 and len(ignored) == 157
        assert sum(name.startswith("image_encoder.") for name in shapes) == 594


def test_rules_invert_exactly():
    shapes = original_sam2_shapes(tiny_original_sam2())
    tensors = _random(shapes, seed=1, dtype=torch.float32)
    renamed, ignored = meta_to_hf(tensors)
    back = hf_to_meta(renamed)
    assert set(back) | set(ignored) == set(tensors)
    assert all(torch.equal(back[name], tensors[name]) for name in back)


def test_variant_names_and_conflicts():
    assert variant_from_name("/abs/path/sam2/configs/sam2_hiera_l.yaml").name == "sam2_hiera_l"
    assert variant_from_name("sam2.1_hiera_large.pt").name == "sam2_hiera_l"
    assert variant_from_name("configs/sam2.1/sam2.1_hiera_b+.yaml").name == "sam2_hiera_b+"
    assert variant_from_name("sam2_hiera_base_plus.pt").name == "sam2_hiera_b+"
    assert variant_from_name("sam2_hiera_small.pt").name == "sam2_hiera_s"
    assert variant_from_name("sam2.1_hiera_tiny.pt").name == "sam2_hiera_t"
    assert variant_from_name("weights.pt") is None
    large = original_sam2_shapes(OriginalSam2())
    with pytest.raises(Sam2VariantError, match=r"sam2_hiera_t\.pt.*sam2_hiera_t.*trunk width 144 and 48 blocks"):
        resolve_variant(["sam2_hiera_t.pt"], large, "sam2_hiera_t.pt")


# --- the upstream folder ------------------------------------------------------------------------------------------
def test_upstream_folder_is_recognised(upstream, tiny_dir):
    root, _ = upstream
    assert is_upstream_folder(root)
    assert not is_upstream_folder(tiny_dir)


def test_every_tensor_arrives_in_its_place(upstream, loaded):
    root, tensors = upstream
    state = loaded.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point())  # as stored
    for name, tensor in tensors.items():
        if name.startswith(("mllm.", "seg_projector.")):
            assert torch.equal(state[name], tensor), name

    sam_in = {name[len(PREFIX) :]: t for name, t in tensors.items() if name.startswith(PREFIX)}
    sam_out = {
        name[len("grounding_encoder.") :]: t for name, t in state.items() if name.startswith("grounding_encoder.")
    }
    # hand-written placements
    for original, ours in EXPECTED_PLACES.items():
        assert torch.equal(sam_out[ours], sam_in[original]), original
    for k in range(4):
        assert torch.equal(
            sam_out["prompt_encoder.point_embed.weight"][k],
            sam_in[f"sam_prompt_encoder.point_embeddings.{k}.weight"][0],
        )
    gaussian = sam_in["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(sam_out["prompt_encoder.shared_embedding.positional_embedding"], gaussian)
    assert torch.equal(sam_out["shared_image_embedding.positional_embedding"], gaussian)

    # every other used tensor lands in exactly one place, and every place is filled (values are all distinct)
    special = {"prompt_encoder.point_embed.weight", "shared_image_embedding.positional_embedding"}
    by_value = {}
    for name, t in sam_out.items():
        if name not in special:
            by_value.setdefault((tuple(t.shape), t.float().sum().item(), t.flatten()[0].item()), []).append(name)
    used = {n: t for n, t in sam_in.items() if n.split(".")[0] not in IGNORED_MODULES and ".point_embeddings." not in n}
    targets = []
    for name, t in used.items():
        found = by_value.get((tuple(t.shape), t.float().sum().item(), t.flatten()[0].item()), [])
        assert len(found) == 1 and torch.equal(sam_out[found[0]], t), name
        targets.append(found[0])
    assert sorted(targets) == sorted(n for n in sam_out if n not in special)

    # the set-aside tensors are exactly the documented video/memory ones, unchanged
    unused = loaded.upstream_unused_tensors
    assert {name[len(PREFIX) :].split(".")[0] for name in unused} == DOCUMENTED_IGNORED_20
    assert set(unused) == {PREFIX + n for n in sam_in if n.split(".")[0] in DOCUMENTED_IGNORED_20}
    assert all(torch.equal(unused[n], tensors[n]) for n in unused)


def test_forward_with_seg_gives_a_mask(upstream, caplog):
    root, _ = upstream
    model = CitrusV.from_pretrained(root, dtype=torch.float32).eval()
    assert model.mllm.lm_head.weight.dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="citrus_v.processing.processor"):
        processor = CitrusVProcessor.from_pretrained(root)
        CitrusVProcessor.from_pretrained(root)
    notes = [r.message for r in caplog.records if "lack [SEG], <bbox>, </bbox>" in r.message]
    assert len(notes) == 2  # said at each load: no process-wide memory of what was said
    assert processor.seg_token_id == model.config.seg_token_idx
    assert (processor.sam_image_size, processor.mask_size) == (256, 64)
    with torch.no_grad():
        out = model(**processor(seg_sample(1), return_labels=False))
    assert out.pred_masks[0].shape == (1, 64, 64)
    assert torch.isfinite(out.pred_masks[0]).all() and torch.isfinite(out.logits).all()


def test_round_trip_upstream_ours_upstream_is_bit_identical(upstream, loaded, tmp_path):
    root, tensors = upstream
    ours = tmp_path / "ours"
    loaded.save_pretrained(ours)
    CitrusVProcessor.from_pretrained(root).save_pretrained(ours)
    assert (ours / UNUSED_FILE).is_file()
    assert not any(name.startswith(PREFIX) for name in read_folder(ours))  # our layout
    back = tmp_path / "back"
    assert (
        main(["convert", "--to", "upstream", "--model", str(ours), "--out", str(back), "--max_shard_size", "200KB"])
        == 0
    )
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    written = read_folder(back)
    assert set(written) == set(tensors)
    for name, tensor in tensors.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    config = json.loads((back / "config.json").read_text())
    original = json.loads((root / "config.json").read_text())
    for key in ("architectures", "model_type", "seg_token_idx", "image_token_id", "hidden_size", "rope_theta"):
        assert config[key] == original[key], key
    assert config["rope_scaling"] == original["rope_scaling"]
    assert config["grounding_encoder_config"] == original["grounding_encoder_config"]
    assert config["torch_dtype"] == "bfloat16" and "text_config" not in config
    assert (back / "tokenizer.json").is_file()
    # and the written folder loads again, equal to the first load
    again = CitrusV.from_pretrained(back)
    first = loaded.state_dict()
    assert all(torch.equal(t, first[n]) for n, t in again.state_dict().items())


def test_convert_to_citrus_cli(upstream, tmp_path):
    root, _ = upstream
    out = tmp_path / "citrus"
    assert main(["convert", "--to", "citrus", "--model", str(root), "--out", str(out), "--torch_dtype", "float32"]) == 0
    model = CitrusV.from_pretrained(out)
    assert model.mllm.lm_head.weight.dtype == torch.float32
    assert CitrusVProcessor.from_pretrained(out).seg_token_id == model.config.seg_token_idx
    assert main(["convert", "--to", "upstream", "--model", str(root), "--out", str(tmp_path / "x")]) == 1


def test_renamed_missing_and_foreign_tensors_fail_with_their_names(upstream, tmp_path):
    root, _ = upstream

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(root, folder)
        rewrite(folder, change)
        return folder

    def rename(tensors):
        key = PREFIX + "sam_mask_decoder.conv_s0.weight"
        if key in tensors:
            tensors[PREFIX + "sam_mask_decoder.conv_s9.weight"] = tensors.pop(key)

    with pytest.raises(CheckpointError, match=r"sam_mask_decoder\.conv_s9\.weight"):
        CitrusV.from_pretrained(broken("renamed", rename))

    def drop(tensors):
        tensors.pop(PREFIX + "sam_prompt_encoder.not_a_point_embed.weight", None)
        tensors.pop("mllm.lm_head.weight", None)

    with pytest.raises(CheckpointError, match=r"missing from the weights \(2\): .*mllm\.lm_head\.weight") as err:
        CitrusV.from_pretrained(broken("missing", drop))
    assert PREFIX + "sam_prompt_encoder.not_a_point_embed.weight" in str(err.value)

    def foreign(tensors):
        if "seg_projector.0.bias" in tensors:
            tensors["extra_head.weight"] = torch.zeros(2)

    with pytest.raises(CheckpointError, match=r"extra_head\.weight"):
        CitrusV.from_pretrained(broken("foreign", foreign))

    def reshape(tensors):
        key = PREFIX + "sam_mask_decoder.iou_token.weight"
        if key in tensors:
            tensors[key] = torch.zeros(1, 32, dtype=torch.bfloat16)

    with pytest.raises(CheckpointError, match=r"sam_mask_decoder\.iou_token\.weight has shape \[1, 32\]"):
        CitrusV.from_pretrained(broken("reshaped", reshape))


def test_names_and_shapes_are_checked_before_any_tensor_is_read(upstream, tmp_path, monkeypatch):
    root, _ = upstream
    folder = tmp_path / "m"
    shutil.copytree(root, folder)
    rewrite(folder, lambda tensors: tensors.pop(PREFIX + "no_mem_embed", None))

    def no_reading(self, name):
        raise AssertionError(f"read {name} before the check")

    monkeypatch.setattr(ShardedTensors, "__getitem__", no_reading)
    with pytest.raises(
        CheckpointError, match=r"missing from the weights \(1\): grounding_encoder\.sam2_model\.no_mem_embed"
    ):
        CitrusV.from_pretrained(folder)


def test_residual_projector_variant(tmp_path):
    root = tmp_path / "residual"
    tensors = write_upstream_folder(root, residual=True)
    model = CitrusV.from_pretrained(root, dtype=torch.float32).eval()
    assert isinstance(model.seg_projector, ResidualSegProjector)
    assert torch.equal(
        model.seg_projector.residual_mapping.weight, tensors["seg_projector.residual_mapping.weight"].float()
    )
    hidden = torch.randn(3, 128)
    expected = model.seg_projector.linear2(torch.relu(model.seg_projector.linear1(hidden)))
    expected = expected + model.seg_projector.residual_mapping(hidden)
    torch.testing.assert_close(model.seg_projector(hidden), expected)
    processor = CitrusVProcessor.from_pretrained(root)
    with torch.no_grad():
        assert model(**processor(seg_sample(1), return_labels=False)).pred_masks[0].shape == (1, 64, 64)
    ours, back = tmp_path / "ours", tmp_path / "back"
    CitrusV.from_pretrained(root).save_pretrained(ours)
    processor.save_pretrained(ours)
    assert main(["convert", "--to", "upstream", "--model", str(ours), "--out", str(back)]) == 0
    written = read_folder(back)
    assert set(written) == set(tensors)
    assert all(torch.equal(written[n], t) for n, t in tensors.items())
    assert json.loads((back / "config.json").read_text())["use_res_seg_projector"] is True


def test_our_tiny_model_to_upstream_and_back(tiny, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(VARIANTS, TEST_VARIANT.name)  # here the tiny SAM 2 is no named architecture
    model, processor = tiny
    out = tmp_path / "up"
    assert main(["convert", "--to", "upstream", "--model", str(tiny_dir), "--out", str(tiny_dir)]) == 1
    assert "is the model folder itself" in capsys.readouterr().err
    # the upstream layout has room for one positional matrix: a model whose two differ is refused
    untied = copy.deepcopy(model)
    with torch.no_grad():
        untied.grounding_encoder.shared_image_embedding.positional_embedding.add_(1.0)
    untied.save_pretrained(tmp_path / "untied")
    processor.save_pretrained(tmp_path / "untied")
    assert main(["convert", "--to", "upstream", "--model", str(tmp_path / "untied"), "--out", str(out)]) == 1
    assert "positional_embedding differ" in capsys.readouterr().err
    # the tiny preset ties them, as the original SAM 2 does, so it converts as built
    assert main(["convert", "--to", "upstream", "--model", str(tiny_dir), "--out", str(out)]) == 0
    # the tiny SAM 2 is none of Meta's architectures: its configuration travels in the config
    assert "sam2_config" in json.loads((out / "config.json").read_text())["grounding_encoder_config"]
    loaded = CitrusV.from_pretrained(out).eval()
    batch = processor(seg_sample(2, seed=3))
    with torch.no_grad():
        a, b = model.eval()(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits)
    for x, y in zip(a.pred_masks, b.pred_masks, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_legacy_qwen_names_in_our_layout_load(tiny, tiny_dir, tmp_path):
    model, _ = tiny
    folder = tmp_path / "legacy"
    shutil.copytree(tiny_dir, folder)
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    legacy = {
        n.replace("mllm.model.language_model.", "mllm.model.").replace("mllm.model.visual.", "mllm.visual."): t
        for n, t in tensors.items()
    }
    assert "mllm.model.layers.0.self_attn.q_proj.weight" in legacy and "mllm.visual.merger.ln_q.weight" in legacy
    save_file(legacy, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = CitrusV.from_pretrained(folder)
    original = model.state_dict()
    assert all(torch.equal(t, original[n]) for n, t in loaded.state_dict().items())


# --- Meta's original .pt -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    tokenizer = build_tokenizer(citrus_tokens=False)
    torch.manual_seed(2)
    Qwen2_5_VLForConditionalGeneration(tiny_mllm_config(build_tokenizer())).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.mark.parametrize(("version", "file_name"), [("2.0", "sam2_hiera_test.pt"), ("2.1", "weights.pt")])
def test_build_from_original_sam2_pt(qwen_dir, tmp_path, version, file_name):
    shapes = original_sam2_shapes(tiny_original_sam2(version))
    state = _random(shapes, seed=7, dtype=torch.float32)
    pt = tmp_path / file_name  # "weights.pt": the architecture comes from the shapes
    torch.save({"model": state}, pt)
    out = tmp_path / "built"
    assert main(["build", "--mllm", str(qwen_dir), "--sam2", str(pt), "--out", str(out)]) == 0
    model = CitrusV.from_pretrained(out)
    sam = {
        n[len("grounding_encoder.") :]: t for n, t in model.state_dict().items() if n.startswith("grounding_encoder.")
    }
    assert sam["vision_encoder.backbone.pos_embed"].dtype == torch.float32
    for original, ours in EXPECTED_PLACES.items():
        assert torch.equal(sam[ours], state[original]), original
    for k in range(4):
        assert torch.equal(
            sam["prompt_encoder.point_embed.weight"][k], state[f"sam_prompt_encoder.point_embeddings.{k}.weight"][0]
        )
    documented = DOCUMENTED_IGNORED_21 if version == "2.1" else DOCUMENTED_IGNORED_20
    unused = model.upstream_unused_tensors
    assert {n[len(PREFIX) :].split(".")[0] for n in unused} == documented
    assert all(torch.equal(t, state[n[len(PREFIX) :]]) for n, t in unused.items())
    processor = CitrusVProcessor.from_pretrained(out)
    with torch.no_grad():
        assert model(**processor(seg_sample(1), return_labels=False)).pred_masks[0].shape == (1, 64, 64)
    # exported, the SAM 2 part is Meta's checkpoint again, video tensors included
    up = tmp_path / "up"
    assert main(["convert", "--to", "upstream", "--model", str(out), "--out", str(up)]) == 0
    written = read_folder(up)
    assert {n[len(PREFIX) :] for n in written if n.startswith(PREFIX)} == set(state)
    assert all(torch.equal(written[PREFIX + n], t) for n, t in state.items())


def test_original_pt_errors(qwen_dir, tmp_path, capsys):
    unknown = original_sam2_shapes(OriginalSam2(embed_dim=48, stages=(1, 1, 1, 1), d_model=32, decoder_mlp=64))
    pt = tmp_path / "custom.pt"
    torch.save({"model": _random(unknown, seed=0, dtype=torch.float32)}, pt)
    assert main(["build", "--mllm", str(qwen_dir), "--sam2", str(pt), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "custom.pt: cannot tell which SAM 2 architecture" in err and "sam2_hiera_l" in err
    bad = tmp_path / "sam2_hiera_l.pt"
    torch.save({"state": {}}, bad)
    assert main(["build", "--mllm", str(qwen_dir), "--sam2", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "expected Meta's SAM 2 layout" in capsys.readouterr().err
    text = tmp_path / "sam2.txt"
    text.write_text("x")
    assert main(["build", "--mllm", str(qwen_dir), "--sam2", str(text), "--out", str(tmp_path / "o")]) == 1
    assert "not a .pt checkpoint" in capsys.readouterr().err
