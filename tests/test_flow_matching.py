"""Rectified-flow training side: time sampling, training examples, parameterisations, loss."""

from __future__ import annotations

import math

import pytest
import torch

from duetgen.diffusion.flow_matching import (
    CONDITION_FRAME_TIME,
    PARAMETERISATIONS,
    FlowMatchingConfig,
    dit_sample_inputs,
    edm_sigma_from_time,
    flow_matching_loss,
    make_training_example,
    raw_target,
    sample_time,
    shift_time,
    time_from_edm_sigma,
    to_x0_and_velocity,
)

torch.set_num_threads(1)


def batch(seed: int = 0, shape=(5, 4, 3, 2)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x0, noise, t


# ----------------------------------------------------------------------------- time sampling


def test_uniform_time():
    t = sample_time(20000, FlowMatchingConfig(time_distribution="uniform"), torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (t < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_logit_normal_time():
    config = FlowMatchingConfig(time_distribution="logit_normal", logit_mean=-0.5, logit_std=0.8)
    t = sample_time(20000, config, torch.Generator().manual_seed(1))
    logits = torch.log(t) - torch.log1p(-t)
    assert logits.mean().item() == pytest.approx(-0.5, abs=0.02)
    assert logits.std().item() == pytest.approx(0.8, abs=0.02)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(0.5)), abs=0.01)


def test_shift_formula_and_shifted_sampling():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    # s t / (1 + (s - 1) t) with s = 3: 0 -> 0, 0.25 -> 0.5, 0.5 -> 0.75, 1 -> 1
    torch.testing.assert_close(shift_time(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(shift_time(t, 1.0), t)
    base = FlowMatchingConfig(time_distribution="uniform")
    shifted = FlowMatchingConfig(time_distribution="uniform", time_shift=3.0)
    a = sample_time(1000, base, torch.Generator().manual_seed(2))
    b = sample_time(1000, shifted, torch.Generator().manual_seed(2))
    torch.testing.assert_close(b, shift_time(a, 3.0))
    assert b.mean() > a.mean() + 0.1  # s > 1 moves training time towards noise
    with pytest.raises(ValueError, match="time shift must be > 0"):
        shift_time(t, 0.0)
    with pytest.raises(ValueError, match="unknown time_distribution"):
        sample_time(3, FlowMatchingConfig(time_distribution="beta"))


def test_edm_sigma_time_mapping():
    t = torch.tensor([0.0, 0.2, 0.5, 0.9], dtype=torch.float64)
    sigma = edm_sigma_from_time(t)
    torch.testing.assert_close(sigma, torch.tensor([0.0, 0.25, 1.0, 9.0], dtype=torch.float64))
    torch.testing.assert_close(time_from_edm_sigma(sigma), t)


# ----------------------------------------------------------------------------- training examples


def test_training_example_interpolates():
    x0, noise, t = batch()
    x_t, v = make_training_example(x0, noise, t)
    for i in range(len(t)):
        torch.testing.assert_close(x_t[i], (1 - t[i]) * x0[i] + t[i] * noise[i])
    torch.testing.assert_close(v, noise - x0)
    # endpoints: t = 0 is the data, t = 1 the noise
    torch.testing.assert_close(make_training_example(x0, noise, torch.zeros(5))[0], x0)
    torch.testing.assert_close(make_training_example(x0, noise, torch.ones(5))[0], noise)
    # one unbatched latent with a scalar time
    x_t1, _ = make_training_example(x0[0], noise[0], 0.3)
    torch.testing.assert_close(x_t1, 0.7 * x0[0] + 0.3 * noise[0])
    with pytest.raises(ValueError, match="does not match"):
        make_training_example(x0, noise, torch.ones(4))


@pytest.mark.parametrize("parameterisation", PARAMETERISATIONS)
def test_conversion_round_trip(parameterisation):
    """The raw output a perfect network gives converts back to the true (x0, v)."""
    x0, noise, t = batch(1)
    x_t, v = make_training_example(x0, noise, t)
    raw = raw_target(x0, noise, t, parameterisation)
    x0_hat, v_hat = to_x0_and_velocity(raw, x_t, t, parameterisation)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(v_hat, v)
    assert flow_matching_loss(raw, x0, noise, t, parameterisation).abs().max() < 1e-20


def test_parameterisations_agree_on_any_output():
    """An arbitrary velocity read as x0 and back, and through the Cosmos formulas, is the same prediction."""
    x0, noise, t = batch(2)
    x_t, _ = make_training_example(x0, noise, t)
    some_v = torch.randn_like(x0)
    x0_from_v, _ = to_x0_and_velocity(some_v, x_t, t, "velocity")
    _, v_from_x0 = to_x0_and_velocity(x0_from_v, x_t, t, "x0")
    torch.testing.assert_close(v_from_x0, some_v)
    x0_c, v_c = to_x0_and_velocity(some_v, x_t, t, "cosmos")
    torch.testing.assert_close(x0_c, x0_from_v)
    torch.testing.assert_close(v_c, some_v)


def test_cosmos_matches_the_diffusers_pipeline_formulas():
    """Recompute Cosmos-Predict2's EDM preconditioning literally (pipeline_cosmos2_text2image.py)."""
    x0, noise, t = batch(3)
    raw = torch.randn_like(x0)  # what the transformer returned
    tt = t.view(-1, 1, 1, 1)
    sigma = tt / (1 - tt)  # EDM noise level of the pipeline's latents
    latents = x0 + sigma * noise  # the pipeline's state x_sigma
    current_t = sigma / (sigma + 1)
    c_in, c_skip, c_out = 1 - current_t, 1 - current_t, -current_t
    x_t, _ = make_training_example(x0, noise, t)
    torch.testing.assert_close(latents * c_in, x_t)  # the network input is our x_t
    torch.testing.assert_close(current_t, tt)  # and its timestep our t
    x0_pipeline = c_skip * latents + c_out * raw
    x0_ours, _ = to_x0_and_velocity(raw, x_t, t, "cosmos")
    torch.testing.assert_close(x0_ours, x0_pipeline)


def test_x0_divisor_clamp():
    x0, noise, _ = batch(4)
    t = torch.tensor([0.01, 0.04, 0.05, 0.3, 0.9], dtype=torch.float64)
    x_t, v = make_training_example(x0, noise, t)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    loss_x0 = flow_matching_loss(x0_hat, x0, noise, t, "x0")
    # the same prediction written as a velocity, scored by the velocity loss
    _, v_hat = to_x0_and_velocity(x0_hat, x_t, t, "x0")
    loss_v = flow_matching_loss(v_hat, x0, noise, t, "velocity")
    torch.testing.assert_close(loss_x0[2:], loss_v[2:])  # identical for t >= 0.05
    squared = (x0_hat - x0).pow(2).flatten(1).mean(-1)
    torch.testing.assert_close(loss_x0[:2], squared[:2] / 0.05**2)  # weight capped at 1 / 0.05^2 below
    assert (loss_x0[:2] < loss_v[:2]).all()
    # the conversion with min_t clamps the same divisor
    _, v_clamped = to_x0_and_velocity(x0_hat, x_t, t, "x0", min_t=0.05)
    torch.testing.assert_close(v_clamped[0], (x_t[0] - x0_hat[0]) / 0.05)


def test_loss_values_and_shapes():
    x0, noise, t = batch(5)
    raw = torch.randn_like(x0)
    loss = flow_matching_loss(raw, x0, noise, t, "velocity")
    assert loss.shape == (5,)
    torch.testing.assert_close(loss, (raw - (noise - x0)).pow(2).mean(dim=(1, 2, 3)))
    scalar = flow_matching_loss(raw[0], x0[0], noise[0], t[0], "velocity")
    assert scalar.shape == () and scalar.item() == pytest.approx(loss[0].item())
    with pytest.raises(ValueError, match="unknown parameterisation"):
        flow_matching_loss(raw, x0, noise, t, "epsilon")
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(raw[:, :2], x0, noise, t, "velocity")


def test_loss_trains_a_model_towards_the_conditional_mean():
    """A one-parameter x0 model fit with the loss lands on E[x0] for a fixed x_t-independent target."""
    torch.manual_seed(0)
    x0 = torch.full((256, 1), 2.0) + 0.1 * torch.randn(256, 1)
    guess = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([guess], lr=0.05)
    for _ in range(300):
        noise = torch.randn_like(x0)
        t = torch.rand(256) * 0.9 + 0.1
        raw = guess.expand_as(x0)
        loss = flow_matching_loss(raw, x0, noise, t, "x0").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert guess.item() == pytest.approx(x0.mean().item(), abs=0.05)


def test_dit_sample_inputs():
    cond = [torch.zeros(4, 2, 3), torch.ones(4, 5, 5)]
    x_t = torch.randn(4, 3, 3)
    frames, times, mask = dit_sample_inputs(cond, x_t, torch.tensor(0.7))
    assert frames[:2] == cond and frames[2] is x_t
    torch.testing.assert_close(times, torch.tensor([CONDITION_FRAME_TIME, CONDITION_FRAME_TIME, 0.7]))
    assert mask.tolist() == [True, True, False]
    frames, times, mask = dit_sample_inputs([], x_t, 0.5)
    assert len(frames) == 1 and times.tolist() == [0.5] and mask.tolist() == [False]
    with pytest.raises(ValueError, match="conditioning frame 1"):
        dit_sample_inputs([cond[0], torch.zeros(3, 5, 5)], x_t, 0.5)
