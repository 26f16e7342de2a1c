"""Packed multi-image forward of diffusers' `CosmosTransformer3DModel` (Cosmos-Predict2.5).

DuetGen draws each image with a video DiT whose earlier frames are the conversation's earlier images
(clean conditioning frames) and whose last frame is the noisy target (paper section 4.1, "Condition
input"). Images differ in size, and training packs many conversations into one sequence ("Packed
sequence training"). The stock diffusers forward takes one (B, C, T, H, W) tensor: one size, one
frame count. This module runs the SAME pretrained modules over a packed token sequence instead.

Design choices:
- No new architecture, no copied weights: `PackedCosmosDiT` holds the stock model's own submodules
  (patch_embed, time_embed, learnable_pos_embed, transformer_blocks, norm_out, proj_out, rope) and
  only rewrites the forward. Its parameter names equal diffusers' (`transformer_blocks.0.attn1.to_q.weight`,
  ...), so `PackedCosmosDiT.state_dict()` is the diffusers state dict minus `crossattn_proj` (the
  connector's job, see `connector.py`), and the wrapped model still saves with `save_pretrained`
  and loads in plain `CosmosTransformer3DModel.from_pretrained`.
- Each block runs as a `PackedCosmosBlock` module holding that block's norm/attention/FFN modules.
  A block is therefore a module whose forward actually runs, which is what per-block FSDP2
  `fully_shard`, activation-checkpoint wrappers and `torch.compile` need (torchtitan applies them
  per block). The stock model object is kept but NOT registered as a submodule, so every parameter
  is registered exactly once; `.to()` on this wrapper does not move the unused `crossattn_proj`.
- Each frame is patchified at its own size, with the two extra input channels the stock model
  concatenates: the condition mask (1 on clean conditioning frames, as
  `Cosmos2_5_PredictBasePipeline.create_condition_mask` fills it) and the padding mask. Nothing is
  ever padded in a pack, so the padding-mask channel is zero, exactly what the pipelines feed
  (`padding_mask = zeros(1, 1, H, W)`, resized to the latent size -> zeros).
- 3D RoPE from explicit per-token positions (t = frame index within its sample, h/w = row/column in
  that frame's own patch grid), with the model's NTK rope scaling and optional fps scaling of t.
  For one sample of equal-size frames the positions are exactly the stock grid, so the rope equals
  `CosmosRotaryPosEmbed.forward` bit for bit (tested). Positions past the model's `max_size` raise.
- Per-frame timesteps (flow time t in [0, 1]; the network never sees the noise schedule) enter AdaLN
  per frame: the AdaLN-LoRA MLPs run once per FRAME and the resulting shift/scale/gate are gathered
  to tokens. The stock forward runs them once per TOKEN (the ~25% per-step cost the ShapeWorld
  calibration measured); the result is identical.
- Block-diagonal attention: a sample's tokens see only its own tokens (self-attention) and only its
  own text (cross-attention). Default `attention="split"`: q/k/v projections run once on the whole
  pack, then SDPA runs per sample on contiguous slices, costing sum_i n_i^2 instead of N^2 and
  needing no mask memory and no text padding. `attention="mask"` builds dense boolean
  block-diagonal masks for one SDPA call (fewer kernel launches; memory N^2). Both go through
  diffusers' `dispatch_attention_fn`, so a diffusers attention backend selection applies.
  `benchmarks/dit_packing.py` measures both; numbers in docs/model-dit.md.
- Everything that depends only on frame sizes (token offsets, positions, rope, masks) is a
  `PackPlan`, computed once by `plan()` and reused by `forward_planned()` at every sampler step;
  `forward()` keeps the plans of the last few frame layouts (`PLAN_CACHE_SIZE`), so a sampler that
  calls it with the same shapes every step plans once.
- A sample's text is the same at every sampler step of an image: `project_text()` turns it into every
  block's cross-attention keys and values once (`ProjectedText`), and `forward` takes that in place
  of the text tensor. On the shipped ShapeWorld model the text (36-106 tokens) is longer than the
  image tokens (9-36), so its projections were about a quarter of a step's matmul work.
  `targets_only=True` returns the target frames only. Conditioning tokens still run through every
  block but the last (the target attends to them in every layer); in the last block they give only
  their keys and values (`QueryRows`): their queries, attention outputs, cross-attention and
  feed-forward there, and the output layer, would never be read.
- Only image-style conditioning is supported: no controlnet residuals and no image-context
  (Transfer2.5) models; they raise at construction. Patch size in time must be 1 (one image = one
  latent frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import CosmosTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

ATTENTION_MODES = ("split", "mask")
PLAN_CACHE_SIZE = 16  # frame layouts whose PackPlan forward() keeps (a sampler repeats one layout every step)


# ----------------------------------------------------------------------------- configs


def tiny_cosmos_config(**overrides) -> dict:
    """Kwargs for a tiny random `CosmosTransformer3DModel` with the Cosmos-Predict2.5 layout (unit tests).

    2 layers, 2 heads x 16, 16 latent channels (+1 condition-mask channel), patch (1, 2, 2),
    Cosmos-Predict2.5's rope scaling, and a `crossattn_proj` from 48 "MLLM" channels to the
    32-wide cross-attention. Override any field: `tiny_cosmos_config(extra_pos_embed_type="learnable")`.
    """
    config = dict(
        in_channels=16 + 1,  # latent channels + the condition-mask channel (Cosmos-Predict2.5 layout)
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,  # rope splits it t/h/w = 8/4/4
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=32,  # cross-attention width = connector output width
        adaln_lora_dim=16,
        max_size=(128, 240, 240),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),  # Cosmos-Predict2.5 value
        concat_padding_mask=True,
        extra_pos_embed_type=None,  # Cosmos-Predict2.5 has none
        use_crossattn_projection=True,
        crossattn_proj_in_channels=48,  # stands for n_layers x width of the MLLM
        encoder_hidden_states_channels=32,
    )
    config.update(overrides)
    return config


def toy_cosmos_config(latent_channels: int = 48, crossattn_in_channels: int = 512, **overrides) -> dict:
    """Kwargs for the ShapeWorld DiT that trains on 2 CPU cores (about 1.7M parameters).

    Sized from notes/shapeworld-calibration.md: after the pixel-shuffle autoencoder (f = 4, 48 latent
    channels, 16x16 latents for a 64x64 canvas) 4x4 patches give 16 tokens per frame, and 4 layers x
    128 wide trained well; fewer tokens and layers won because steps per second bound progress.
    `crossattn_in_channels` is the toy MLLM's n_layers x width (the connector maps it to 128).
    Unlike Cosmos-Predict2.5 it has learnable absolute positions (Cosmos-1's, diffusers' default):
    rope is relative, so on a blank canvas every token computes the same thing and a text-only
    drawing ("at the top left") has nowhere to go (tests/test_toy_training_choices.py).
    """
    config = dict(
        in_channels=latent_channels + 1,  # + condition-mask channel
        out_channels=latent_channels,
        num_attention_heads=2,
        attention_head_dim=64,  # 128 wide; rope splits it t/h/w = 24/20/20
        num_layers=4,
        mlp_ratio=4.0,
        text_embed_dim=128,
        adaln_lora_dim=64,  # AdaLN-LoRA runs per frame here, so it costs little either way
        max_size=(128, 240, 240),
        patch_size=(1, 4, 4),  # 16 tokens per 64x64 canvas (calibration: 4x4 beat 2x2 on CPU)
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True,
        extra_pos_embed_type="learnable",  # absolute positions: with rope alone a blank canvas is symmetric (docs/training.md)
        use_crossattn_projection=True,
        crossattn_proj_in_channels=crossattn_in_channels,
        encoder_hidden_states_channels=128,
    )
    config.update(overrides)
    return config


def init_learnable_positions(transformer) -> None:
    """Random tables for a DiT with learnable absolute positions (the toy DiT; Cosmos-Predict2.5 has none).

    diffusers creates them as zeros, and `CosmosLearnablePositionalEmbed` divides by their norm: at
    zero every token gets the same (zero) embedding and the gradient of x / (eps + |x|) is 1/eps.
    Their scale does not matter (the embedding is RMS-normalised), so N(0, 1).
    """
    pe = getattr(transformer, "learnable_pos_embed", None)
    if pe is None or pe.pos_emb_t.device.type == "meta":
        return
    with torch.no_grad():
        for table in (pe.pos_emb_t, pe.pos_emb_h, pe.pos_emb_w):
            table.normal_(0.0, 1.0)


# ----------------------------------------------------------------------------- stock-forward shim


def resize_nearest(mask: Tensor, size: list[int], interpolation: str = "nearest") -> Tensor:
    """torch-only stand-in for torchvision's tensor `resize(..., NEAREST)`: `F.interpolate(mode="nearest")`
    on the last two axes (torchvision's tensor path calls exactly that)."""
    if interpolation != "nearest":
        raise ValueError(f"only nearest resizing is provided; got interpolation={interpolation!r}")
    leading = mask.shape[:-2]
    resized = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=list(size), mode="nearest")
    return resized.reshape(*leading, *resized.shape[-2:])


