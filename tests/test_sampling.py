"""Samplers on cases with a known answer, and guidance with the DuetGen negative in one packed call.

Analytic cases (noise ~ N(0, 1), x_t = (1 - t) x0 + t noise):
- data = one point p: the exact velocity is v(x, t) = (x - p) / t, and any schedule of Euler steps
  lands exactly on p (each step keeps x on the straight line to p).
- data = N(mu, s^2): E[v | x_t = x] = -mu + (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2) * (x - (1 - t) mu),
  and the exact ODE carries the noise z at t = 1 to mu + s z at t = 0, per sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from torch import nn

from duetgen.diffusion.flow_matching import to_x0_and_velocity
from duetgen.diffusion.guidance import guided_denoiser
from duetgen.diffusion.sampling import euler_sample, sample, unipc_sample
from duetgen.diffusion.schedules import SamplerConfig, flow_time_schedule, karras_time_schedule

torch.set_num_threads(1)
MU, S = 1.5, 0.3


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -MU + (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2) * (x - (1 - t) * MU)


def noise(n: int = 4000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- schedules


def test_flow_schedule():
    schedule = flow_time_schedule(4)
    torch.testing.assert_close(schedule, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = flow_time_schedule(4, shift=3.0)
    torch.testing.assert_close(shifted, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        flow_time_schedule(0)


def test_karras_schedule_is_cosmos_predict2_5s():
    """Same times diffusers' converted Cosmos-Predict2.5 pipeline samples at."""
    scheduler = UniPCMultistepScheduler(
        use_karras_sigmas=True, use_flow_sigmas=True, prediction_type="flow_prediction", sigma_max=200.0, sigma_min=0.01
    )
    scheduler.set_timesteps(12)
    ours = karras_time_schedule(12)
    torch.testing.assert_close(ours.float(), scheduler.sigmas.float(), rtol=1e-6, atol=1e-7)
    assert ours[0] == pytest.approx(200 / 201) and ours[-1] == 0


# ----------------------------------------------------------------------------- analytic cases


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (3, 1.0), (7, 3.0), (20, 0.5)])
def test_point_mass_lands_exactly(solver, num_steps, shift):
    p = torch.tensor([[0.7, -2.0, 3.0]], dtype=torch.float64)
    config = SamplerConfig(solver=solver, num_steps=num_steps, shift=shift)
    x = sample(lambda x, t: (x - p) / t, noise(3).view(1, 3), config)
    torch.testing.assert_close(x, p, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "solver,num_steps,max_error",
    [("euler", 10, 0.25), ("euler", 40, 0.065), ("unipc", 10, 0.07), ("unipc", 20, 0.01)],
)
def test_gaussian_data(solver, num_steps, max_error):
    z = noise()
    x = sample(gaussian_velocity, z, SamplerConfig(solver=solver, num_steps=num_steps))
    exact = MU + S * z
    assert (x - exact).abs().max().item() < max_error
    assert x.mean().item() == pytest.approx(exact.mean().item(), abs=0.01)
    assert x.std().item() == pytest.approx(exact.std().item(), rel=max_error / S)


def test_convergence_orders():
    """Euler is first order (error halves with twice the steps); UniPC is far better at equal cost."""
    z = noise(2000)
    exact = MU + S * z

    def error(solver, n):
        return (sample(gaussian_velocity, z, SamplerConfig(solver=solver, num_steps=n)) - exact).abs().max().item()

    e10, e20 = error("euler", 10), error("euler", 20)
    assert 1.7 < e10 / e20 < 2.3
    assert error("unipc", 10) < e10 / 3


def test_karras_schedule_samples_the_gaussian():
    z = noise()
    # The Cosmos schedule starts at t = 200/201, so start from that marginal: x = (1 - t) mu + sqrt(...) z.
    schedule = karras_time_schedule(36)  # Cosmos-Predict2.5's default step count
    t0 = schedule[0]
    x_start = (1 - t0) * MU + torch.sqrt((1 - t0) ** 2 * S**2 + t0**2) * z
    x = unipc_sample(gaussian_velocity, x_start, schedule)
    assert (x - (MU + S * z)).abs().max().item() < 0.015
    assert x.std().item() == pytest.approx(S, abs=0.01)


def test_callback_and_batched_shapes():
    seen = []
    p = torch.full((2, 4, 3, 3), 0.5)
    for solver in ["euler", "unipc"]:
        seen.clear()
        out = sample(
            lambda x, t: (x - p) / t,
            torch.randn(2, 4, 3, 3),
            SamplerConfig(solver=solver, num_steps=5),
            callback=lambda i, n, t, x: seen.append((i, n, t, x.clone())),
        )
        assert [s[:2] for s in seen] == [(i, 5) for i in range(5)]
        times = [s[2] for s in seen]
        assert times == sorted(times, reverse=True) and times[0] > 0.99 and times[-1] == pytest.approx(0.2)
        assert torch.equal(seen[-1][3], out) and out.shape == (2, 4, 3, 3) and out.dtype == torch.float32
        torch.testing.assert_close(out, p, rtol=0, atol=1e-5)


