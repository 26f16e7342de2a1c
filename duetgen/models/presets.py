"""Model presets: plain functions returning a full `ModelPreset`; `duetgen.models.builder.build` turns one into a `DuetGen`.

A run is a function that changes a few fields of a copy (torchtitan style):

    preset = replace(toy(), dit=toy_cosmos_config(crossattn_in_channels=1024, num_layers=6))
    model = builder.build(preset)

| preset | MLLM | DiT | autoencoder | use |
|---|---|---|---|---|
| `tiny` | 2 x 64 text, 2 x 32 vision (mllm.tiny_qwen2_5_vl_config) | 2 x 32, patch 2 | pixel shuffle f = 2 (12 ch) | unit tests |
| `tiny-wan` | same | same, 4 latent channels | tiny random AutoencoderKLWan (f = 2) | tests of the Wan save/load path |
| `toy` | 4 x 256 text, 2 x 128 vision (mllm.toy_qwen2_5_vl_config), canvases at 48 px | 4 x 128, patch 4, learnable positions (video_dit.toy_cosmos_config) | pixel shuffle f = 4 (48 ch) | ShapeWorld on 2 CPU cores |
| `qwen2.5-vl-7b+cosmos-predict2.5-2b` | Qwen2.5-VL-7B-Instruct | Cosmos-Predict2.5-2B | Wan2.1 VAE | the paper's system (weights from local paths) |

Design choices:
- Architectures are typed in from the published configs (Qwen2.5-VL-7B-Instruct config.json;
  diffusers' `scripts/convert_cosmos_to_diffusers.py` entry "Cosmos-2.5-Predict-Base-2B"; Wan2.1's
  AutoencoderKLWan defaults), so the real preset builds on the `meta` device without any download,
  for parameter counts, FSDP planning and random-weight GPU checks.
- Toy sizes follow notes/shapeworld-calibration.md: 64x64 canvas -> pixel shuffle f = 4 -> 16x16x48
  latent -> 4x4 patches = 16 tokens per frame, 4 layers x 128 (fewest tokens and layers won on
  2 CPU cores), clean-image ("x0") prediction (velocity-predicted samples stayed noisy), 10 sampler
  steps ("10 nearly as good as 50"), guidance 2 (it lifted text-to-image; the note does not say
  which convention, and it hurt edits: a starting point, not a measurement of ours).
- Two toy choices came from training it (docs/training.md, "What changed"): the MLLM sees a canvas
  at 48x48, white-centred (`toy_image_processor`: 9 tokens, one per cell, empty cells zero), and the
  DiT has learnable absolute positions (rope alone cannot tell tokens of a blank canvas apart).
- The offline presets train their tokenizer at build time (milliseconds) and size the embedding to
  it; the real preset's tokenizer comes with the weights (`builder.assemble`), so `build` of it
  has `tokenizer=None` and cannot be saved.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from duetgen.diffusion.schedules import SamplerConfig
from duetgen.models.duetgen import DuetGenConfig, mllm_condition_channels
from duetgen.models.image_processor import ImageProcessor
from duetgen.models.mllm import (
    TOY_MLLM_SIDE,
    tiny_image_processor,
    tiny_qwen2_5_vl_config,
    toy_image_processor,
    toy_qwen2_5_vl_config,
)
from duetgen.models.vae import tiny_wan_vae_config
from duetgen.models.video_dit import tiny_cosmos_config, toy_cosmos_config

REAL_PRESET = "qwen2.5-vl-7b+cosmos-predict2.5-2b"


@dataclass
class ModelPreset:
    name: str
    settings: DuetGenConfig  # saved as duetgen.json
    mllm: object  # transformers Qwen2_5_VLConfig; vocab_size replaced by len(tokenizer) for offline tokenizers
    tokenizer: str | None  # offline corpus ("tiny" | "shapeworld") trained at build time; None = comes with the weights
    tokenizer_vocab_size: int  # BPE size target of the offline tokenizer (the trainer may stop earlier)
    image_processor: ImageProcessor  # patch settings; its max_side is replaced by settings.mllm_max_side
    dit: dict  # diffusers CosmosTransformer3DModel kwargs
    vae: dict  # vae/config.json content: {"_class_name": "PixelShuffleAE" | "AutoencoderKLWan", **config}


# ----------------------------------------------------------------------------- the presets


def tiny() -> ModelPreset:
    """Unit tests: builds in milliseconds; 12-channel pixel-shuffle latents, 32x32 images (4x4 tokens)."""
    mllm = tiny_qwen2_5_vl_config(vocab_size=300)
    return ModelPreset(
        name="tiny",
        settings=DuetGenConfig(
            preset="tiny", parameterisation="velocity", sampler=SamplerConfig(num_steps=4), guidance_scale=2.0,
            image_size=(32, 32), max_images=4, mllm_max_side=48,
        ),
        mllm=mllm,
        tokenizer="tiny",
        tokenizer_vocab_size=300,
        image_processor=tiny_image_processor(),
        dit=tiny_cosmos_config(in_channels=12 + 1, out_channels=12,
                               crossattn_proj_in_channels=mllm_condition_channels(mllm)),
        vae={"_class_name": "PixelShuffleAE", "factor": 2, "shift": 0.0, "scale": 1.0},
    )


def tiny_wan() -> ModelPreset:
    """`tiny` with a tiny random AutoencoderKLWan (4 latent channels, f = 2): the Wan save/load path."""
    preset = tiny()
    return replace(
        preset,
        name="tiny-wan",
        settings=replace(preset.settings, preset="tiny-wan"),
        dit={**preset.dit, "in_channels": 4 + 1, "out_channels": 4},
        vae={"_class_name": "AutoencoderKLWan", **tiny_wan_vae_config()},
    )


def toy() -> ModelPreset:
    """ShapeWorld on 2 CPU cores (sizes from notes/shapeworld-calibration.md, see module docstring)."""
    mllm = toy_qwen2_5_vl_config(vocab_size=512)
    return ModelPreset(
        name="toy",
        settings=DuetGenConfig(
            preset="toy", parameterisation="x0", sampler=SamplerConfig(solver="euler", num_steps=10),
            guidance_scale=2.0, image_size=(64, 64), max_images=8, mllm_max_side=TOY_MLLM_SIDE,
        ),
        mllm=mllm,
        tokenizer="shapeworld",
        tokenizer_vocab_size=512,
        image_processor=toy_image_processor(),
        dit=toy_cosmos_config(latent_channels=48, crossattn_in_channels=mllm_condition_channels(mllm)),
        vae={"_class_name": "PixelShuffleAE", "factor": 4, "shift": 0.0, "scale": 1.0},
    )


def qwen2_5_vl_7b_cosmos_predict2_5_2b() -> ModelPreset:
    """The paper's system (section 4.1): Qwen2.5-VL-7B + Cosmos-Predict2.5-2B + the Wan2.1 VAE."""
    return ModelPreset(
        name=REAL_PRESET,
        settings=DuetGenConfig(
            preset=REAL_PRESET,
            parameterisation="cosmos",  # pretrained Cosmos outputs the velocity (docs/diffusion.md)
            # Cosmos-Predict2.5's released sampler: UniPC, 36 steps, EDM Karras sigmas (diffusers pipeline defaults)
            sampler=SamplerConfig(solver="unipc", num_steps=36, schedule="karras"),
            guidance_scale=8.0,  # Cosmos' default g = 7 in cond + g (cond - uncond) is our w = g + 1
            image_size=(768, 768),  # paper section 5
            max_images=8,
            mllm_max_side=480,  # paper section 4.1
        ),
        mllm=qwen2_5_vl_7b_config(),
        tokenizer=None,
        tokenizer_vocab_size=152064,
        image_processor=ImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                       min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
        dit=cosmos_predict2_5_2b_config(),
        vae=wan2_1_vae_config(),
    )


