"""Tensor names and shapes of Meta's original SAM 2 checkpoints, written out from the structure of Meta's
``sam2`` modules (``SAM2Base``: Hiera trunk + FPN neck, prompt encoder, mask decoder, memory attention and
encoder, object pointers), independently of the project's rename rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Shapes = dict[str, tuple[int, ...]]


@dataclass
class OriginalSam2:
    """The sizes of one original SAM 2 (defaults: Hiera-L, sam2_hiera_l.yaml)."""

    embed_dim: int = 144
    stages: tuple[int, ...] = (2, 6, 36, 4)
    mlp_ratio: float = 4.0
    window0: int = 8  # window_spec[0]: size of pos_embed_window
    background: tuple[int, int] = (7, 7)  # window_pos_embed_bkg_spatial_size
    d_model: int = 256  # FPN width = SAM prompt/decoder width
    decoder_layers: int = 2
    decoder_mlp: int = 2048
    iou_hidden: int = 256
    mask_in_chans: int = 16
    mem_dim: int = 64
    mem_layers: int = 4
    mem_ffn: int = 2048
    num_maskmem: int = 7
    version: str = "2.0"  # "2.1" adds obj_ptr_tpos_proj and no_obj_embed_spatial
    channel_list: list[int] = field(default_factory=list)

    def widths(self) -> list[int]:
        return [self.embed_dim * 2**k for k in range(len(self.stages))]


def _linear(out: Shapes, name: str, fan_in: int, fan_out: int) -> None:
    out[f"{name}.weight"] = (fan_out, fan_in)
    out[f"{name}.bias"] = (fan_out,)


def _norm(out: Shapes, name: str, dim: int) -> None:
    out[f"{name}.weight"] = (dim,)
    out[f"{name}.bias"] = (dim,)


def _conv(out: Shapes, name: str, c_in: int, c_out: int, k: int) -> None:
    out[f"{name}.weight"] = (c_out, c_in, k, k)
    out[f"{name}.bias"] = (c_out,)


def _attention(out: Shapes, name: str, dim: int, internal: int, kv_dim: int | None = None) -> None:
    kv_dim = kv_dim or dim
    _linear(out, f"{name}.q_proj", dim, internal)
    _linear(out, f"{name}.k_proj", kv_dim, internal)
    _linear(out, f"{name}.v_proj", kv_dim, internal)
    _linear(out, f"{name}.out_proj", internal, dim)


def _mlp(out: Shapes, name: str, sizes: list[int]) -> None:
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        _linear(out, f"{name}.layers.{k}", a, b)


def image_encoder(s: OriginalSam2) -> Shapes:
    """``image_encoder.trunk.*`` (Hiera) and ``image_encoder.neck.convs.N.conv.*`` (FpnNeck)."""
    out: Shapes = {}
    t = "image_encoder.trunk"
    out[f"{t}.pos_embed"] = (1, s.embed_dim, *s.background)
    out[f"{t}.pos_embed_window"] = (1, s.embed_dim, s.window0, s.window0)
    _conv(out, f"{t}.patch_embed.proj", 3, s.embed_dim, 7)
    stage_starts = {sum(s.stages[:k]) for k in range(1, len(s.stages))}
    dim = s.embed_dim
    for i in range(sum(s.stages)):
        dim_out = dim * 2 if i in stage_starts else dim
        b = f"{t}.blocks.{i}"
        _norm(out, f"{b}.norm1", dim)
        _linear(out, f"{b}.attn.qkv", dim, 3 * dim_out)
        _linear(out, f"{b}.attn.proj", dim_out, dim_out)
        _norm(out, f"{b}.norm2", dim_out)
        _mlp(out, f"{b}.mlp", [dim_out, int(dim_out * s.mlp_ratio), dim_out])
        if dim != dim_out:
            _linear(out, f"{b}.proj", dim, dim_out)
        dim = dim_out
    channels = s.channel_list or s.widths()[::-1]
    for k, c in enumerate(channels):
        _conv(out, f"image_encoder.neck.convs.{k}.conv", c, s.d_model, 1)
    return out


def prompt_encoder(s: OriginalSam2) -> Shapes:
    """``sam_prompt_encoder.*``."""
    out: Shapes = {}
    p = "sam_prompt_encoder"
    out[f"{p}.pe_layer.positional_encoding_gaussian_matrix"] = (2, s.d_model // 2)
    for k in range(4):
        out[f"{p}.point_embeddings.{k}.weight"] = (1, s.d_model)
    out[f"{p}.not_a_point_embed.weight"] = (1, s.d_model)
    c = s.mask_in_chans
    _conv(out, f"{p}.mask_downscaling.0", 1, c // 4, 2)
    _norm(out, f"{p}.mask_downscaling.1", c // 4)
    _conv(out, f"{p}.mask_downscaling.3", c // 4, c, 2)
    _norm(out, f"{p}.mask_downscaling.4", c)
    _conv(out, f"{p}.mask_downscaling.6", c, s.d_model, 1)
    out[f"{p}.no_mask_embed.weight"] = (1, s.d_model)
    return out


def mask_decoder(s: OriginalSam2) -> Shapes:
    """``sam_mask_decoder.*`` (two-way transformer, tokens, upscaling, heads)."""
    out: Shapes = {}
    m = "sam_mask_decoder"
    d = s.d_model
    for i in range(s.decoder_layers):
        layer = f"{m}.transformer.layers.{i}"
        _attention(out, f"{layer}.self_attn", d, d)
        _norm(out, f"{layer}.norm1", d)
        _attention(out, f"{layer}.cross_attn_token_to_image", d, d // 2)
        _norm(out, f"{layer}.norm2", d)
        _mlp(out, f"{layer}.mlp", [d, s.decoder_mlp, d])
        _norm(out, f"{layer}.norm3", d)
        _norm(out, f"{layer}.norm4", d)
        _attention(out, f"{layer}.cross_attn_image_to_token", d, d // 2)
    _attention(out, f"{m}.transformer.final_attn_token_to_image", d, d // 2)
    _norm(out, f"{m}.transformer.norm_final_attn", d)
    out[f"{m}.iou_token.weight"] = (1, d)
    out[f"{m}.mask_tokens.weight"] = (4, d)
    out[f"{m}.obj_score_token.weight"] = (1, d)
    # ConvTranspose2d weights are [in, out, k, k]
    out[f"{m}.output_upscaling.0.weight"] = (d, d // 4, 2, 2)
    out[f"{m}.output_upscaling.0.bias"] = (d // 4,)
    _norm(out, f"{m}.output_upscaling.1", d // 4)
    out[f"{m}.output_upscaling.3.weight"] = (d // 4, d // 8, 2, 2)
    out[f"{m}.output_upscaling.3.bias"] = (d // 8,)
    _conv(out, f"{m}.conv_s0", d, d // 8, 1)
    _conv(out, f"{m}.conv_s1", d, d // 4, 1)
    for k in range(4):
        _mlp(out, f"{m}.output_hypernetworks_mlps.{k}", [d, d, d, d // 8])
    _mlp(out, f"{m}.iou_prediction_head", [d, s.iou_hidden, s.iou_hidden, 4])
    _mlp(out, f"{m}.pred_obj_score_head", [d, d, d, 1])
    return out


def video_modules(s: OriginalSam2) -> Shapes:
    """The memory attention/encoder and object-pointer tensors (unused for single images)."""
    out: Shapes = {}
    d, mem = s.d_model, s.mem_dim
    for i in range(s.mem_layers):
        layer = f"memory_attention.layers.{i}"
        _attention(out, f"{layer}.self_attn", d, d)
        _attention(out, f"{layer}.cross_attn_image", d, d, kv_dim=mem)
        _linear(out, f"{layer}.linear1", d, s.mem_ffn)
        _linear(out, f"{layer}.linear2", s.mem_ffn, d)
        for n in (1, 2, 3):
            _norm(out, f"{layer}.norm{n}", d)
    _norm(out, "memory_attention.norm", d)
    channels = [1, 4, 16, 64, 256]
    for k in range(4):
        _conv(out, f"memory_encoder.mask_downsampler.encoder.{3 * k}", channels[k], channels[k + 1], 3)
        _norm(out, f"memory_encoder.mask_downsampler.encoder.{3 * k + 1}", channels[k + 1])
    _conv(out, "memory_encoder.mask_downsampler.encoder.12", 256, d, 1)
    _conv(out, "memory_encoder.pix_feat_proj", d, d, 1)
    for k in range(2):
        block = f"memory_encoder.fuser.layers.{k}"
        out[f"{block}.dwconv.weight"] = (d, 1, 7, 7)
        out[f"{block}.dwconv.bias"] = (d,)
        _norm(out, f"{block}.norm", d)
        _linear(out, f"{block}.pwconv1", d, 4 * d)
        _linear(out, f"{block}.pwconv2", 4 * d, d)
        out[f"{block}.gamma"] = (d,)
    _conv(out, "memory_encoder.out_proj", d, mem, 1)
    out["maskmem_tpos_enc"] = (s.num_maskmem, 1, 1, mem)
    out["no_mem_pos_enc"] = (1, 1, d)
    out["no_obj_ptr"] = (1, d)
    _conv(out, "mask_downsample", 1, 1, 4)
    _mlp(out, "obj_ptr_proj", [d, d, d, d])
    if s.version == "2.1":
        _linear(out, "obj_ptr_tpos_proj", d, mem)
        out["no_obj_embed_spatial"] = (1, mem)
    return out


def original_sam2_shapes(s: OriginalSam2) -> Shapes:
    """Every tensor of an original SAM 2 checkpoint (``{"model": ...}`` keys), with its shape."""
    out = image_encoder(s)
    out.update(prompt_encoder(s))
    out.update(mask_decoder(s))
    out["no_mem_embed"] = (1, 1, s.d_model)
    out.update(video_modules(s))
    return out


def tiny_original_sam2(version: str = "2.0") -> OriginalSam2:
    """The original-layout twin of ``citrus_v.recipes.presets.tiny_sam2_config`` (32-wide, 3 stages, 256 px)."""
    return OriginalSam2(
        embed_dim=32,
        stages=(1, 1, 2),
        mlp_ratio=2.0,
        window0=8,
        background=(7, 7),
        d_model=64,
        decoder_layers=2,
        decoder_mlp=256,
        iou_hidden=64,
        mem_dim=16,
        mem_layers=1,
        mem_ffn=32,
        version=version,
        channel_list=[128, 64, 32],
    )
