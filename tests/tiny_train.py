"""A tiny training run built only from the shared training pieces, the way a stage script uses them.

    python tests/tiny_train.py --run-dir RUN --steps 24 --save-every 5
    torchrun --nproc-per-node 2 tests/tiny_train.py --run-dir RUN --steps 2 --dropout 0 --augment 0

Used by tests/test_checkpoint.py (killed with SIGKILL and resumed: the loss curve must equal an
uninterrupted run's) and tests/test_parallel.py (2 gloo ranks versus 1 process, same global batch).
Not collected by pytest (no ``test_`` prefix).

Everything that makes training stochastic draws from a generator the checkpoint restores: the
sampler (packing order, from seed and epoch), python ``random`` (whether a sample is reversed),
numpy's global generator (which input tokens are corrupted) and torch's (dropout). The loss is
summed over every rank's label tokens and divided by the global count, with FSDP summing
(not averaging) gradients, so any split of the same global batch over ranks gives the same loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from duetgen.data.packing import PackedSampler, block_diagonal_mask, concat_packed
from duetgen.train.checkpoint import latest_checkpoint, resume, save_checkpoint
from duetgen.train.logging import MetricsLogger
from duetgen.train.optim import EMA, clip_grad_norm, make_adamw, make_scheduler
from duetgen.train.parallel import all_reduce_sum, apply_fsdp, destroy_distributed, init_distributed, \
    load_full_state_dict


# --- config -------------------------------------------------------------------------------------------

@dataclass
class TinyConfig:
    seed: int = 0
    vocab: int = 64           # token ids 0..63
    dim: int = 32
    heads: int = 2
    layers: int = 2
    dropout: float = 0.1      # > 0 so torch's RNG state matters for the resumed curve
    augment: bool = True      # corrupt/reverse samples with numpy/python RNG, so those states matter too
    num_samples: int = 96
    budget: int = 48          # tokens per pack
    packs_per_step: int = 2   # global: split evenly over ranks
    steps: int = 24
    lr: float = 3e-3
    warmup: int = 4
    save_every: int = 5


# --- model --------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 2 * cfg.dim), nn.GELU(), nn.Linear(2 * cfg.dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask):
        T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(T, 3, self.heads, D // self.heads).unbind(1)  # (T, H, Dh) each
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask)  # (H, T, Dh); mask keeps samples apart
        x = x + self.drop(self.proj(a.transpose(0, 1).reshape(T, D)))  # (T, D)
        return x + self.drop(self.mlp(self.norm2(x)))  # (T, D)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)  # (T, H, Dh/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many LMs: exercises the checkpoint's aliases
        nn.init.normal_(self.embed.weight, std=0.02)  # N(0, 1) rows through a tied head give logits ~ 30
        self.register_buffer("inv_freq", self.rope_inv_freq(cfg), persistent=False)

    @staticmethod
    def rope_inv_freq(cfg: TinyConfig) -> torch.Tensor:
        half = cfg.dim // cfg.heads // 2
        return 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))

    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (after ``to_empty``, which leaves them garbage)."""
        self.inv_freq.copy_(self.rope_inv_freq(self.cfg))

    def forward(self, input_ids, position_ids, cu_seqlens):
        x = self.embed(input_ids)  # (T, D)
        angles = position_ids[:, None].float() * self.inv_freq[None, :]  # (T, Dh/2): positions restart per sample
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # (T, 1, Dh/2)
        mask = block_diagonal_mask(cu_seqlens, causal=True).to(x.device)  # (T, T)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.head(self.norm(x))  # (T, V)


# --- data ---------------------------------------------------------------------------------------------

def make_dataset(cfg: TinyConfig) -> list[torch.Tensor]:
    """Fixed token sequences (a private generator: the dataset never depends on the training RNG)."""
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(4, cfg.budget, (cfg.num_samples,), generator=g).tolist()
    seqs = []
    for n in lengths:  # learnable structure: an arithmetic progression mod vocab
        start, stride = torch.randint(0, cfg.vocab, (2,), generator=g).tolist()
        seqs.append((start + stride * torch.arange(n)) % cfg.vocab)
    return seqs


