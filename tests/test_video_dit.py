"""Packed Cosmos DiT forward: equal to the stock diffusers forward, block-diagonal across samples,
variable frame sizes inside a sample, gradients only where they belong."""

from __future__ import annotations

import pytest
import torch
from diffusers import CosmosTransformer3DModel

from duetgen.models.connector import Connector
from duetgen.models.video_dit import (
    PackedCosmosDiT,
    install_padding_mask_resize_shim,
    tiny_cosmos_config,
    toy_cosmos_config,
)

install_padding_mask_resize_shim()  # the stock forward resizes its padding mask with torchvision
TOL = 1e-5


def make_dit(seed: int = 0, **overrides) -> CosmosTransformer3DModel:
    """Tiny random Cosmos DiT; every parameter redrawn so nothing is trivially zero (e.g. pos tables)."""
    torch.manual_seed(seed)
    model = CosmosTransformer3DModel(**tiny_cosmos_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def stock_forward(model, latents, timesteps, cond, raw_text, fps=None, text_mask=None):
    """Stock diffusers forward, fed as Cosmos-Predict2.5's pipeline feeds it.

    latents (B, C, T, H, W); timesteps (B, T) per frame; cond (B, T) bool; raw_text (B, L, D_mllm).
    """
    b, _, t, h, w = latents.shape
    condition_mask = cond.float().view(b, 1, t, 1, 1).expand(b, 1, t, h, w)
    padding_mask = torch.zeros(1, 1, h * 8, w * 8)  # pixel-size zeros, as the pipeline builds it
    return model(
        hidden_states=latents,
        timestep=timesteps.view(b, 1, t, 1, 1),
        encoder_hidden_states=raw_text,
        attention_mask=text_mask,
        fps=fps,
        condition_mask=condition_mask,
        padding_mask=padding_mask,
        return_dict=False,
    )[0]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- equal to the stock forward


@pytest.mark.parametrize("attention", ["split", "mask"])
@pytest.mark.parametrize(
    "overrides, fps",
    [
        ({}, None),  # Cosmos-Predict2.5 layout
        ({"extra_pos_embed_type": "learnable", "rope_scale": (2.0, 3.0, 3.0)}, 16),  # Cosmos-1 style pos + fps
        ({"concat_padding_mask": False, "rope_scale": (20 / 24, 2.0, 2.0)}, None),
    ],
)
def test_one_sample_of_equal_frames_matches_stock_forward(overrides, fps, attention):
    model = make_dit(**overrides)
    dit = PackedCosmosDiT(model, attention=attention)
    torch.manual_seed(1)
    latents = torch.randn(1, 16, 3, 6, 10)
    timesteps = torch.tensor([[0.0, 0.0, 0.63]])  # two clean conditioning frames, one noisy target
    cond = torch.tensor([[True, True, False]])
    raw_text = torch.randn(1, 7, 48)
    connector = Connector.from_dit_projection(model, 48)  # copies crossattn_proj: same text path as stock

    with torch.no_grad():
        expected = stock_forward(model, latents, timesteps, cond, raw_text, fps=fps)  # (1, C, T, H, W)
        out = dit([list(latents[0].unbind(1))], [timesteps[0]], [cond[0]], [connector(raw_text[0])], fps=fps)

    assert len(out) == 1 and len(out[0]) == 3
    assert max_diff(out[0], list(expected[0].unbind(1))) < TOL


def test_stock_batch_equals_packed_samples():
    """A stock batch (samples independent by construction) equals the same samples packed in one sequence."""
    model = make_dit()
    dit = PackedCosmosDiT(model)
    torch.manual_seed(2)
    latents = torch.randn(3, 16, 2, 8, 6)
    timesteps = torch.tensor([[0.0, 0.9], [0.0, 0.2], [0.5, 0.5]])
    cond = torch.tensor([[True, False], [True, False], [False, False]])
    raw_text = torch.randn(3, 4, 48)
    connector = Connector.from_dit_projection(model, 48)

    with torch.no_grad():
        expected = stock_forward(model, latents, timesteps, cond, raw_text)
        out = dit([list(x.unbind(1)) for x in latents], list(timesteps), list(cond), list(connector(raw_text)))

    for i in range(3):
        assert max_diff(out[i], list(expected[i].unbind(1))) < TOL


def test_one_timestep_per_sample_matches_stock_scalar_timestep():
    model = make_dit()
    dit = PackedCosmosDiT(model)
    latents, raw_text = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 3, 48)
    with torch.no_grad():
        expected = model(
            hidden_states=latents, timestep=torch.tensor([0.4]), encoder_hidden_states=raw_text,
            condition_mask=torch.zeros(1, 1, 2, 4, 4), padding_mask=torch.zeros(1, 1, 32, 32), return_dict=False,
        )[0]
        text = Connector.from_dit_projection(model, 48)(raw_text[0])
        out = dit([list(latents[0].unbind(1))], [torch.full((2,), 0.4)], [torch.zeros(2, dtype=torch.bool)], [text])
    assert max_diff(out[0], list(expected[0].unbind(1))) < TOL


