"""AdamW param groups, warm-up + cosine schedule, gradient clipping, EMA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from duetgen.train.checkpoint import flatten_state, unflatten_state
from duetgen.train.optim import EMA, WarmupCosine, clip_grad_norm, make_adamw, make_scheduler, param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.norm(self.proj(self.embed(x)) + self.frozen(self.embed(x))))


def test_decay_only_on_matrices_never_on_biases_norms_embeddings_or_frozen_weights():
    model = Net()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.embed.weight), id(model.proj.bias),
                                                    id(model.norm.weight), id(model.norm.bias)}
    opt = make_adamw(model, lr=1e-3, weight_decay=0.1)
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted({id(p) for p in model.parameters() if p.requires_grad})
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), 0.1)
    with pytest.raises(ValueError, match="lr > 0"):
        make_adamw(model, lr=0.0)


def test_decoupled_decay_shrinks_the_matrix_but_not_the_norm():
    model = Net()
    opt = make_adamw(model, lr=0.1, weight_decay=0.5)
    before = model.proj.weight.detach().clone(), model.norm.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()  # zero gradients: only weight decay can move a weight
    torch.testing.assert_close(model.proj.weight, before[0] * (1 - 0.1 * 0.5))
    assert torch.equal(model.norm.weight, before[1])


def test_warmup_cosine_shape():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 15)]
    assert values == sorted(values, reverse=True)
    assert WarmupCosine(0, 10)(0) == 1.0 and WarmupCosine(10, 10)(10) == pytest.approx(0.1)
    for bad in ((5, 4, 0.1), (-1, 4, 0.1), (0, 0, 0.1), (1, 4, 1.5)):
        with pytest.raises(ValueError):
            WarmupCosine(*bad)


def test_scheduler_drives_lr_and_its_state_survives_a_json_round_trip():
    model = Net()
    opt = make_adamw(model, lr=1e-2)
    sched = make_scheduler(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.0)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi * 1 / 4))])
    tensors: dict = {}
    state = json.loads(json.dumps(flatten_state(sched.state_dict(), tensors)))
    assert not tensors  # plain numbers only
    opt2 = make_adamw(model, lr=1e-2)
    sched2 = make_scheduler(opt2, warmup_steps=99, total_steps=100)  # different: the state must win
    sched2.load_state_dict(unflatten_state(state, None))
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]  # the optimiser's own state carries its lr
    opt2.param_groups[1]["lr"] = sched2.get_last_lr()[1]
    for _ in range(3):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_clip_grad_norm_returns_the_norm_before_clipping():
    model = Net()
    model(torch.arange(6)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert clip_grad_norm(model.parameters(), None) == pytest.approx(expected, rel=1e-6)  # only measures
    assert expected > 1.0
    assert clip_grad_norm(model.parameters(), 1.0) == pytest.approx(expected, rel=1e-6)
    assert clip_grad_norm(model.parameters(), None) == pytest.approx(1.0, rel=1e-5)  # now clipped
    assert clip_grad_norm(nn.Linear(2, 2).parameters(), 1.0) == 0.0  # no gradients yet


def test_ema_average_copy_and_state():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.75, warmup=False)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    start = {n: s.clone() for n, s in ema.shadow.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.75 * start["weight"] + 0.25 * model.weight.float()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    torch.testing.assert_close(ema.shadow["bias"], start["bias"])  # bias did not move
    assert ema.num_updates == 1

    other = nn.Linear(3, 2).to(torch.bfloat16)
    ema2 = EMA(other, decay=0.5)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.decay == 0.75 and ema2.num_updates == 1
    ema2.copy_to(other)
    assert torch.equal(other.weight, expected.to(torch.bfloat16))

    assert ema2.warmup is False  # restored with the state

    with pytest.raises(KeyError, match="does not match"):
        EMA(nn.Linear(3, 2, bias=False)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="shape"):
        EMA(nn.Linear(4, 2)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_ema_warmup_follows_diffusers_rule_and_forgets_the_initial_weights():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.998)
    decays = []
    for _ in range(600):
        decays.append(ema.current_decay())
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema.update(model)
    assert decays[0] == pytest.approx(0.1) and decays[90] == pytest.approx(91 / 100)
    assert decays[-1] == pytest.approx(600 / 609)  # still warming up: 0.998 is reached at ~4,500 updates
    capped = EMA(model, decay=0.9)
    capped.num_updates = 100
    assert capped.current_decay() == 0.9  # (1 + n) / (10 + n) > 0.9 from n = 81 on: the configured decay
    # the share of the initial weights left: product of the decays (0.998**600 = 0.30 without warm-up)
    share = float(torch.tensor(decays, dtype=torch.float64).prod())
    assert share < 1e-3
    torch.testing.assert_close(ema.shadow["weight"], torch.ones(2, 3), atol=1e-3, rtol=0)
