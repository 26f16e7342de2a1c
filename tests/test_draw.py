"""Drawing one image (duetgen.diffusion.draw) and the generation settings it runs with (GenerationConfig.resolve)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from duetgen.data.record import ImagePart, Message, Record, TextPart
from duetgen.diffusion.draw import draw_latent, network_x0, previous_canvas
from duetgen.diffusion.schedules import SamplerConfig
from duetgen.infer.engine import GenerationConfig
from duetgen.models.mllm import condition_hidden_states, render_record
from duetgen.models.builder import build

torch.set_num_threads(1)


def noise_image(h, w, seed):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def red_circle_canvas():
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(image).ellipse([5, 5, 19, 19], fill=(220, 40, 40))
    return image


def defaults(model, **overrides):
    return GenerationConfig(**overrides).resolve(model.config, model.pixel_multiple)


def test_draw_latent_is_seeded_guided_and_sized():
    model = build("tiny").eval()
    rec = Record("howto-1", [
        Message("user", [TextPart("How do I bathe a cat?"), ImagePart(noise_image(24, 40, 1))]),
        Message("assistant", [TextPart("Step 1: fill the tub."), ImagePart(noise_image(32, 32, 2)),
                              TextPart("Step 2: place the cat."), ImagePart(noise_image(16, 24, 3))]),
    ])
    rendered = render_record(rec, model.tokenizer, model.image_processor)
    with torch.no_grad():
        text = model.connect(condition_hidden_states(model.mllm, rendered, rendered.bov_positions[1]))
        cond = model.encode_images([noise_image(24, 40, 1), noise_image(32, 32, 2)])
    settings = defaults(model)

    def draw(size=(32, 32), guidance_scale=settings.guidance_for(True)):
        return draw_latent(model, cond, text, text[:7], size=size, generator=torch.Generator().manual_seed(3),
                           sampler=settings.sampler, guidance_scale=guidance_scale)

    a, b = draw(), draw()
    assert a.shape == (12, 16, 16) and torch.equal(a, b)  # image_size 32x32 -> 16x16 latent, seeded
    assert settings.guidance_for(True) == 2.0 and not torch.equal(a, draw(guidance_scale=1.0))
    assert draw(size=(16, 24)).shape == (12, 8, 12)
    assert model.decode_latents([a])[0].size == (32, 32)
    with pytest.raises(ValueError, match="exceed max_images=4"):
        draw_latent(model, cond * 2, text, None, size=(32, 32), generator=None, sampler=settings.sampler,
                    guidance_scale=1.0)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        draw(size=(18, 32))


def test_draw_latent_applies_the_trained_output_settings():
    """A DiT whose output is 0 predicts x0_hat = 0, or = the previous canvas when the output is relative to
    it; Euler ends at x0_hat exactly, so the sample IS the canvas the settings choose."""
    model = build("toy").eval()
    with torch.no_grad():
        model.dit.proj_out.weight.zero_()  # raw output 0 everywhere (proj_out has no bias)
    text = torch.randn(6, 128)
    cond = model.encode_images([red_circle_canvas()])

    def draw(frames):
        return draw_latent(model, frames, text, None, size=(64, 64), generator=None,
                           sampler=SamplerConfig(num_steps=3), guidance_scale=1.0)

    assert draw(cond).abs().max() == 0  # plain "x0"
    model.config = replace(model.config, x0_relative_to_previous=True)
    assert (draw(cond) - cond[0]).abs().max() < 1e-5  # "change nothing" = the previous canvas
    white = torch.ones_like(cond[0])  # pixel shuffle of a white canvas in [-1, 1]
    assert (draw([]) - white).abs().max() < 1e-5
    # an image asked at another size than the earlier canvas: "change nothing" = that canvas resized
    resized = draw_latent(model, cond, text, None, size=(32, 48), generator=None,
                          sampler=SamplerConfig(num_steps=3), guidance_scale=1.0)
    expected = model.encode_images([red_circle_canvas().resize((48, 32), Image.BICUBIC)])[0]
    assert resized.shape == expected.shape == (48, 8, 12)
    assert (model.vae.decode(resized[None]) - model.vae.decode(expected[None])).abs().max() < 0.1  # [-1, 1] pixels
    model.config = replace(model.config, use_condition_frames=False)  # text-only ablation: frames never shown
    assert (draw(cond) - white).abs().max() < 1e-5
    with pytest.raises(ValueError, match="x0_relative_to_previous needs parameterisation='x0'"):
        replace(model.config, parameterisation="velocity")


def test_the_relative_rule_of_the_loss_is_the_drawing_rule():
    raw, frame, white = torch.randn(3, 4, 4), torch.randn(3, 4, 4), torch.ones(3, 4, 4)
    assert torch.equal(network_x0(raw, None), raw)
    assert torch.equal(network_x0(raw, previous_canvas([white, frame], lambda: white)), raw + frame)
    assert torch.equal(network_x0(raw, previous_canvas([], lambda: white)), raw + white)


def test_resolve_fills_the_model_defaults_once():
    model = build("tiny")
    config = model.config  # tiny: 4 euler steps, guidance 2, 32x32
    settings = GenerationConfig().resolve(config, model.pixel_multiple)
    assert settings.sampler == config.sampler and settings.image_size == (32, 32) and settings.framing == "duetgen"
    assert settings.guidance_for(True) == settings.guidance_for(False) == 2.0
    config = replace(config, guidance_scale_without_frames=3.0)
    settings = GenerationConfig().resolve(config, model.pixel_multiple)
    assert (settings.guidance_for(True), settings.guidance_for(False)) == (2.0, 3.0)
    settings = GenerationConfig(guidance_scale=1.5, num_steps=7, solver="unipc", image_size=(16, 24)).resolve(
        config, model.pixel_multiple)
    assert (settings.guidance_for(True), settings.guidance_for(False)) == (1.5, 1.5)  # the caller's w for every image
    assert settings.sampler == replace(config.sampler, num_steps=7, solver="unipc") and settings.image_size == (16, 24)
    with pytest.raises(ValueError, match="multiples of 4"):
        GenerationConfig(image_size=(18, 32)).resolve(config, model.pixel_multiple)


def test_generation_config_checks_itself_when_built():
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        GenerationConfig(num_steps=0)
    with pytest.raises(ValueError, match="solver must be one of"):
        GenerationConfig(solver="heun")
    with pytest.raises(ValueError, match="top_p"):
        replace(GenerationConfig(), top_p=0.0)  # a changed copy is checked too