# ----------------------------------------------------------------------------- block-diagonal packing


def random_sample(frame_sizes, text_len, generator):
    frames = [torch.randn(16, h, w, generator=generator) for h, w in frame_sizes]
    n = len(frame_sizes)
    cond = torch.arange(n) < n - 1  # all but the last frame are clean conditioning frames
    timesteps = torch.where(cond, torch.zeros(n), torch.rand(n, generator=generator))
    text = torch.randn(text_len, 32, generator=generator)
    return frames, timesteps, cond, text


@pytest.mark.parametrize("attention", ["split", "mask"])
def test_packed_samples_equal_each_sample_alone(attention):
    dit = PackedCosmosDiT(make_dit(extra_pos_embed_type="learnable"), attention=attention)
    g = torch.Generator().manual_seed(3)
    samples = [
        random_sample([(6, 8)], 3, g),  # text-to-image: one target frame
        random_sample([(4, 4), (8, 6), (6, 10)], 9, g),  # two conditioning frames of other sizes
        random_sample([(10, 4), (10, 4)], 1, g),
    ]
    with torch.no_grad():
        packed = dit(*map(list, zip(*samples)))
        for i, sample in enumerate(samples):
            alone = dit(*[[x] for x in sample])[0]
            assert [tuple(o.shape) for o in packed[i]] == [tuple(f.shape) for f in sample[0]]
            assert max_diff(packed[i], alone) < TOL, f"sample {i} sees other samples"


def test_split_and_mask_attention_agree():
    model = make_dit()
    g = torch.Generator().manual_seed(4)
    samples = [random_sample([(4, 6), (2, 2)], 5, g), random_sample([(8, 8)], 2, g)]
    with torch.no_grad():
        split = PackedCosmosDiT(model, attention="split")(*map(list, zip(*samples)))
        mask = PackedCosmosDiT(model, attention="mask")(*map(list, zip(*samples)))
    for a, b in zip(split, mask):
        assert max_diff(a, b) < TOL


def test_another_samples_text_does_not_leak():
    dit = PackedCosmosDiT(make_dit())
    g = torch.Generator().manual_seed(5)
    a, b = random_sample([(4, 4), (6, 6)], 4, g), random_sample([(6, 4)], 6, g)
    b_other_text = (*b[:3], torch.randn(11, 32, generator=g))
    with torch.no_grad():
        first = dit(*map(list, zip(a, b)))
        second = dit(*map(list, zip(a, b_other_text)))
    assert max_diff(first[0], second[0]) == 0.0  # sample a is untouched by b's text
    assert max_diff(first[1], second[1]) > 1e-3  # b's own text does matter


# ----------------------------------------------------------------------------- different sizes in one sample