def install_padding_mask_resize_shim() -> None:
    """Let the STOCK `CosmosTransformer3DModel.forward` run without torchvision (which cannot be imported here).

    The stock forward resizes its padding mask with `torchvision.transforms.functional.resize`; diffusers
    only binds `transforms` when torchvision is importable. This binds a torch-only equivalent in that
    module when (and only when) it is missing. The packed forward never needs it; tests and the padded
    benchmark baseline call the stock forward and do.
    """
    import diffusers.models.transformers.transformer_cosmos as transformer_cosmos

    if hasattr(transformer_cosmos, "transforms"):
        return
    transformer_cosmos.transforms = SimpleNamespace(
        functional=SimpleNamespace(resize=lambda mask, size, interpolation="nearest": resize_nearest(mask, size, interpolation)),
        InterpolationMode=SimpleNamespace(NEAREST="nearest"),
    )


# ----------------------------------------------------------------------------- the pack


@dataclass
class PackPlan:
    """Everything about a pack that depends only on frame sizes; build once, reuse at every sampler step."""

    frame_sizes: list[list[tuple[int, int]]]  # per sample, per frame: latent (h, w)
    fps: float | None  # None for images (DuetGen); a video fps scales the temporal rope as the stock model does
    frame_tokens: list[int]  # (F,) tokens per frame, frames in pack order
    frame_grids: list[tuple[int, int]]  # (F,) patch grid (h', w') per frame
    sample_frame_offsets: list[int]  # (B + 1,) first frame of each sample in pack order
    sample_token_offsets: list[int]  # (B + 1,) first token of each sample in the packed sequence
    token_frame: Tensor  # (N,) long: pack-order frame index of each token
    token_sample: Tensor  # (N,) long: sample index of each token
    positions: Tensor  # (N, 3) long: (t, h, w) rope position of each token, in patch units
    rope: tuple[Tensor, Tensor]  # (N, head_dim) float32 cos, sin
    attention: str  # "split" or "mask" (the model's mode when the plan was made)
    self_mask: Tensor | None  # (1, 1, N, N) bool block-diagonal mask; only for attention="mask"

    @property
    def num_samples(self) -> int:
        return len(self.frame_sizes)

    @property
    def num_frames(self) -> int:
        return len(self.frame_tokens)

    @property
    def num_tokens(self) -> int:
        return self.sample_token_offsets[-1]