def test_bad_schedules_rejected():
    f = lambda x, t: x  # noqa: E731
    for bad in [torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5, 0.7, 0.0]), torch.tensor([1.5, 0.0])]:
        with pytest.raises(ValueError, match="schedule"):
            euler_sample(f, torch.zeros(2), bad)
    with pytest.raises(ValueError, match="unknown solver"):
        sample(f, torch.zeros(2), SamplerConfig(solver="heun"))


# ----------------------------------------------------------------------------- guidance

C, D = 3, 8  # latent channels, text width


class PointOracleDiT(nn.Module):
    """A stand-in with the packed DiT's list API whose answer is known exactly.

    For each sample it treats the data as one point p = (first conditioning frame, or 0) + a
    per-channel offset read from the sample's own text (the mean of its tokens), and returns the exact
    raw output for that point at the target's time: the velocity (x_t - p) / t, or p itself for "x0".
    Conditioning frames are passed through unchanged. Every call's arguments are recorded.
    """

    def __init__(self, parameterisation: str):
        super().__init__()
        self.parameterisation = parameterisation
        self.calls: list[dict] = []

    def point(self, frames, condition_mask, text):
        cond = [f for f, is_cond in zip(frames, condition_mask.tolist()) if is_cond]
        base = cond[0] if cond else torch.zeros_like(frames[-1])
        return base + text.mean(0)[:C].view(C, 1, 1).to(base.dtype)

    def forward(self, frames, timesteps, condition_mask, text):
        self.calls.append(dict(frames=frames, timesteps=timesteps, condition_mask=condition_mask, text=text))
        out = []
        for sample_frames, times, mask, sample_text in zip(frames, timesteps, condition_mask, text):
            p = self.point(sample_frames, mask, sample_text)
            x_t, t = sample_frames[-1], times[-1]
            raw = p if self.parameterisation == "x0" else (x_t - p) / t
            out.append([*sample_frames[:-1], raw])
        return out


