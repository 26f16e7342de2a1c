"""Drawing one image: its latent sampled from a text condition, earlier images and a guidance negative.

    latent = draw_latent(model, cond_frames, text_pos, text_neg, size=(48, 48), generator=g,
                         sampler=SamplerConfig(num_steps=20), guidance_scale=1.0)   # (C, h, w)

The one place a DuetGen image is sampled. Its users: `InterleavedEngine` and `BatchedEngine` (every answer
of `duetgen generate`, `serve`, `eval generate`, ShapeWorld evaluation and stage 2's samples, which run the
engine), the Cosmos framing (`duetgen.infer.engine.draw_cosmos`); stage 2's loss target applies the same
x0-relative rule through `previous_canvas` and `network_x0`.

The steps (diffusers' pipeline `__call__` shape):
1. Noise for the target latent from the image's own generator (C, H / f, W / f).
2. Conditioning frames: every earlier image's clean latent, oldest first; none for a network trained
   without them (`use_condition_frames=False`, the text-only ablation).
3. The network's x0: its raw output for the target frame; with `x0_relative_to_previous` that output is
   ADDED to the previous canvas (the latest conditioning latent, a white canvas's when there is none), so
   "change nothing" is the zero output (docs/training.md; train/stage2.py trains against the same rule).
   A previous canvas of another size than the image asked for (an input canvas of 48 px, `image_size`
   64) is that picture resized to the asked size (`resized_canvas`); the conditioning frames keep their sizes.
4. The text condition through every DiT block's cross-attention key and value projections, once per
   image instead of once per step (`PackedCosmosDiT.project_text`; the text does not change between steps).
5. Guidance: positive and negative as two samples of one packed DiT call (`guidance.guided_denoiser`,
   which alone decides that w = 1 needs no negative).
6. The sampler integrates the flow from t = 1 to 0 (`sampling.sample`).

What the network was trained with (parameterisation, the x0 rule, conditioning frames and their flow
time) comes from the model's `DuetGenConfig`; how to sample (solver, steps, guidance) is the caller's,
already resolved (`duetgen.infer.engine.GenerationConfig.resolve`). The model is used only through its
parts (`model.dit`, `model.vae`, `model.config`, `model.device`, `model.pixel_multiple`): the network
never sees the sampler (DiT's split between `models.py` and `diffusion/`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from duetgen.diffusion.guidance import guided_denoiser
from duetgen.diffusion.sampling import StepCallback, sample
from duetgen.diffusion.schedules import SamplerConfig


def white_canvas_latent(vae, height: int, width: int, device: torch.device | str) -> Tensor:
    """The latent (C, h, w) of a white canvas of (height, width) pixels: the previous canvas of a first drawing."""
    return vae.encode(torch.ones(1, 3, height, width, device=device))[0]  # [-1, 1] pixels: white is 1


def previous_canvas(cond_frames: Sequence[Tensor], white: Callable[[], Tensor]) -> Tensor:
    """The canvas a drawing is relative to: the latest conditioning latent, or ``white()`` when there is none."""
    return cond_frames[-1] if len(cond_frames) else white()


def resized_canvas(vae, latent: Tensor, height: int, width: int) -> Tensor:
    """A canvas latent (C, h, w) as the latent of the same picture at (height, width) pixels: decoded, resized
    (bicubic, antialiased, as `DuetGen.fit_image` resizes an earlier image) and encoded again."""
    pixels = vae.decode(latent[None]).clamp(-1, 1)  # (1, 3, h f, w f)
    pixels = F.interpolate(pixels, size=(height, width), mode="bicubic", antialias=True,
                           align_corners=False).clamp(-1, 1)
    return vae.encode(pixels)[0]  # (C, height / f, width / f)


def network_x0(raw: Tensor, previous: Tensor | None) -> Tensor:
    """What the "x0" parameterisation reads from the DiT's raw target output: ``raw``, or ``raw + previous``
    for a network trained with ``x0_relative_to_previous`` (``previous`` from `previous_canvas`)."""
    return raw if previous is None else raw + previous


def initial_noise(channels: int, height: int, width: int, generator: torch.Generator | None,
                  device: torch.device | str) -> Tensor:
    """(channels, height, width) standard normal noise from ``generator`` (drawn on its device, then moved)."""
    noise_device = device if generator is None else generator.device
    return torch.randn(channels, height, width, generator=generator, device=noise_device).to(device)


@torch.no_grad()
def draw_latent(
    model,  # a DuetGen (duetgen.models.duetgen): its dit, vae, config, device and pixel_multiple are used
    cond_frames: Sequence[Tensor],  # clean latents (C, h_i, w_i) of every earlier image, oldest first
    text_pos: Tensor,  # (L, D_cross): the connector's output for every token before the <BOV>
    text_neg: Tensor | None,  # (L', D_cross) guidance negative (a prefix of text_pos); unused when w = 1
    *,
    size: tuple[int, int],  # (height, width) in pixels, multiples of model.pixel_multiple
    generator: torch.Generator | None,
    sampler: SamplerConfig,
    guidance_scale: float,  # w in v_neg + w (v_pos - v_neg); 1 = no guidance (one branch per step)
    callback: StepCallback | None = None,  # callback(step, num_steps, t, x) after each sampler step
    dit: Callable | None = None,  # the DiT call (default model.dit); BatchedEngine packs it with other answers'
) -> Tensor:
    """Draw one image's latent (C, h, w): one packed DiT call per sampler step (module docstring)."""
    config = model.config
    if len(cond_frames) + 1 > config.max_images:
        raise ValueError(f"{len(cond_frames)} conditioning images + the new one exceed max_images={config.max_images}")
    height, width = size
    multiple = model.pixel_multiple
    if height % multiple or width % multiple:
        raise ValueError(f"size {height}x{width} is not a multiple of {multiple} (autoencoder factor x DiT patch); "
                         f"use DuetGen.generation_size")
    device = model.device
    network = model.dit if dit is None else dit

    # 1. noise
    f = model.vae.spatial_factor
    noise = initial_noise(model.dit.latent_channels, height // f, width // f, generator, device)  # (C, h, w)

    # 2. conditioning frames
    cond = [c.to(device) for c in cond_frames] if config.use_condition_frames else []

    # 3. the network's x0, relative to the previous canvas when trained so
    previous = None
    if config.x0_relative_to_previous:
        previous = previous_canvas(cond, lambda: white_canvas_latent(model.vae, height, width, device).to(noise))
        if previous.shape[-2:] != noise.shape[-2:]:  # the earlier image has another size than the one asked for
            previous = resized_canvas(model.vae, previous, height, width).to(noise)

    # 4. the text is the same at every step: every block's cross-attention keys and values of it, once, the
    #    first time the guidance passes it (it passes the same text_pos / text_neg objects at every step; each
    #    is kept beside its projection, so its id cannot be reused by another tensor)
    projected: dict[int, tuple[Tensor, object]] = {}

    def project(text: Tensor):
        if id(text) not in projected:
            projected[id(text)] = (text, model.dit.project_text(text))
        return projected[id(text)][1]

    def target_output(**inputs) -> list[list[Tensor]]:  # per sample: [raw output of the target frame]
        inputs["text"] = [project(text) for text in inputs["text"]]
        out = network(**inputs, targets_only=True)
        return [[network_x0(sample_out[-1], previous)] for sample_out in out]

    # 5. guidance, 6. the sampler
    denoise = guided_denoiser(target_output, cond, text_pos, text_neg, guidance_scale, config.parameterisation,
                              condition_time=config.condition_frame_time)
    return sample(denoise, noise, sampler, callback)  # (C, h, w)
