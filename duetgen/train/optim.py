"""Optimiser pieces shared by both training stages: AdamW param groups, warm-up + cosine LR, clipping, EMA.

    optimizer = make_adamw(model, lr=1e-4, weight_decay=0.05)
    scheduler = make_scheduler(optimizer, warmup_steps=100, total_steps=10_000, min_lr_ratio=0.1)
    norm = clip_grad_norm(model.parameters(), max_norm=1.0)   # float, the norm before clipping
    ema = EMA(dit, decay=0.9999); ema.update(dit); ema.copy_to(dit)

Design choices:
- Weight decay only on matrices: parameters with fewer than 2 dims (biases, norm scales, gates)
  and every ``nn.Embedding`` weight (including an LM head tied to it) are not decayed, the usual
  GPT/LLaMA recipe (decaying a norm scale or an embedding row pulls it towards zero for no gain).
  Frozen parameters (``requires_grad=False``) are left out of the optimiser entirely.
- The schedule is a ``LambdaLR`` over a small dataclass (``WarmupCosine``): the scheduler's state
  dict then holds plain numbers (step, base LRs, the dataclass fields), which the checkpoint stores
  as JSON, so a resumed run continues on exactly the same curve.
- ``clip_grad_norm`` works for plain and FSDP2 (DTensor) gradients and returns a Python float, so
  the training loop can log it and skip a non-finite step without knowing how the model is sharded.
- ``EMA`` keeps an fp32 shadow of the trainable weights (stage 2 keeps one for the DiT, paper
  section 4.2); with FSDP2 the shadow is a DTensor sharded like the parameter, so no rank holds the
  full EMA. ``state_dict``/``load_state_dict`` make it a checkpoint "stateful" like the sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: decayed matrices, and everything else undecayed."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # deduplicated: a tied weight appears once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_adamw(model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8, fused: bool | None = None,
               lr_scales: Mapping[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, weight_decay)``. ``fused=None`` lets torch pick (fused on CUDA).

    ``lr_scales`` maps a name fragment to an LR multiplier: parameters whose name contains it get
    their own groups at ``lr * scale`` (e.g. ``{"visual.": 0.1}`` for a vision tower); the schedule
    scales every group alike.
    """
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr} weight_decay={weight_decay}")
    groups = param_groups(model, weight_decay)
    for fragment, scale in (lr_scales or {}).items():
        if scale <= 0:
            raise ValueError(f"lr_scales[{fragment!r}] = {scale}: must be > 0")
        chosen = {id(p) for name, p in model.named_parameters() if fragment in name}
        split = []
        for g in groups:
            rest = [p for p in g["params"] if id(p) not in chosen]
            picked = [p for p in g["params"] if id(p) in chosen]
            split += [{**g, "params": rest}] if rest else []
            split += [{**g, "params": picked, "lr": g.get("lr", lr) * scale}] if picked else []
        groups = split
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


@dataclass
class WarmupCosine:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""

    warmup_steps: int     # steps of linear warm-up; step 0 already gets 1/warmup_steps of the LR
    total_steps: int      # the cosine reaches min_lr_ratio here and stays there after
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak

    def __post_init__(self):
        if self.warmup_steps < 0 or self.total_steps < 1 or self.warmup_steps > self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                             f"got warmup_steps={self.warmup_steps} total_steps={self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / decay_steps) if decay_steps else 1.0
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over ``WarmupCosine``; call ``scheduler.step()`` once after every optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (``None``: only measure); returns the norm before clipping.

    With FSDP2 the gradients are DTensor shards; torch computes the norm over all of them and the
    result is a DTensor, turned into the full value here (a collective: call it on every rank).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


class EMA:
    """Exponential moving average of a model's trainable weights: ``shadow = decay * shadow + (1 - decay) * w``.

    Kept in fp32 whatever the parameter dtype (bf16 has too few mantissa bits for 1 - decay ~ 1e-4
    increments to register). Parameters are matched by name, so pass the same (wrapped) model each time.

    ``warmup`` (default on): update n uses ``min(decay, (1 + n) / (10 + n))``, the rule of diffusers'
    ``EMAModel`` and timm. Without it the average keeps ``decay ** n`` of the random initial weights:
    30% after 600 steps at 0.998, which pulled the ShapeWorld DiT's output towards zero ("change
    nothing") in short runs (docs/training.md).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {n: p.detach().to(torch.float32, copy=True)
                       for n, p in model.named_parameters() if p.requires_grad}
        if not self.shadow:
            raise ValueError(f"{type(model).__name__} has no trainable parameters to average")

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"EMA tracks parameters the model does not have: {missing[:5]}")
        return [params[n] for n in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step; call it after every optimiser step."""
        shadow = list(self.shadow.values())
        params = [p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(shadow, params, 1.0 - self.current_decay())
        self.num_updates += 1

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the averages (for sampling or export; keep a copy to go back)."""
        for p, s in zip(self._params(model), self.shadow.values()):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            extra, missing = sorted(set(shadow) - set(self.shadow)), sorted(set(self.shadow) - set(shadow))
            raise KeyError(f"EMA state does not match the model: unexpected {extra[:5]}, missing {missing[:5]}")
        for n, s in self.shadow.items():
            if tuple(shadow[n].shape) != tuple(s.shape):
                raise ValueError(f"EMA state {n!r} has shape {tuple(shadow[n].shape)}, model has {tuple(s.shape)}")
            s.copy_(shadow[n])
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.warmup = bool(state.get("warmup", self.warmup))
