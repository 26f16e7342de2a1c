"""Flow-time schedules and the settings that pick a sampler: plain data, no network, no solver.

A checkpoint records its drawing defaults as a `SamplerConfig` (duetgen.json `settings.sampler`), so the
model package reads this file; the solvers that integrate the flow live in `duetgen.diffusion.sampling`.

- A schedule is a decreasing tensor of flow times from 1 to exactly 0, with num_steps + 1 entries;
  the network is evaluated at the first num_steps of them (never at t = 0, where an "x0"
  parameterisation would divide by zero).
  - "flow":   t_i = shift(1 - i / n) with the SD3 / Wan shift s t / (1 + (s - 1) t) (Wan uses s = 3-5
              at 480-720p; the 64x64 ShapeWorld needs none).
  - "karras": Cosmos-Predict2.5's schedule: EDM Karras sigmas (rho = 7) from sigma_max = 200 to
              sigma_min = 0.01, mapped to flow time t = sigma / (1 + sigma), then a final 0. It is the
              schedule diffusers' converted Cosmos-Predict2.5 pipeline gets from
              `UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True, sigma_max=200, sigma_min=0.01)`
              (tested), so pretrained Cosmos weights are sampled as they were released.
- Default 20 steps: the calibration run found 10 steps nearly as good as 50 on ShapeWorld.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SOLVERS = ("euler", "unipc")
SCHEDULES = ("flow", "karras")


@dataclass
class SamplerConfig:
    solver: Literal["euler", "unipc"] = "euler"  # unipc is more accurate at few steps, same cost per step
    num_steps: int = 20  # network calls per image; 10 was nearly as good as 50 on ShapeWorld (calibration)
    schedule: Literal["flow", "karras"] = "flow"  # "karras" = Cosmos-Predict2.5's released schedule
    shift: float = 1.0  # "flow" schedule only: SD3 / Wan shift s (>1 spends more steps near noise)
    unipc_order: int = 2  # diffusers recommends 2 for guided sampling


# ----------------------------------------------------------------------------- schedules


def flow_time_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """(num_steps + 1,) float64 times from 1 to 0: t_i = s u / (1 + (s - 1) u), u = 1 - i / num_steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * u / (1 + (shift - 1) * u)


def karras_time_schedule(
    num_steps: int, sigma_min: float = 0.01, sigma_max: float = 200.0, rho: float = 7.0
) -> torch.Tensor:
    """(num_steps + 1,) float64: EDM Karras sigmas mapped to t = sigma / (1 + sigma), then 0.

    sigma_i = (sigma_max^(1/rho) + i / (n - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < n.
    Defaults are Cosmos-Predict2.5's (diffusers scripts/convert_cosmos_to_diffusers.py).
    """
    if num_steps < 2:
        raise ValueError(f"the karras schedule needs num_steps >= 2; got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas / (1 + sigmas), torch.zeros(1, dtype=torch.float64)])


def make_schedule(config: SamplerConfig) -> torch.Tensor:
    if config.schedule == "flow":
        return flow_time_schedule(config.num_steps, config.shift)
    if config.schedule == "karras":
        return karras_time_schedule(config.num_steps)
    raise ValueError(f"unknown schedule {config.schedule!r}; expected 'flow' or 'karras'")


def check_schedule(schedule: torch.Tensor) -> None:
    if schedule.ndim != 1 or len(schedule) < 2:
        raise ValueError(f"a schedule is a 1-D tensor of at least 2 times; got shape {tuple(schedule.shape)}")
    if not bool((schedule[1:] < schedule[:-1]).all()):
        raise ValueError("a schedule must be strictly decreasing (from noise at t <= 1 to data at t = 0)")
    if schedule[0] > 1 or schedule[-1] != 0:
        raise ValueError(f"a schedule must start at t <= 1 and end at exactly 0; got {schedule[0]} .. {schedule[-1]}")
