"""Samplers: integrate the flow from t = 1 (noise) to t = 0 (data) with a `denoise(x_t, t) -> v_hat` callable.

Design choices:
- A sampler knows nothing about the network, the text or the guidance: it receives one callable
  returning the velocity v_hat = noise - x0 at (x_t, t) (built by `guidance.guided_denoiser`, or any
  function in tests), so the analytic tests exercise exactly the code that draws real images.
- Schedules and `SamplerConfig` are `duetgen.diffusion.schedules` (plain data a checkpoint records).
- Two solvers behind one interface:
  - "euler": x_{i+1} = x_i + (t_{i+1} - t_i) * v_hat(x_i, t_i). First order, one network call a step.
  - "unipc": diffusers' `UniPCMultistepScheduler` configured for flow matching as the Wan and Cosmos
    pipelines do (`use_flow_sigmas=True, prediction_type="flow_prediction"`), fed our schedule through
    `set_timesteps(sigmas=...)` with `flow_shift=1` (the shift is already in the schedule). Multistep
    order 2 with the UniC corrector: also one network call a step, more accurate for few steps.
- `callback(step, num_steps, t, x)` runs after every step with the updated state, for progress events.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from duetgen.diffusion.schedules import SamplerConfig, check_schedule, make_schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t 0-dim) -> v_hat, same shape as x_t
StepCallback = Callable[[int, int, float, torch.Tensor], None]  # (step, num_steps, t, x after the step)


# ----------------------------------------------------------------------------- solvers


@torch.no_grad()
def euler_sample(
    denoise: Denoiser, noise: torch.Tensor, schedule: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """Euler integration of dx/dt = v_hat(x, t) from schedule[0] to 0, starting at `noise` (x at t=schedule[0])."""
    check_schedule(schedule)
    x = noise
    num_steps = len(schedule) - 1
    for i in range(num_steps):
        t, t_next = schedule[i], schedule[i + 1]
        v_hat = denoise(x, t.to(device=x.device, dtype=x.dtype))  # same shape as x
        x = x + (t_next - t).to(device=x.device, dtype=x.dtype) * v_hat
        if callback is not None:
            callback(i, num_steps, float(t), x)
    return x


@torch.no_grad()
def unipc_sample(
    denoise: Denoiser,
    noise: torch.Tensor,
    schedule: torch.Tensor,
    order: int = 2,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """UniPC multistep (diffusers) over the same schedule; one denoise call per step."""
    from diffusers import UniPCMultistepScheduler

    check_schedule(schedule)
    scheduler = UniPCMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",  # x0 = x_t - sigma * model_output: our velocity, sigma = t
        flow_shift=1.0,  # the shift is already in `schedule`
        solver_order=order,
        final_sigmas_type="zero",
    )
    # The scheduler appends the final 0 itself, and nudges a first t of exactly 1 to 1 - 1e-6
    # (its log(1 - t) would be -inf).
    scheduler.set_timesteps(sigmas=np.asarray(schedule[:-1].tolist()), device=noise.device)
    # The scheduler's multistep update reads dims as (batch, channel, ...): give it a batch of one.
    x = noise.unsqueeze(0)  # (1, *noise.shape)
    num_steps = len(scheduler.timesteps)
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i]
        v_hat = denoise(x[0], t.to(device=x.device, dtype=x.dtype))  # (*noise.shape)
        x = scheduler.step(v_hat.unsqueeze(0), timestep, x, return_dict=False)[0]
        if callback is not None:
            callback(i, num_steps, float(t), x[0])
    return x[0]


def sample(
    denoise: Denoiser, noise: torch.Tensor, config: SamplerConfig, callback: StepCallback | None = None
) -> torch.Tensor:
    """Draw x0 from `noise` (the state at t = 1) with the configured schedule and solver."""
    schedule = make_schedule(config)
    if config.solver == "euler":
        return euler_sample(denoise, noise, schedule, callback)
    if config.solver == "unipc":
        return unipc_sample(denoise, noise, schedule, config.unipc_order, callback)
    raise ValueError(f"unknown solver {config.solver!r}; expected 'euler' or 'unipc'")