@dataclass
class AttentionSegments:
    """Who may attend to whom in one call: per-sample ranges ("split") or dense masks ("mask")."""

    token_offsets: list[int]  # (B + 1,) sample ranges in the packed image tokens
    text_offsets: list[int]  # (B + 1,) sample ranges in the packed text tokens
    self_mask: Tensor | None  # (1, 1, N, N) bool, "mask" mode only
    cross_mask: Tensor | None  # (1, 1, N, L) bool, "mask" mode only


@dataclass
class QueryRows:
    """The tokens a block computes outputs for when only some are needed (the last block with targets_only):
    every token still gives its keys and values, only these rows give queries and go on."""

    index: Tensor  # (N_q,) long: rows of the packed tokens, in order
    offsets: list[int]  # (B + 1,) sample ranges in those rows


@dataclass
class ProjectedText:
    """One sample's text condition as every block's cross-attention keys and values (`PackedCosmosDiT.project_text`)."""

    keys: list[Tensor]  # per block (L, H, d), after the block's key norm
    values: list[Tensor]  # per block (L, H, d)

    def __len__(self) -> int:
        return self.keys[0].shape[0]


def rope_from_positions(rope, positions: Tensor, fps: float | None) -> tuple[Tensor, Tensor]:
    """Cosmos 3D RoPE (`CosmosRotaryPosEmbed.forward`) at explicit (t, h, w) token positions.

    Same frequencies (NTK-scaled thetas from the model's `rope_scale`), same op order, same layout
    `cat([t, h, w] * 2)`, so for a regular grid the result equals the stock rope exactly.
    """
    device = positions.device
    h_theta = 10000.0 * rope.h_ntk_factor
    w_theta = 10000.0 * rope.w_ntk_factor
    t_theta = 10000.0 * rope.t_ntk_factor
    dim_h_range = torch.arange(0, rope.dim_h, 2, device=device, dtype=torch.float32)[: rope.dim_h // 2] / rope.dim_h
    dim_w_range = torch.arange(0, rope.dim_w, 2, device=device, dtype=torch.float32)[: rope.dim_w // 2] / rope.dim_w
    dim_t_range = torch.arange(0, rope.dim_t, 2, device=device, dtype=torch.float32)[: rope.dim_t // 2] / rope.dim_t
    h_spatial_freqs = 1.0 / (h_theta**dim_h_range)
    w_spatial_freqs = 1.0 / (w_theta**dim_w_range)
    temporal_freqs = 1.0 / (t_theta**dim_t_range)

    pos_t, pos_h, pos_w = positions.to(torch.float32).unbind(-1)  # (N,) each
    if fps is not None:  # videos: time in units of the model's base fps
        pos_t = pos_t / fps * rope.base_fps
    emb_t = torch.outer(pos_t, temporal_freqs)  # (N, dim_t / 2)
    emb_h = torch.outer(pos_h, h_spatial_freqs)  # (N, dim_h / 2)
    emb_w = torch.outer(pos_w, w_spatial_freqs)  # (N, dim_w / 2)
    freqs = torch.cat([emb_t, emb_h, emb_w] * 2, dim=-1).float()  # (N, head_dim)
    return torch.cos(freqs), torch.sin(freqs)


def patchify(x: Tensor, p_h: int, p_w: int) -> Tensor:
    """(C, h, w) -> (h/p_h * w/p_w, C * p_h * p_w), token order row-major, features ordered (C, p_h, p_w)
    as `CosmosPatchEmbed` orders them (with p_t = 1)."""
    c, h, w = x.shape
    x = x.reshape(c, h // p_h, p_h, w // p_w, p_w)  # (C, h', p_h, w', p_w)
    return x.permute(1, 3, 0, 2, 4).reshape((h // p_h) * (w // p_w), c * p_h * p_w)


def unpatchify(tokens: Tensor, grid: tuple[int, int], p_h: int, p_w: int) -> Tensor:
    """(h' w', p_h * p_w * C) -> (C, h, w). The stock `proj_out` orders a token's features (p_h, p_w, p_t, C)."""
    gh, gw = grid
    x = tokens.reshape(gh, gw, p_h, p_w, -1)  # (h', w', p_h, p_w, C)
    return x.permute(4, 0, 2, 1, 3).reshape(x.shape[-1], gh * p_h, gw * p_w)


def frame_modulation(norm: nn.Module, embedded_timestep: Tensor, temb: Tensor) -> Tensor:
    """AdaLN-LoRA modulation of a `CosmosAdaLayerNormZero` / `CosmosAdaLayerNorm`, once per frame.

    embedded_timestep (F, D), temb (F, 3D) -> (F, k D): shift, scale[, gate] stacked on the last axis,
    exactly the stock computation (it adds `temb[..., :k D]`), just not repeated for every token.
    """
    modulation = norm.linear_2(norm.linear_1(norm.activation(embedded_timestep)))  # (F, k D)
    return modulation + temb[..., : modulation.shape[-1]]


def key_value(attn: nn.Module, context: Tensor) -> tuple[Tensor, Tensor]:
    """context (M, D_kv) -> the attention's keys (after its key norm) and values, (M, H, d) each."""
    key = attn.norm_k(attn.to_k(context).unflatten(-1, (attn.heads, -1)))  # (M, H, d)
    value = attn.to_v(context).unflatten(-1, (attn.heads, -1))  # (M, H, d)
    return key, value


def block_diagonal_attention(
    attn: nn.Module,
    hidden_states: Tensor,
    context: Tensor | tuple[Tensor, Tensor],
    rope: tuple[Tensor, Tensor] | None,
    query_offsets: list[int],
    key_offsets: list[int],
    mask: Tensor | None,
    query_rope: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Cosmos attention (`CosmosAttnProcessor2_0` math) with sample i's queries seeing only sample i's keys.

    hidden_states (N, D) packed queries; context (M, D_kv) packed keys/values (= hidden_states for
    self-attention), or already projected as (keys, values), each (M, H, d) (`key_value`); sample i owns
    query rows query_offsets[i]:query_offsets[i+1] and key rows key_offsets[i]:key_offsets[i+1]. With
    `mask` (1, 1, N, M) one SDPA call runs with the dense mask; without, SDPA runs per sample on
    contiguous slices. `query_rope` rotates the queries when they are not the keys' tokens (default `rope`).
    """
    # 1.-2. Q projection and QK normalization (RMSNorm over the head dim); K and V unless given
    query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))  # (N, H, d)
    key, value = context if isinstance(context, tuple) else key_value(attn, context)  # (M, H, d) each

    # 3. RoPE (self-attention only): rotate-half layout, as the stock processor applies it
    if rope is not None:
        query_rope = rope if query_rope is None else query_rope
        query = apply_rotary_emb(query[None], query_rope, use_real=True, use_real_unbind_dim=-2, sequence_dim=1)[0]
        key = apply_rotary_emb(key[None], rope, use_real=True, use_real_unbind_dim=-2, sequence_dim=1)[0]

    # 4. Attention, block-diagonal over samples; dispatch layout is (B, S, H, d)
    if mask is not None:
        out = dispatch_attention_fn(query[None], key[None], value[None], attn_mask=mask)[0]  # (N, H, d)
    else:
        out = torch.cat(
            [
                dispatch_attention_fn(query[None, q0:q1], key[None, k0:k1], value[None, k0:k1])[0]  # (n_i, H, d)
                for q0, q1, k0, k1 in zip(query_offsets[:-1], query_offsets[1:], key_offsets[:-1], key_offsets[1:])
            ]
        )  # (N, H, d)
    out = out.flatten(1, 2).type_as(query)  # (N, H d)

    # 5. Output projection (+ dropout, p = 0 in Cosmos)
    return attn.to_out[1](attn.to_out[0](out))  # (N, D)


# ----------------------------------------------------------------------------- one block


class PackedCosmosBlock(nn.Module):
    """Packed forward of one `CosmosTransformerBlock`, over that block's own modules (same parameter names).

    The stock block takes one timestep embedding per sample or per token and gives its self-attention
    no mask; here the AdaLN modulation is computed per frame and gathered to tokens, and both
    attentions are block-diagonal over the packed samples.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        if block.before_proj is not None or block.after_proj is not None:
            raise ValueError("PackedCosmosBlock: controlnet blocks (before_proj / after_proj) are not supported")
        self.norm1, self.attn1 = block.norm1, block.attn1
        self.norm2, self.attn2 = block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff

    def forward(
        self,
        hidden_states: Tensor,  # (N, D) packed image tokens
        text: Tensor | tuple[Tensor, Tensor],  # (L, D_cross) packed text tokens, or this block's (keys, values) of them
        embedded_timestep: Tensor,  # (F, D) per frame
        temb: Tensor,  # (F, 3D) per frame
        token_frame: Tensor,  # (N,) frame of each token
        rope: tuple[Tensor, Tensor],  # (N, head_dim) cos, sin
        extra_pos_emb: Tensor | None,  # (N, D) learnable absolute positions, or None (Cosmos-Predict2.5)
        segments: AttentionSegments,
        queries: QueryRows | None = None,  # compute only these tokens' outputs (their keys: every token's)
    ) -> Tensor:  # (N, D), or (N_q, D) for the query rows
        if extra_pos_emb is not None:  # the stock block adds them at every block
            hidden_states = hidden_states + extra_pos_emb

        # 1. Self-attention, within each sample; every token gives keys and values, the query rows queries
        shift, scale, gate = frame_modulation(self.norm1, embedded_timestep, temb)[token_frame].chunk(3, dim=-1)  # (N, D) x3
        norm_hidden_states = self.norm1.norm(hidden_states) * (1 + scale) + shift
        query_states, query_offsets, query_rope, self_mask, cross_mask = (
            norm_hidden_states, segments.token_offsets, None, segments.self_mask, segments.cross_mask)
        if queries is not None:  # from here on only the query rows
            rows = queries.index
            query_states, query_offsets, query_rope = norm_hidden_states[rows], queries.offsets, (rope[0][rows], rope[1][rows])
            self_mask = None if self_mask is None else self_mask[:, :, rows]
            cross_mask = None if cross_mask is None else cross_mask[:, :, rows]
            hidden_states, token_frame, gate = hidden_states[rows], token_frame[rows], gate[rows]  # (N_q, D)
        attn_output = block_diagonal_attention(
            self.attn1, query_states, norm_hidden_states, rope,
            query_offsets, segments.token_offsets, self_mask, query_rope=query_rope,
        )  # (N_q, D)
        hidden_states = hidden_states + gate * attn_output

        # 2. Cross-attention, each sample to its own text
        shift, scale, gate = frame_modulation(self.norm2, embedded_timestep, temb)[token_frame].chunk(3, dim=-1)
        norm_hidden_states = self.norm2.norm(hidden_states) * (1 + scale) + shift
        attn_output = block_diagonal_attention(
            self.attn2, norm_hidden_states, text, None,
            query_offsets, segments.text_offsets, cross_mask,
        )  # (N_q, D)
        hidden_states = hidden_states + gate * attn_output

        # 3. Feed-forward
        shift, scale, gate = frame_modulation(self.norm3, embedded_timestep, temb)[token_frame].chunk(3, dim=-1)
        norm_hidden_states = self.norm3.norm(hidden_states) * (1 + scale) + shift
        hidden_states = hidden_states + gate * self.ff(norm_hidden_states)  # (N_q, D)
        return hidden_states


# ----------------------------------------------------------------------------- the model


class PackedCosmosDiT(nn.Module):
    """A diffusers `CosmosTransformer3DModel` run over packed, variable-size, multi-image samples.

    `forward(frames, timesteps, condition_mask, text)` takes, per sample, a list of (C, h, w) latent
    frames (any sizes that are multiples of the patch size), per-frame flow times in [0, 1] (0 for
    clean conditioning frames), per-frame condition flags, and the sample's text condition already in
    the cross-attention width (the connector's output); it returns per sample, per frame the raw
    network output (C, h, w). The diffusion process (what the output means, preconditioning, velocity
    replacement on conditioning frames, loss masking) lives in `duetgen.diffusion`, not here.
    """

    def __init__(self, transformer: CosmosTransformer3DModel, attention: str = "split"):
        super().__init__()
        config = transformer.config
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}; got {attention!r}")
        if tuple(config.patch_size)[0] != 1:
            raise ValueError(f"PackedCosmosDiT needs patch_size[0] == 1 (one image = one frame); got {config.patch_size}")
        if config.in_channels != config.out_channels + 1:
            raise ValueError(
                "PackedCosmosDiT needs a condition-mask channel: in_channels must be out_channels + 1 "
                f"(Cosmos-Predict2.5 / Video2World layout); got in_channels={config.in_channels}, "
                f"out_channels={config.out_channels}"
            )
        if config.img_context_dim_in:
            raise ValueError("PackedCosmosDiT: image-context (Transfer2.5) models are not supported")

        # The stock model is kept for its config, save_pretrained and the stock forward, but not
        # registered: its modules are registered below, once, under the same names (module docstring).
        object.__setattr__(self, "transformer", transformer)
        self.attention = attention
        self.latent_channels = config.out_channels
        self.text_channels = config.text_embed_dim  # cross-attention width
        self.patch_size = tuple(config.patch_size)
        self.concat_padding_mask = config.concat_padding_mask
        self.rope = transformer.rope  # parameter-free; its frequencies are read by rope_from_positions
        self.gradient_checkpointing = False  # recompute each block in backward (torch.utils.checkpoint)

        self.patch_embed = transformer.patch_embed
        self.learnable_pos_embed = transformer.learnable_pos_embed  # None for Cosmos-Predict2.5
        self.time_embed = transformer.time_embed
        self.transformer_blocks = nn.ModuleList(PackedCosmosBlock(block) for block in transformer.transformer_blocks)
        self.norm_out = transformer.norm_out
        self.proj_out = transformer.proj_out
        self._plans: dict[tuple, PackPlan] = {}  # forward()'s recent plans, by (frame sizes, fps, attention, device)

    # ------------------------------------------------------------------ plan

    def plan(self, frame_sizes: list[list[tuple[int, int]]], fps: float | None = None) -> PackPlan:
        """Token layout, rope positions and masks for a pack of samples with these latent frame sizes."""
        _, p_h, p_w = self.patch_size
        max_t, max_h, max_w = self.rope.max_size  # in patch units
        device = self.proj_out.weight.device
        if not frame_sizes:
            raise ValueError("frame_sizes: a pack needs at least one sample")

        frame_tokens, frame_grids, positions = [], [], []
        sample_frame_offsets, sample_token_offsets = [0], [0]
        for i, sizes in enumerate(frame_sizes):
            if not sizes:
                raise ValueError(f"sample {i}: no frames (every sample needs at least its target frame)")
            if len(sizes) > max_t:
                raise ValueError(f"sample {i}: {len(sizes)} frames exceed the model's max_size[0] = {max_t}")
            for t, (h, w) in enumerate(sizes):
                if h % p_h or w % p_w or h <= 0 or w <= 0:
                    raise ValueError(f"sample {i} frame {t}: latent size {h}x{w} is not a positive multiple of the patch {p_h}x{p_w}")
                gh, gw = h // p_h, w // p_w
                if gh > max_h or gw > max_w:
                    raise ValueError(f"sample {i} frame {t}: patch grid {gh}x{gw} exceeds the model's max_size ({max_h}x{max_w} patches)")
                grid_t = torch.full((gh, gw), t)
                grid_h, grid_w = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
                positions.append(torch.stack([grid_t, grid_h, grid_w], dim=-1).reshape(gh * gw, 3))  # (h' w', 3)
                frame_tokens.append(gh * gw)
                frame_grids.append((gh, gw))
            sample_frame_offsets.append(sample_frame_offsets[-1] + len(sizes))
            sample_token_offsets.append(sample_token_offsets[-1] + sum(frame_tokens[sample_frame_offsets[-2]:]))

        frame_counts = torch.tensor(frame_tokens, device=device)
        token_frame = torch.repeat_interleave(torch.arange(len(frame_tokens), device=device), frame_counts)  # (N,)
        sample_tokens = torch.tensor(np.diff(sample_token_offsets), device=device)
        token_sample = torch.repeat_interleave(torch.arange(len(frame_sizes), device=device), sample_tokens)  # (N,)
        positions = torch.cat(positions).to(device)  # (N, 3)
        self_mask = None
        if self.attention == "mask":
            self_mask = (token_sample[:, None] == token_sample[None, :])[None, None]  # (1, 1, N, N)
        return PackPlan(
            frame_sizes=[[tuple(s) for s in sizes] for sizes in frame_sizes],
            fps=fps,
            frame_tokens=frame_tokens,
            frame_grids=frame_grids,
            sample_frame_offsets=sample_frame_offsets,
            sample_token_offsets=sample_token_offsets,
            token_frame=token_frame,
            token_sample=token_sample,
            positions=positions,
            rope=rope_from_positions(self.rope, positions, fps),
            attention=self.attention,
            self_mask=self_mask,
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        frames: list[list[Tensor]],
        timesteps: list[Tensor],
        condition_mask: list[Tensor],
        text: list[Tensor],
        fps: float | None = None,
        targets_only: bool = False,
    ) -> list[list[Tensor]]:
        """Plan the pack from the frame shapes (or reuse a recent plan of the same shapes), then run it (see `forward_planned`)."""
        frame_sizes = tuple(tuple(tuple(frame.shape[-2:]) for frame in sample) for sample in frames)
        key = (frame_sizes, fps, self.attention, self.proj_out.weight.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self.plan([list(sizes) for sizes in frame_sizes], fps=fps)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = plan
        return self.forward_planned(plan, frames, timesteps, condition_mask, text, targets_only)

    def project_text(self, text: Tensor) -> ProjectedText:
        """A sample's text (L, D_cross) as every block's cross-attention keys and values: `forward` takes it in
        place of the tensor and skips those projections (a sampler's text is the same at every step)."""
        if text.ndim != 2 or text.shape[1] != self.text_channels or text.shape[0] == 0:
            raise ValueError(f"text must be (L >= 1, {self.text_channels}) in the cross-attention width "
                             f"(the connector's output); got shape {tuple(text.shape)}")
        keys, values = [], []
        for block in self.transformer_blocks:
            # Outside its forward, a block sharded by fully_shard (train/parallel.py: stage 2 samples while it
            # trains) holds DTensor shards: gather its weights for this, as its forward would, then free them.
            sharded = isinstance(block, FSDPModule)
            if sharded:
                block.unshard()
            weight = block.attn2.to_k.weight  # (after unsharding: the gathered weight, in the compute dtype)
            key, value = key_value(block.attn2, text.to(device=weight.device, dtype=weight.dtype))
            if sharded:
                block.reshard()
            keys.append(key)
            values.append(value)
        return ProjectedText(keys=keys, values=values)

    def forward_planned(
        self,
        plan: PackPlan,
        frames: list[list[Tensor]],  # per sample, per frame (C, h, w) latent
        timesteps: list[Tensor],  # per sample (n_frames,) flow time in [0, 1]; 0 on conditioning frames
        condition_mask: list[Tensor],  # per sample (n_frames,) bool; True = clean conditioning frame
        text: list[Tensor | ProjectedText],  # per sample (L_i, D_cross) connector output, or it through project_text
        targets_only: bool = False,  # return only frames with condition_mask False (see the module docstring)
    ) -> list[list[Tensor]]:  # per sample, per frame (C, h, w) raw output
        self._check_inputs(plan, frames, timesteps, condition_mask, text)
        _, p_h, p_w = self.patch_size
        dtype = self.proj_out.weight.dtype
        device = self.proj_out.weight.device
        is_condition = torch.cat([m.to(device=device, dtype=torch.bool) for m in condition_mask])  # (F,)

        # 1. Patchify every frame at its own size, after concatenating the condition-mask channel and
        #    the (all-zero: nothing is padded) padding-mask channel, as the stock forward does
        tokens = []
        for frame, cond in zip((f for sample in frames for f in sample), is_condition):
            h, w = frame.shape[-2:]
            channels = [frame.to(device=device, dtype=dtype), cond.to(dtype).expand(1, h, w)]
            if self.concat_padding_mask:
                channels.append(frame.new_zeros(1, h, w, dtype=dtype, device=device))
            tokens.append(patchify(torch.cat(channels), p_h, p_w))  # (h' w', (C + 2) p_h p_w)
        hidden_states = self.patch_embed.proj(torch.cat(tokens))  # (N, D)

        # 2. Timestep embedding, one per frame (flow time t in [0, 1], sinusoidal as in the stock model)
        frame_timesteps = torch.cat([t.to(device=device, dtype=torch.float32) for t in timesteps])  # (F,)
        temb, embedded_timestep = self.time_embed(hidden_states, frame_timesteps)  # (F, 3D), (F, D)

        # 3. Positions: rope from the plan; learnable absolute embedding (Cosmos-1 style) if the model has one
        extra_pos_emb = None
        if self.learnable_pos_embed is not None:
            extra_pos_emb = self._learnable_pos_emb(plan.positions).type_as(hidden_states)  # (N, D)

        # 4. Text, packed (as each block's cross-attention keys and values where any sample's came projected);
        #    who attends to whom
        if any(isinstance(x, ProjectedText) for x in text):
            projected = [x if isinstance(x, ProjectedText) else self.project_text(x) for x in text]
            block_text = [
                (torch.cat([x.keys[b] for x in projected]), torch.cat([x.values[b] for x in projected]))  # (L, H, d) x2
                for b in range(len(self.transformer_blocks))
            ]
        else:
            context = torch.cat([x.to(device=device, dtype=dtype) for x in text])  # (L, D_cross)
            block_text = [context] * len(self.transformer_blocks)
        text_offsets = np.cumsum([0] + [len(x) for x in text]).tolist()
        cross_mask = None
        if plan.attention == "mask":
            text_sample = torch.repeat_interleave(
                torch.arange(len(text), device=device), torch.tensor([len(x) for x in text], device=device)
            )  # (L,)
            cross_mask = (plan.token_sample[:, None] == text_sample[None, :])[None, None]  # (1, 1, N, L)
        segments = AttentionSegments(plan.sample_token_offsets, text_offsets, plan.self_mask, cross_mask)

        # 5. Transformer blocks
        #    With targets_only the last block computes the targets' outputs alone: the conditioning tokens give it
        #    their keys and values, and nothing else of theirs is ever read (a dead ~20 % of their compute)
        token_frame = plan.token_frame
        keep = list(range(plan.num_frames))
        last_queries = None
        if targets_only and bool(is_condition.any()):
            keep = [f for f in keep if not is_condition[f]]
            token_keep = ~is_condition[token_frame]  # (N,)
            counts = torch.zeros(plan.num_samples, dtype=torch.long, device=device).index_add_(
                0, plan.token_sample, token_keep.long())  # target tokens per sample
            last_queries = QueryRows(token_keep.nonzero()[:, 0], [0] + counts.cumsum(0).tolist())
            token_frame = token_frame[token_keep]
        for i, (block, context) in enumerate(zip(self.transformer_blocks, block_text)):
            queries = last_queries if i == len(self.transformer_blocks) - 1 else None
            args = (hidden_states, context, embedded_timestep, temb, plan.token_frame, plan.rope, extra_pos_emb, segments,
                    queries)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = checkpoint(block, *args, use_reentrant=False)
            else:
                hidden_states = block(*args)  # (N, D); the last block with targets_only (N_targets, D)

        # 6. Output norm (per-frame AdaLN) and projection, on the target tokens only if asked
        shift, scale = frame_modulation(self.norm_out, embedded_timestep, temb)[token_frame].chunk(2, dim=-1)
        hidden_states = self.norm_out.norm(hidden_states) * (1 + scale) + shift
        hidden_states = self.proj_out(hidden_states)  # (N_kept, p_h p_w C)

        # 7. Unpatchify each frame at its own size, regroup by sample
        per_frame = hidden_states.split([plan.frame_tokens[f] for f in keep])
        outputs: list[list[Tensor]] = [[] for _ in range(plan.num_samples)]
        sample_of_frame = np.searchsorted(plan.sample_frame_offsets, keep, side="right") - 1
        for f, sample, out in zip(keep, sample_of_frame, per_frame):
            outputs[sample].append(unpatchify(out, plan.frame_grids[f], p_h, p_w))  # (C, h, w)
        return outputs

    # ------------------------------------------------------------------ helpers

    def _learnable_pos_emb(self, positions: Tensor) -> Tensor:
        """`CosmosLearnablePositionalEmbed.forward` at explicit positions: t + h + w tables, RMS-normalised per token."""
        pe = self.learnable_pos_embed
        emb = pe.pos_emb_t[positions[:, 0]] + pe.pos_emb_h[positions[:, 1]] + pe.pos_emb_w[positions[:, 2]]  # (N, D)
        norm = torch.linalg.vector_norm(emb, dim=-1, keepdim=True, dtype=torch.float32)
        norm = torch.add(pe.eps, norm, alpha=np.sqrt(norm.numel() / emb.numel()))
        return emb / norm

    def _check_inputs(self, plan, frames, timesteps, condition_mask, text) -> None:
        """Raise a ValueError naming the sample, frame and problem for any input that does not fit the plan."""
        n = plan.num_samples
        for name, items in (("frames", frames), ("timesteps", timesteps), ("condition_mask", condition_mask), ("text", text)):
            if len(items) != n:
                raise ValueError(f"{name}: expected one entry per sample ({n}); got {len(items)}")
        for i in range(n):
            sizes = plan.frame_sizes[i]
            if len(frames[i]) != len(sizes):
                raise ValueError(f"sample {i}: {len(frames[i])} frames, but the plan has {len(sizes)}")
            for t, frame in enumerate(frames[i]):
                if frame.ndim != 3 or frame.shape[0] != self.latent_channels or tuple(frame.shape[-2:]) != sizes[t]:
                    raise ValueError(
                        f"sample {i} frame {t}: expected a ({self.latent_channels}, {sizes[t][0]}, {sizes[t][1]}) latent; "
                        f"got shape {tuple(frame.shape)}"
                    )
            if timesteps[i].shape != (len(sizes),):
                raise ValueError(f"sample {i}: timesteps must have shape ({len(sizes)},); got {tuple(timesteps[i].shape)}")
            if condition_mask[i].shape != (len(sizes),) or condition_mask[i].dtype != torch.bool:
                raise ValueError(
                    f"sample {i}: condition_mask must be a bool tensor of shape ({len(sizes)},); "
                    f"got {condition_mask[i].dtype} {tuple(condition_mask[i].shape)}"
                )
            if isinstance(text[i], ProjectedText):
                if len(text[i].keys) != len(self.transformer_blocks) or len(text[i]) == 0:
                    raise ValueError(f"sample {i}: projected text has {len(text[i].keys)} blocks' keys of length "
                                     f"{len(text[i])}; this DiT has {len(self.transformer_blocks)} blocks")
            elif text[i].ndim != 2 or text[i].shape[1] != self.text_channels or text[i].shape[0] == 0:
                raise ValueError(
                    f"sample {i}: text must be (L >= 1, {self.text_channels}) in the cross-attention width "
                    f"(the connector's output); got shape {tuple(text[i].shape)}"
                )
        # flow time in [0, 1]: catches a 0..1000 timestep convention early (one device sync per call)
        in_range = torch.stack([((t >= 0) & (t <= 1)).all().to(self.proj_out.weight.device) for t in timesteps])  # (B,)
        if not bool(in_range.all()):
            i = int((~in_range).nonzero()[0])
            raise ValueError(f"sample {i}: timesteps are flow times in [0, 1]; got {timesteps[i].tolist()}")