def reference_forward(model, frames, timesteps, cond, text, fps=None):
    """An independent computation for ONE sample of mixed-size frames, from the stock modules' own forwards:
    stock patch_embed per frame, stock rope / learnable positions of a (t+1)-frame clip of that frame's size
    (last frame's rows), stock blocks with per-token timestep embeddings, stock norm_out and unpatchify."""
    p_t, p_h, p_w = model.config.patch_size
    tokens, cos, sin, pos = [], [], [], []
    for t, (frame, c) in enumerate(zip(frames, cond)):
        h, w = frame.shape[-2:]
        x = torch.cat([frame, torch.full((1, h, w), float(c)), torch.zeros(1, h, w)])[None, :, None]  # (1, C', 1, h, w)
        tokens.append(model.patch_embed(x).flatten(1, 3))  # (1, h'w', D)
        clip = torch.zeros(1, x.shape[1], t + 1, h, w)
        n = (h // p_h) * (w // p_w)
        frame_cos, frame_sin = model.rope(clip, fps=fps)
        cos.append(frame_cos[-n:])
        sin.append(frame_sin[-n:])
        if model.learnable_pos_embed is not None:
            pos.append(model.learnable_pos_embed(clip)[:, -n:])
    hidden = torch.cat(tokens, dim=1)  # (1, N, D)
    counts = torch.tensor([tok.shape[1] for tok in tokens])
    temb, emb = model.time_embed(hidden, timesteps)  # per frame
    temb, emb = temb.repeat_interleave(counts, 0)[None], emb.repeat_interleave(counts, 0)[None]  # (1, N, .)
    extra = torch.cat(pos, dim=1) if pos else None
    context = model.crossattn_proj(text)[None]
    for block in model.transformer_blocks:
        hidden = block(hidden, context, emb, temb, (torch.cat(cos), torch.cat(sin)), extra, None)
    hidden = model.proj_out(model.norm_out(hidden, emb, temb))  # (1, N, p_h p_w p_t C)
    outputs = []
    for tok, frame in zip(hidden.split(counts.tolist(), dim=1), frames):
        gh, gw = frame.shape[-2] // p_h, frame.shape[-1] // p_w
        x = tok.unflatten(2, (p_h, p_w, p_t, -1)).unflatten(1, (1, gh, gw))  # stock unpatchify lines
        x = x.permute(0, 7, 1, 6, 2, 4, 3, 5).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (1, C, 1, h, w)
        outputs.append(x[0, :, 0])
    return outputs


@pytest.mark.parametrize("overrides, fps", [({}, None), ({"extra_pos_embed_type": "learnable"}, 24)])
def test_mixed_sizes_in_one_sample_match_independent_computation(overrides, fps):
    model = make_dit(**overrides)
    dit = PackedCosmosDiT(model)
    g = torch.Generator().manual_seed(6)
    frames, timesteps, cond, _ = random_sample([(8, 4), (4, 12), (6, 6)], 5, g)
    raw_text = torch.randn(5, 48, generator=g)
    with torch.no_grad():
        expected = reference_forward(model, frames, timesteps, cond, raw_text, fps=fps)
        out = dit([frames], [timesteps], [cond], [Connector.from_dit_projection(model, 48)(raw_text)], fps=fps)
    assert max_diff(out[0], expected) < TOL

    plan = dit.plan([[(8, 4), (4, 12), (6, 6)]])
    second = plan.positions[8:8 + 12]  # frame 1: 2x6 patch grid, after frame 0's 4x2 = 8 tokens
    assert second[:, 0].tolist() == [1] * 12
    assert second[:, 1].tolist() == [0] * 6 + [1] * 6
    assert second[:, 2].tolist() == list(range(6)) * 2


# ----------------------------------------------------------------------------- plan reuse, targets only


def test_plan_reuse_and_targets_only():
    dit = PackedCosmosDiT(make_dit())
    g = torch.Generator().manual_seed(7)
    samples = [random_sample([(4, 4), (6, 4)], 3, g), random_sample([(2, 8)], 2, g)]
    frames, timesteps, cond, text = map(list, zip(*samples))
    plan = dit.plan([[tuple(f.shape[-2:]) for f in s] for s in frames])
    with torch.no_grad():
        for step_t in (0.9, 0.3):  # two sampler steps, one plan
            ts = [torch.where(c, torch.zeros(len(c)), torch.full((len(c),), step_t)) for c in cond]
            full = dit(frames, ts, cond, text)
            assert max_diff(sum(dit.forward_planned(plan, frames, ts, cond, text), []), sum(full, [])) == 0.0
            targets = dit.forward_planned(plan, frames, ts, cond, text, targets_only=True)
            assert [len(t) for t in targets] == [1, 1]
            assert max_diff([targets[0][0], targets[1][0]], [full[0][1], full[1][0]]) < TOL


def test_projected_text_equals_the_text_tensor_and_plans_are_reused():
    """project_text (once per image) gives what the text tensor gives, alone, packed and mixed with raw text;
    forward() plans a frame layout once and reuses it."""
    dit = PackedCosmosDiT(make_dit())
    g = torch.Generator().manual_seed(9)
    samples = [random_sample([(4, 4), (6, 4)], 3, g), random_sample([(2, 8)], 2, g)]
    frames, timesteps, cond, text = map(list, zip(*samples))
    with torch.no_grad():
        expected = dit(frames, timesteps, cond, text)
        projected = [dit.project_text(t) for t in text]
        assert len(projected[0]) == 3 and len(projected[0].keys) == len(dit.transformer_blocks)
        assert max_diff(sum(dit(frames, timesteps, cond, projected), []), sum(expected, [])) < TOL
        mixed = dit(frames, timesteps, cond, [projected[0], text[1]])
        assert max_diff(sum(mixed, []), sum(expected, [])) < TOL
        alone = dit(frames[1:], timesteps[1:], cond[1:], projected[1:])
        assert max_diff(alone[0], expected[1]) < TOL
    assert len(dit._plans) == 2  # the pack's layout and sample 1's alone, each planned once
    with pytest.raises(ValueError, match="text must be"):
        dit.project_text(torch.zeros(3, dit.text_channels + 1))


@pytest.mark.parametrize("attention", ["split", "mask"])
def test_targets_only_equals_the_full_forward_with_and_without_conditioning(attention):
    """targets_only prunes the last block to the target tokens: the same target outputs as the full forward,
    for packs mixing samples with several conditioning frames, one, and none."""
    dit = PackedCosmosDiT(make_dit(), attention=attention)
    g = torch.Generator().manual_seed(11)
    samples = [random_sample([(4, 4), (6, 4), (4, 4)], 3, g), random_sample([(2, 8)], 2, g),
               random_sample([(4, 6), (4, 6)], 4, g)]
    frames, timesteps, cond, text = map(list, zip(*samples))  # every earlier frame conditions the last
    with torch.no_grad():
        full = dit(frames, timesteps, cond, text)
        targets = dit(frames, timesteps, cond, text, targets_only=True)
    assert [len(t) for t in targets] == [1, 1, 1]
    assert max_diff([t[0] for t in targets], [f[-1] for f in full]) < TOL

    def grads(targets_only):  # stage 2's loss reads the targets only: the same gradients either way
        dit.zero_grad()
        out = dit(frames, timesteps, cond, text, targets_only=targets_only)
        sum((sample[-1] ** 2).sum() for sample in out).backward()
        return [p.grad.clone() for p in dit.parameters() if p.grad is not None]

    pruned, whole = grads(True), grads(False)
    assert len(pruned) == len(whole) and max_diff(pruned, whole) < 1e-4


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_dit_and_connector_only():
    model = make_dit()
    model.train()
    dit = PackedCosmosDiT(model)
    connector = Connector.from_dit_projection(model, 48)
    dit.patch_embed.requires_grad_(False)  # a module we freeze
    mllm_states = [torch.randn(5, 48), torch.randn(3, 48)]  # frozen MLLM stand-in: requires_grad False
    g = torch.Generator().manual_seed(8)
    samples = [random_sample([(4, 4), (4, 6)], 5, g), random_sample([(6, 6)], 3, g)]
    frames, timesteps, cond, _ = map(list, zip(*samples))

    out = dit(frames, timesteps, cond, [connector(h) for h in mllm_states])
    loss = sum(o.square().mean() for sample, c in zip(out, cond) for o, is_c in zip(sample, c) if not is_c)
    loss.backward()

    for name, p in dit.named_parameters():
        if name.startswith("patch_embed"):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
    assert all(h.grad is None for h in mllm_states)
    assert all(p.grad is None for p in model.crossattn_proj.parameters())  # replaced by the connector


def test_gradient_checkpointing_gives_the_same_gradients():
    g = torch.Generator().manual_seed(9)
    frames, timesteps, cond, text = map(list, zip(random_sample([(4, 4), (6, 2)], 3, g)))
    grads = []
    for checkpointing in (False, True):
        dit = PackedCosmosDiT(make_dit())
        dit.gradient_checkpointing = checkpointing
        out = dit(frames, timesteps, cond, text)
        sum(o.square().sum() for o in out[0]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in dit.parameters()]))
    assert (grads[0] - grads[1]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- structure and errors


def test_parameters_are_the_stock_models_under_the_same_names():
    model = make_dit()
    dit = PackedCosmosDiT(model)
    stock = dict(model.named_parameters())
    for name, p in dit.named_parameters():
        assert stock[name] is p, name  # the very same tensor: no copy
    assert set(stock) - dict(dit.named_parameters()).keys() == {"crossattn_proj.0.weight", "crossattn_proj.0.bias"}


def test_toy_config_builds_a_model_of_the_calibrated_size():
    model = CosmosTransformer3DModel(**toy_cosmos_config())
    dit = PackedCosmosDiT(model)
    n = sum(p.numel() for p in dit.parameters())
    assert 1.5e6 < n < 2.0e6  # calibration: 4 layers x 128, ~1.7M
    plan = dit.plan([[(16, 16)]])  # a 64x64 canvas through the f = 4 pixel-shuffle AE
    assert plan.num_tokens == 16


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, t, c, x: ([[f[0][0][:15]]], t, c, x), "expected a (16, 4, 4) latent"),
        (lambda f, t, c, x: (f, [torch.tensor([500.0])], c, x), "flow times in [0, 1]"),
        (lambda f, t, c, x: (f, t, [torch.tensor([1.0])], x), "condition_mask must be a bool tensor"),
        (lambda f, t, c, x: (f, t, c, [torch.randn(3, 48)]), "cross-attention width"),
        (lambda f, t, c, x: (f, t, c, [torch.randn(0, 32)]), "L >= 1"),
        (lambda f, t, c, x: ([[torch.randn(16, 5, 4)]], t, c, x), "not a positive multiple of the patch"),
        (lambda f, t, c, x: (f, t + t, c, x), "one entry per sample"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    dit = PackedCosmosDiT(make_dit())
    good = ([[torch.randn(16, 4, 4)]], [torch.tensor([0.5])], [torch.tensor([False])], [torch.randn(3, 32)])
    dit(*good)  # the unchanged input is fine
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        dit(*change(*good))


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="condition-mask channel"):
        PackedCosmosDiT(CosmosTransformer3DModel(**tiny_cosmos_config(in_channels=16)))
    with pytest.raises(ValueError, match="patch_size"):
        PackedCosmosDiT(CosmosTransformer3DModel(**tiny_cosmos_config(patch_size=(2, 2, 2))))
    with pytest.raises(ValueError, match="max_size"):
        PackedCosmosDiT(make_dit(max_size=(4, 16, 16))).plan([[(4, 4)] * 5])
