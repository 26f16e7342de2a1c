"""Rectified flow: time sampling, training examples, output parameterisations and the loss.

The convention everywhere in DuetGen (DESIGN section 6):

    x_t = (1 - t) * x0 + t * noise,   t in [0, 1],   t = 0 clean, t = 1 pure noise
    v   = dx_t/dt = noise - x0        (the velocity; sampling integrates from t = 1 down to t = 0)

so that, for any x_t, t:  x0 = x_t - t * v  and  noise = x_t + (1 - t) * v.

Design choices:
- The process lives here, outside the network (STYLE principle 5): the DiT receives x_t and the flow
  time t in [0, 1] per frame and returns a raw tensor; `to_x0_and_velocity` says what that tensor means.
- Three parameterisations of the raw output, one conversion function used by the loss and the samplers:
    "velocity": raw = v.
    "x0":       raw = x0_hat; v_hat = (x_t - x0_hat) / t. The calibration run (docs/diffusion.md,
                notes/shapeworld-calibration.md) found a tiny from-scratch DiT on 768-value tokens only
                produced clean canvases this way; velocity-predicted samples stayed noisy.
    "cosmos":   the EDM preconditioning of diffusers' Cosmos-Predict2 pipeline
                (`pipeline_cosmos2_text2image.py`): sigma = t / (1 - t) (equivalently t = sigma / (1 + sigma)),
                x_sigma = x0 + sigma * noise = x_t / (1 - t), c_in = c_skip = 1 - t, c_out = -t, the network
                sees c_in * x_sigma = x_t and timestep t, and x0_hat = c_skip * x_sigma + c_out * raw
                = x_t - t * raw. So the raw output IS the velocity, which is also exactly what
                Cosmos-Predict2.5 (`pipeline_cosmos2_5_predict.py`, UniPC with flow_prediction, timestep =
                flow sigma in [0, 1]) assumes. Pretrained Cosmos weights are therefore used with x_t and t
                as they are; "cosmos" is kept as its own name so that this equivalence is written down
                and tested (tests/test_flow_matching.py) rather than assumed.
- The loss is the velocity MSE for every parameterisation. For "x0" the velocity error
  (x0 - x0_hat) / t is computed with the divisor clamped at t >= min_t (0.05, as measured): the loss is
  ||x0_hat - x0||^2 / max(t, 0.05)^2, i.e. the velocity loss for t >= 0.05 and a weight capped at 400
  below, which keeps near-clean examples from dominating. Both the prediction and the target use the
  same clamped divisor, so the optimum is still x0_hat = E[x0 | x_t].
- Time sampling: uniform, logit-normal (SD3), then an optional SD3 / Wan shift (formulas below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Parameterisation = Literal["velocity", "x0", "cosmos"]
PARAMETERISATIONS: tuple[str, ...] = ("velocity", "x0", "cosmos")
TimeDistribution = Literal["uniform", "logit_normal"]


@dataclass
class FlowMatchingConfig:
    parameterisation: Parameterisation = "velocity"  # what the network's raw output means (see module doc)
    time_distribution: TimeDistribution = "logit_normal"  # training time density before the shift
    logit_mean: float = 0.0  # logit-normal: t = sigmoid(m + s * n), n ~ N(0, 1) (SD3 uses m=0, s=1)
    logit_std: float = 1.0
    time_shift: float = 1.0  # s in t' = s t / (1 + (s - 1) t); > 1 moves training time towards noise
    x0_min_t: float = 0.05  # "x0" only: velocity divisor clamped at t >= this (calibration note)


def check_parameterisation(parameterisation: str) -> None:
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {parameterisation!r}; expected one of {PARAMETERISATIONS}")


# ----------------------------------------------------------------------------- time


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Wan time shift: t' = s t / (1 + (s - 1) t).

    Monotone, fixes 0 and 1; s > 1 spends more of the time budget near noise (what higher
    resolutions need: SD3's resolution-dependent shifting). Same formula as diffusers' `flow_shift`
    in UniPCMultistepScheduler and `shift` in FlowMatchEulerDiscreteScheduler.
    """
    if shift <= 0:
        raise ValueError(f"time shift must be > 0; got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_time(
    n: int,
    config: FlowMatchingConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw n training times in (0, 1).

    uniform:       t ~ U(0, 1)
    logit_normal:  t = sigmoid(logit_mean + logit_std * n),  n ~ N(0, 1)
                   (density peaks at sigmoid(logit_mean); SD3's best setting was mean 0, std 1)
    then the shift t <- s t / (1 + (s - 1) t) when config.time_shift != 1.
    """
    if config.time_distribution == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif config.time_distribution == "logit_normal":
        if config.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0; got {config.logit_std}")
        normal = torch.randn(n, generator=generator, device=device)
        t = torch.sigmoid(config.logit_mean + config.logit_std * normal)
    else:
        raise ValueError(
            f"unknown time_distribution {config.time_distribution!r}; expected 'uniform' or 'logit_normal'"
        )
    if config.time_shift != 1.0:
        t = shift_time(t, config.time_shift)
    return t


def edm_sigma_from_time(t: torch.Tensor) -> torch.Tensor:
    """Cosmos / EDM noise level for flow time t: sigma = t / (1 - t) (x_sigma = x0 + sigma * noise)."""
    return t / (1 - t)


def time_from_edm_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of edm_sigma_from_time: t = sigma / (1 + sigma) (the `current_t` of the Cosmos pipelines)."""
    return sigma / (1 + sigma)


def _expand_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Make t broadcast against `like`: t of shape `like.shape[:k]` gets k trailing singleton dims."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim > like.ndim or tuple(like.shape[: t.ndim]) != tuple(t.shape):
        raise ValueError(
            f"time of shape {tuple(t.shape)} does not match the leading dims of a tensor of shape {tuple(like.shape)}"
        )
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


# ----------------------------------------------------------------------------- training examples


def make_training_example(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v) with x_t = (1 - t) x0 + t noise and v = noise - x0.

    x0, noise: same shape, e.g. (B, C, h, w) with t (B,), or one latent (C, h, w) with a scalar t.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    tt = _expand_time(t, x0)
    x_t = (1 - tt) * x0 + tt * noise
    return x_t, noise - x0


def to_x0_and_velocity(
    raw: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | float,
    parameterisation: Parameterisation,
    min_t: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a raw network output as (x0_hat, v_hat) at (x_t, t).

    min_t clamps the divisor of the x0 -> velocity conversion: v_hat = (x_t - x0_hat) / max(t, min_t).
    Samplers use the default 0 (they never evaluate at t = 0, and the exact division is what makes
    guidance in x0 space and in velocity space the same thing); `flow_matching_loss` applies its
    0.05 clamp to prediction and target alike.
    """
    check_parameterisation(parameterisation)
    tt = _expand_time(t, x_t)
    raw = raw.to(x_t.dtype)
    if parameterisation == "velocity":
        v_hat = raw
        x0_hat = x_t - tt * v_hat
    elif parameterisation == "x0":
        x0_hat = raw
        v_hat = (x_t - x0_hat) / tt.clamp(min=min_t)
    else:  # "cosmos": EDM preconditioning, c_skip * x_sigma = (1 - t) * x_t / (1 - t) = x_t, c_out = -t
        c_out = -tt
        x0_hat = x_t + c_out * raw  # = c_skip * x_sigma + c_out * raw, finite at t = 1
        v_hat = raw  # because x0_hat = x_t - t * raw
    return x0_hat, v_hat


def raw_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float, parameterisation: Parameterisation
) -> torch.Tensor:
    """What a perfect network outputs for this (x0, noise, t): the inverse of `to_x0_and_velocity`."""
    check_parameterisation(parameterisation)
    if parameterisation == "x0":
        return x0.clone()
    _expand_time(t, x0)  # shape check only: velocity and cosmos targets do not depend on t
    return noise - x0


def flow_matching_loss(
    raw: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor | float,
    parameterisation: Parameterisation,
    x0_min_t: float = 0.05,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Velocity MSE, averaged over every dim after t's: (B,) for t of shape (B,), a scalar for a scalar t.

    velocity / cosmos: mean((v_hat - (noise - x0))^2)
    x0:                mean(((x0 - x0_hat) / max(t, x0_min_t))^2)   (= the velocity error for t >= x0_min_t)

    ``weight`` (broadcastable to x0, >= 0) makes it a weighted mean: sum(w * err^2) / sum(w), so the
    loss keeps its scale whatever the weights (stage 2's emphasis on the pixels an image changes).
    """
    check_parameterisation(parameterisation)
    if raw.shape != x0.shape:
        raise ValueError(f"network output {tuple(raw.shape)} and x0 {tuple(x0.shape)} must have the same shape")
    # The loss is computed in at least float32, whatever precision the network ran in.
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x0, noise, raw = x0.to(dtype), noise.to(dtype), raw.to(dtype)
    x_t, v = make_training_example(x0, noise, t)
    if parameterisation == "x0":
        # Prediction and target through the same clamped divisor: (x_t - x0_hat)/d - (x_t - x0)/d.
        x0_hat, _ = to_x0_and_velocity(raw, x_t, t, "x0")
        error = (x0 - x0_hat) / _expand_time(t, x0).clamp(min=x0_min_t)
    else:
        _, v_hat = to_x0_and_velocity(raw, x_t, t, parameterisation)
        error = v_hat - v
    t_dims = torch.as_tensor(t).ndim
    if weight is None:
        return error.pow(2).flatten(t_dims).mean(-1)
    weight = weight.to(dtype).expand_as(error)
    return (weight * error.pow(2)).flatten(t_dims).sum(-1) / weight.flatten(t_dims).sum(-1).clamp(min=1e-12)



# ----------------------------------------------------------------------------- what the DiT sees for one sample

# Flow time of the clean conditioning frames (DESIGN section 5: "timestep ~0"). 0 states the meaning:
# these frames are data, not noise; our training uses it (train/stage2.py) and so do our checkpoints.
# Cosmos-Predict2.5 was trained and is sampled with 1e-4 (diffusers' `conditional_frame_timestep`), so
# a pretrained Cosmos DiT is run with that value (DuetGenConfig.condition_frame_time, docs/model.md).
CONDITION_FRAME_TIME = 0.0
COSMOS_CONDITION_FRAME_TIME = 1e-4


def dit_sample_inputs(
    cond_frames: list[torch.Tensor], target: torch.Tensor, t: torch.Tensor | float,
    condition_time: float = CONDITION_FRAME_TIME,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One sample of the packed DiT call: (frames, per-frame times, condition mask).

    cond_frames: clean latents (C, h_i, w_i) of every earlier image, oldest first; target: the noisy
    latent x_t (C, h, w) at time t. Returns frames = [*cond_frames, target], times (n,) with
    `condition_time` for the conditions and t for the target, mask (n,) True for the conditions.
    """
    if target.ndim != 3:
        raise ValueError(f"the target latent must be (C, h, w); got shape {tuple(target.shape)}")
    for i, frame in enumerate(cond_frames):
        if frame.ndim != 3 or frame.shape[0] != target.shape[0]:
            raise ValueError(
                f"conditioning frame {i} must be (C={target.shape[0]}, h, w); got shape {tuple(frame.shape)}"
            )
    n_cond = len(cond_frames)
    t = torch.as_tensor(t, dtype=torch.float32, device=target.device).reshape(1)
    times = torch.cat([torch.full((n_cond,), float(condition_time), device=target.device), t])  # (n,)
    mask = torch.arange(n_cond + 1, device=target.device) < n_cond  # (n,) True = clean condition
    return [*cond_frames, target], times, mask