def conditions(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond_frames = [torch.randn(C, 4, 4, generator=g), torch.randn(C, 2, 6, generator=g)]
    text_pos = torch.randn(7, D, generator=g)
    return cond_frames, text_pos


@pytest.mark.parametrize("parameterisation", ["velocity", "x0", "cosmos"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guided_sampling_lands_on_the_extrapolated_point(parameterisation, scale):
    """Guidance on two point masses: v = v_neg + w (v_pos - v_neg) carries the noise to p_neg + w (p_pos - p_neg)."""
    cond_frames, text_pos = conditions()
    text_neg = text_pos[:4]
    dit = PointOracleDiT(parameterisation)
    denoise = guided_denoiser(dit, cond_frames, text_pos, text_neg, scale, parameterisation)
    x = sample(denoise, torch.randn(C, 4, 4), SamplerConfig(solver="euler", num_steps=6, shift=2.0))
    mask = torch.tensor([True, True, False])
    p_pos = dit.point([*cond_frames, x], mask, text_pos)
    p_neg = dit.point([*cond_frames, x], mask, text_neg)
    torch.testing.assert_close(x, p_neg + scale * (p_pos - p_neg), rtol=0, atol=1e-4)
    assert len(dit.calls) == 6
    assert all(len(call["frames"]) == (1 if scale == 1.0 else 2) for call in dit.calls)


def test_batched_guidance_equals_two_separate_calls():
    cond_frames, text_pos = conditions(1)
    text_neg = text_pos[:3]
    dit = PointOracleDiT("velocity")
    x_t, t = torch.randn(C, 4, 4), torch.tensor(0.6)
    v = guided_denoiser(dit, cond_frames, text_pos, text_neg, 2.5, "velocity")(x_t, t)
    v_pos = guided_denoiser(dit, cond_frames, text_pos, None, 1.0, "velocity")(x_t, t)
    v_neg = guided_denoiser(dit, cond_frames, text_neg, None, 1.0, "velocity")(x_t, t)
    torch.testing.assert_close(v, v_neg + 2.5 * (v_pos - v_neg))
    assert (v - v_pos).abs().max() > 0.1  # the negative really differs


def test_negative_keeps_the_frames_and_drops_the_final_chunk():
    cond_frames, text_pos = conditions(2)
    dit = PointOracleDiT("x0")
    denoise = guided_denoiser(dit, cond_frames, text_pos, text_pos[:5], 2.0, "x0")
    x_t = torch.randn(C, 4, 4)
    denoise(x_t, torch.tensor(0.3))
    (call,) = dit.calls
    pos_frames, neg_frames = call["frames"]
    assert len(pos_frames) == len(neg_frames) == 3
    for a, b, c in zip(pos_frames, neg_frames, [*cond_frames, x_t]):
        assert torch.equal(a, b) and torch.equal(a, c)
    for times, mask in zip(call["timesteps"], call["condition_mask"]):
        torch.testing.assert_close(times, torch.tensor([0.0, 0.0, 0.3]))
        assert mask.tolist() == [True, True, False]
    assert torch.equal(call["text"][0], text_pos) and torch.equal(call["text"][1], text_pos[:5])


def test_guided_denoiser_errors():
    cond_frames, text_pos = conditions()
    with pytest.raises(ValueError, match="needs a negative text"):
        guided_denoiser(PointOracleDiT("x0"), cond_frames, text_pos, None, 2.0, "x0")
    with pytest.raises(ValueError, match="text_neg must be"):
        guided_denoiser(PointOracleDiT("x0"), cond_frames, text_pos, torch.zeros(3, D + 1), 2.0, "x0")
    with pytest.raises(ValueError, match="unknown parameterisation"):
        guided_denoiser(PointOracleDiT("x0"), cond_frames, text_pos, None, 1.0, "eps")

def test_x0_guidance_in_velocity_space_equals_x0_space():
    """For 'x0' outputs, guiding the velocity equals guiding x0_hat (exact division at t > 0)."""
    cond_frames, text_pos = conditions(3)
    text_neg = text_pos[:2]
    dit = PointOracleDiT("x0")
    x_t, t = torch.randn(C, 4, 4), torch.tensor(0.02)  # below the training clamp of 0.05
    v = guided_denoiser(dit, cond_frames, text_pos, text_neg, 4.0, "x0")(x_t, t)
    out = dit(frames=[[*cond_frames, x_t]] * 2, timesteps=[torch.tensor([0.0, 0.0, 0.02])] * 2,
              condition_mask=[torch.tensor([True, True, False])] * 2, text=[text_pos, text_neg])
    x0_guided = out[1][-1] + 4.0 * (out[0][-1] - out[1][-1])
    _, v_expected = to_x0_and_velocity(x0_guided, x_t, t, "x0")
    torch.testing.assert_close(v, v_expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- with the real packed DiT (tiny config)


@pytest.fixture(scope="module")
def tiny_dit():
    from diffusers import CosmosTransformer3DModel

    from duetgen.models.video_dit import PackedCosmosDiT, tiny_cosmos_config

    torch.manual_seed(0)
    return PackedCosmosDiT(CosmosTransformer3DModel(**tiny_cosmos_config())).eval()


def test_real_dit_packed_guidance_equals_separate_calls(tiny_dit):
    """Positive and negative (different text lengths) in one packed call == two single-sample calls."""
    c, d = tiny_dit.latent_channels, tiny_dit.text_channels
    g = torch.Generator().manual_seed(5)
    cond_frames = [torch.randn(c, 8, 8, generator=g), torch.randn(c, 4, 12, generator=g)]  # mixed sizes
    text_pos = torch.randn(11, d, generator=g)
    text_neg = text_pos[:4]
    x_t, t = torch.randn(c, 8, 8, generator=g), torch.tensor(0.7)
    for parameterisation in ["velocity", "x0", "cosmos"]:
        with torch.no_grad():
            v = guided_denoiser(tiny_dit, cond_frames, text_pos, text_neg, 3.0, parameterisation)(x_t, t)
            v_pos = guided_denoiser(tiny_dit, cond_frames, text_pos, None, 1.0, parameterisation)(x_t, t)
            v_neg = guided_denoiser(tiny_dit, cond_frames, text_neg, None, 1.0, parameterisation)(x_t, t)
        torch.testing.assert_close(v, v_neg + 3.0 * (v_pos - v_neg), rtol=1e-4, atol=1e-5)
        assert (v_pos - v_neg).abs().max() > 1e-4  # the dropped chunk changes the prediction


def test_real_dit_sampling_end_to_end(tiny_dit):
    c, d = tiny_dit.latent_channels, tiny_dit.text_channels
    g = torch.Generator().manual_seed(6)
    cond_frames = [torch.randn(c, 8, 8, generator=g)]
    text_pos = torch.randn(9, d, generator=g)
    steps = []
    for solver in ["euler", "unipc"]:
        denoise = guided_denoiser(tiny_dit, cond_frames, text_pos, text_pos[:3], 2.0, "velocity")
        x = sample(denoise, torch.randn(c, 8, 12, generator=g), SamplerConfig(solver=solver, num_steps=4),
                   callback=lambda i, n, t, x: steps.append(i))
        assert x.shape == (c, 8, 12) and torch.isfinite(x).all()
    assert steps == [0, 1, 2, 3] * 2
