"""Classifier-free guidance with DuetGen's negative, in one batched DiT call.

The paper (section 4): "when generating the negative velocity, we keep the visual conditions fixed but
remove the final text chunk from the MLLM hidden-state sequence". Because the MLLM is causal, the hidden
states of a prefix do not depend on what follows, so the negative text condition is a prefix slice of
the positive one: no second MLLM pass (DESIGN section 4).

Design choices:
- The positive and the negative are two samples of ONE packed DiT call (DESIGN section 7: "positive
  and negative in one batch"); their texts may differ in length, which is what the packed DiT's
  per-sample lists are for. Both samples carry the same conditioning frames and the same x_t.
- The combination is written in velocity space: v = v_neg + w * (v_pos - v_neg). For a fixed (x_t, t)
  each parameterisation's velocity is an affine function of the raw output, so this equals guiding
  x0_hat or the raw output directly (samplers evaluate at t > 0 and convert without clamping).
- Scale convention. Ours: v = v_uncond + w * (v_cond - v_uncond); w = 1 is no guidance (a single
  branch call), w > 1 extrapolates away from the negative. diffusers' Cosmos pipelines write
  v = v_cond + g * (v_cond - v_uncond) = (1 + g) v_cond - g v_uncond, so  w = g + 1  (Cosmos'
  default g = 7 is our w = 8; their g = 0 is our w = 1).
"""

from __future__ import annotations

import torch
from torch import nn

from duetgen.diffusion.flow_matching import (
    CONDITION_FRAME_TIME,
    Parameterisation,
    check_parameterisation,
    dit_sample_inputs,
    to_x0_and_velocity,
)
from duetgen.diffusion.sampling import Denoiser


def guided_denoiser(
    dit: nn.Module,
    cond_frames: list[torch.Tensor],
    text_pos: torch.Tensor,
    text_neg: torch.Tensor | None,
    guidance_scale: float,
    parameterisation: Parameterisation,
    condition_time: float = CONDITION_FRAME_TIME,
) -> Denoiser:
    """Build `denoise(x_t (C, h, w), t) -> v_hat` for the samplers, for one image to draw.

    dit: the packed DiT, called as dit(frames=, timesteps=, condition_mask=, text=) with per-sample lists
    and returning per-sample lists of per-frame outputs; the last frame is the target.
    cond_frames: clean latents (C, h_i, w_i) of every earlier image, oldest first (kept in BOTH branches).
    text_pos: (L, D) text condition after the connector; text_neg: (L', D), normally its prefix without the
    final text chunk (`duetgen.models.mllm.final_text_chunk_start`).
    guidance_scale: w in v = v_neg + w * (v_pos - v_neg); w = 1 makes a single positive-only call and
    ignores text_neg (may be None): the one place that decides "w = 1 means no negative".
    Cosmos' g (v = v_pos + g * (v_pos - v_neg)) is w - 1.
    Frames are cast to text_pos's dtype for the DiT; v_hat comes back in x_t's dtype.
    condition_time: flow time of the conditioning frames (0 ours, 1e-4 for a pretrained Cosmos DiT).
    """
    check_parameterisation(parameterisation)
    if text_pos.ndim != 2 or text_pos.shape[0] < 1:
        raise ValueError(f"text_pos must be a non-empty (L, D) tensor; got shape {tuple(text_pos.shape)}")
    guided = guidance_scale != 1.0
    if guided:
        if text_neg is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs a negative text (text_neg is None)")
        if text_neg.ndim != 2 or text_neg.shape[0] < 1 or text_neg.shape[1] != text_pos.shape[1]:
            raise ValueError(
                f"text_neg must be a non-empty (L', D={text_pos.shape[1]}) tensor; got shape {tuple(text_neg.shape)}"
            )
    dtype = text_pos.dtype
    cond = [frame.to(dtype) for frame in cond_frames]

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        frames, times, mask = dit_sample_inputs(cond, x_t.to(dtype), t, condition_time)
        if not guided:
            out = dit(frames=[frames], timesteps=[times], condition_mask=[mask], text=[text_pos])
            _, v_pos = to_x0_and_velocity(out[0][-1], x_t, t, parameterisation)
            return v_pos
        # Positive and negative as two samples of one packed call: same frames, same x_t, same times.
        out = dit(
            frames=[frames, frames],
            timesteps=[times, times],
            condition_mask=[mask, mask],
            text=[text_pos, text_neg],
        )
        _, v_pos = to_x0_and_velocity(out[0][-1], x_t, t, parameterisation)
        _, v_neg = to_x0_and_velocity(out[1][-1], x_t, t, parameterisation)
        return v_neg + guidance_scale * (v_pos - v_neg)

    return denoise