PRESETS = {
    "tiny": tiny,
    "tiny-wan": tiny_wan,
    "toy": toy,
    REAL_PRESET: qwen2_5_vl_7b_cosmos_predict2_5_2b,
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- real architectures


def qwen2_5_vl_7b_config():
    """Qwen2.5-VL-7B-Instruct, typed in from its published config.json (transformers 5.x field names)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            hidden_act="silu",
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=28,
            attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=151643,
            eos_token_id=151645,
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            in_channels=3,
            hidden_act="silu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=3584,
            tokens_per_second=2,
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def cosmos_predict2_5_2b_config() -> dict:
    """Cosmos-Predict2.5-2B transformer, as diffusers' convert_cosmos_to_diffusers.py "Cosmos-2.5-Predict-Base-2B"."""
    return dict(
        in_channels=16 + 1,  # Wan2.1 latents + condition-mask channel
        out_channels=16,
        num_attention_heads=16,
        attention_head_dim=128,  # 2048 wide
        num_layers=28,
        mlp_ratio=4.0,
        text_embed_dim=1024,
        adaln_lora_dim=256,
        max_size=(128, 240, 240),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
        use_crossattn_projection=True,
        crossattn_proj_in_channels=100352,  # Qwen2.5-VL-7B (Cosmos-Reason1): 28 layers x 3584
        encoder_hidden_states_channels=1024,
    )


def wan2_1_vae_config() -> dict:
    """The Wan2.1 VAE (AutoencoderKLWan; Cosmos-Predict2.5 encodes with it): f = 8, 16 latent channels."""
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": 96,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
    }
