"""Model presets: the real preset on the meta device (parameter counts, nothing allocated), tiny / toy sizes."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from duetgen.models.mllm import render_record
from duetgen.models.builder import build
from duetgen.models.presets import PRESETS, REAL_PRESET, get_preset, toy
from duetgen.models.video_dit import toy_cosmos_config

torch.set_num_threads(1)

# Measured by test_real_preset_on_meta (and equal to the published Qwen2.5-VL-7B-Instruct total, 8.29B).
QWEN2_5_VL_7B_PARAMETERS = 8_292_166_656  # 676,550,144 vision + 7,070,619,136 language model + 544,997,376 lm_head
COSMOS_PREDICT2_5_2B_PARAMETERS = 2_059_174_912  # 1,956,413,440 DiT + 102,761,472 crossattn_proj (= the connector)
WAN2_1_VAE_PARAMETERS = 126_892_531


def test_real_preset_on_meta():
    model = build(REAL_PRESET, device="meta")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    counts = model.num_parameters()
    print(f"\n{REAL_PRESET} parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    assert counts["mllm"] == QWEN2_5_VL_7B_PARAMETERS
    assert counts["connector"] + counts["dit"] == COSMOS_PREDICT2_5_2B_PARAMETERS
    assert counts["connector"] == 100_352 * 1024 + 1024  # Linear(28 x 3584 -> 1024): the pretrained crossattn_proj
    assert counts["vae"] == WAN2_1_VAE_PARAMETERS
    assert sum(p.numel() for p in model.generator_parameters()) == COSMOS_PREDICT2_5_2B_PARAMETERS
    assert model.pixel_multiple == 16  # Wan2.1 f = 8 x patch 2: a 768x768 image is 48x48 = 2,304 tokens per frame
    assert model.transformer.crossattn_proj[0] is model.connector.proj
    assert model.tokenizer is None  # the real tokenizer comes with the weights (builder.assemble)
    with pytest.raises(ValueError, match="has no tokenizer"):
        model.save_pretrained("/nonexistent/never-written")


@pytest.mark.parametrize("name", ["tiny", "tiny-wan", "toy"])
def test_offline_presets_build_and_run(name):
    start = time.perf_counter()
    model = build(name)
    seconds = time.perf_counter() - start
    print(f"\n{name}: built in {seconds:.2f} s, parameters {model.num_parameters()}")
    assert len(model.tokenizer) == model.mllm.get_input_embeddings().weight.shape[0]  # embedding sized to the BPE
    h, w = model.config.image_size
    f = model.vae.spatial_factor
    frames = [[torch.zeros(model.dit.latent_channels, h // f, w // f)] * 2]
    text = model.connect(torch.randn(5, model.connector.in_channels))
    with torch.no_grad():
        out = model.dit(frames, [torch.tensor([0.0, 0.5])], [torch.tensor([True, False])], [text])
    assert out[0][1].shape == frames[0][1].shape


def test_toy_is_sized_as_the_calibration_found():
    """notes/shapeworld-calibration.md: 16 tokens per 64x64 frame, 4 layers x 128, x0 prediction."""
    from PIL import Image

    from duetgen.data.record import ImagePart, Message, Record, TextPart

    model = build("toy")
    assert model.dit.plan([[(16, 16)]]).frame_tokens == [16]  # 64x64 canvas -> f 4 -> 16x16x48 -> 4x4 patches
    assert model.vae.latent_channels == 48 and model.dit.patch_size == (1, 4, 4)
    config = model.transformer.config
    assert (config.num_layers, config.num_attention_heads * config.attention_head_dim) == (4, 128)
    assert model.config.parameterisation == "x0"
    assert 1_500_000 < model.num_parameters()["dit"] < 2_000_000  # "1.7M" in the note
    # the MLLM sees a canvas as 16 tokens too
    canvas = Image.new("RGB", (64, 64), (255, 255, 255))
    record = Record("t", [Message("user", [TextPart("Draw a red circle at the top."), ImagePart(canvas)])])
    assert render_record(record, model.tokenizer, model.image_processor).images[0].num_tokens == 9


def test_a_variant_changes_a_copy():
    variant = replace(toy(), name="toy-6", dit=toy_cosmos_config(crossattn_in_channels=1024, num_layers=6))
    assert build(variant).transformer.config.num_layers == 6
    assert get_preset("toy").dit["num_layers"] == 4


def test_real_preset_settings():
    settings = get_preset(REAL_PRESET).settings
    assert settings.image_size == (768, 768) and settings.mllm_max_side == 480  # paper sections 5 and 4.1
    assert settings.parameterisation == "cosmos" and settings.guidance_scale == 8.0  # Cosmos g = 7 -> w = 8
    assert (settings.sampler.solver, settings.sampler.num_steps, settings.sampler.schedule) == ("unipc", 36, "karras")


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown model preset 'big'; known: \["):
        get_preset("big")
    assert set(PRESETS) == {"tiny", "tiny-wan", "toy", REAL_PRESET}