def make_sample(seq: torch.Tensor, cfg: TinyConfig) -> dict[str, torch.Tensor]:
    ids = seq.clone()
    if cfg.augment:
        if random.random() < 0.5:
            ids = ids.flip(0)
        corrupt = np.random.random(len(ids)) < 0.1
        ids[torch.from_numpy(corrupt)] = torch.from_numpy(np.random.randint(0, cfg.vocab, int(corrupt.sum())))
    return {"input_ids": ids, "labels": ids.clone()}


# --- run ----------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step, so a test can kill mid-run")
    p.add_argument("--stop-after", type=int, default=None, help="stop (and save) after this step; the LR "
                   "schedule still spans --steps, so a later run resumes the same curve")
    for f in dataclasses.fields(TinyConfig):  # every config field is a flag: --packs-per-step 2, --augment 0
        kind = type(f.default)
        p.add_argument(f"--{f.name.replace('_', '-')}", default=f.default,
                       type=(lambda s: bool(int(s))) if kind is bool else kind)
    args = p.parse_args(argv)
    cfg = TinyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyConfig)})
    torch.set_num_threads(1)  # bitwise-reproducible reductions

    env = init_distributed()
    random.seed(cfg.seed + env.rank)
    np.random.seed(cfg.seed + env.rank)
    torch.manual_seed(cfg.seed + env.rank)
    if cfg.packs_per_step % env.world_size:
        raise SystemExit(f"packs_per_step {cfg.packs_per_step} is not divisible by world size {env.world_size}")

    # model: built on meta, sharded from outside, weights read once on rank 0 and broadcast
    with torch.device("meta"):
        model = TinyLM(cfg)
    apply_fsdp(model, model.blocks, env, sum_gradients=True)
    init = {}
    if env.is_main:
        torch.manual_seed(cfg.seed)
        init = TinyLM(cfg).state_dict()  # stands for the pretrained weights a stage script reads
    load_full_state_dict(model, init, env, init_buffers=TinyLM.init_buffers)
    del init

    optimizer = make_adamw(model, lr=cfg.lr, weight_decay=0.1)
    scheduler = make_scheduler(optimizer, warmup_steps=cfg.warmup, total_steps=cfg.steps)
    ema = EMA(model, decay=0.9)
    data = make_dataset(cfg)
    sampler = PackedSampler([len(s) for s in data], cfg.budget, seed=cfg.seed, rank=env.rank,
                            world_size=env.world_size)
    stateful = {"sampler": sampler, "ema": ema}

    start = 0
    if (ckpt := latest_checkpoint(args.run_dir)) is not None:
        start = resume(ckpt, model, optimizer, scheduler=scheduler, stateful=stateful).step
        print(f"resumed from step {start}", flush=True)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"rank {env.rank}: holds {local} of {total} parameter elements", flush=True)
    last = cfg.steps if args.stop_after is None else min(cfg.steps, args.stop_after)
    packs = iter(sampler)

    with MetricsLogger(args.run_dir, total_steps=cfg.steps, start_step=start, enabled=env.is_main,
                       progress=False, tensorboard=False) as log:
        for step in range(start + 1, last + 1):
            model.train()
            samples = [make_sample(data[i], cfg) for _ in range(cfg.packs_per_step // env.world_size)
                       for i in next(packs).items]
            batch = {k: v.to(env.device) if torch.is_tensor(v) else v for k, v in concat_packed(samples).items()}
            logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"])  # (T, V)
            targets = batch["labels"][1:]  # next token; the first label of each sample is ignored
            loss_sum = F.cross_entropy(logits[:-1], targets, ignore_index=-100, reduction="sum")
            tokens = all_reduce_sum((targets != -100).sum(), env)
            (loss_sum / tokens).backward()  # FSDP sums gradients over ranks: the global-token mean
            grad_norm = clip_grad_norm(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            ema.update(model)
            loss = all_reduce_sum(loss_sum, env) / tokens
            log.log(step, loss=loss, lr=lr, items=int(tokens), grad_norm=grad_norm)
            if step % cfg.save_every == 0 or step == last:
                save_checkpoint(args.run_dir, step, model, optimizer, scheduler=scheduler, stateful=stateful,
                                config=cfg, keep_last=2)
            if args.step_sleep:
                time.sleep(args.step_sleep)
    destroy_distributed()


if __name__ == "__main__":
    main()
