"""Packed vs padded DiT training step on conversations with images of mixed sizes.

Workload: a batch of conversations, each with 1-4 images of 32-96 px (multiples of 16 px); the last
image of a conversation is the noisy target, the earlier ones clean conditioning frames (DESIGN
section 5), and each conversation has its own text condition (8-64 MLLM tokens). One step =
forward + backward of the DiT (and the connector / crossattn_proj) with per-frame timesteps.

Measured in the same run, on the same batch and the same weights, in rotating order:
- padded, stock:       diffusers `CosmosTransformer3DModel.forward` on (B, C, T_max, H_max, W_max):
                       every frame padded to the largest latent size, every sample to the largest
                       frame count, text padded with an attention mask. The baseline.
- packed, split:       `PackedCosmosDiT`, one packed sequence, per-sample attention slices (default).
- packed, mask:        `PackedCosmosDiT(attention="mask")`, dense block-diagonal masks.
- padded, packed code: `PackedCosmosDiT` fed the padded frames, to separate the gain of dropping
                       padding from the gain of per-frame AdaLN.
Throughput counts USEFUL tokens (tokens of real frames) per second, for every method.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dit_packing.py            # toy config, batch 16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dit_packing.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import CosmosTransformer3DModel
from rich.console import Console
from rich.progress import track
from rich.table import Table

from duetgen.models.connector import Connector
from duetgen.models.video_dit import PackedCosmosDiT, install_padding_mask_resize_shim, toy_cosmos_config

# ----------------------------------------------------------------------------- workload

CONFIGS = {
    # ShapeWorld DiT: pixel-shuffle AE f = 4 (48 channels), patch 4 -> 2..6 patches per side
    "toy": dict(config=toy_cosmos_config(), spatial_factor=4),
    # wider and deeper, Wan-VAE-like latents (f = 8, 16 channels), patch 2 -> 2..6 patches per side
    "small": dict(
        config=toy_cosmos_config(
            latent_channels=16, num_layers=8, num_attention_heads=4, attention_head_dim=64, text_embed_dim=256,
            encoder_hidden_states_channels=256, adaln_lora_dim=256, patch_size=(1, 2, 2),
        ),
        spatial_factor=8,
    ),
}


def make_batch(args, config: dict, spatial_factor: int, generator: torch.Generator) -> list[dict]:
    """Conversations: 1..max_frames images of random sizes, all but the last clean, plus raw MLLM features."""
    sizes_px = list(range(args.min_px, args.max_px + 1, 16))
    batch = []
    for _ in range(args.batch):
        n = int(torch.randint(1, args.max_frames + 1, (1,), generator=generator))
        frames = []
        for _ in range(n):
            h, w = (sizes_px[int(torch.randint(len(sizes_px), (1,), generator=generator))] for _ in range(2))
            frames.append(torch.randn(config["out_channels"], h // spatial_factor, w // spatial_factor, generator=generator))
        cond = torch.arange(n) < n - 1
        timesteps = torch.where(cond, torch.zeros(n), torch.rand(n, generator=generator))
        text_len = int(torch.randint(8, 65, (1,), generator=generator))
        text = torch.randn(text_len, config["crossattn_proj_in_channels"], generator=generator)
        batch.append(dict(frames=frames, timesteps=timesteps, cond=cond, text=text))
    return batch


def pad_batch(batch: list[dict]) -> dict:
    """Every frame zero-padded (bottom/right) to the largest size, every sample to the largest frame count."""
    c = batch[0]["frames"][0].shape[0]
    t_max = max(len(s["frames"]) for s in batch)
    h_max = max(f.shape[1] for s in batch for f in s["frames"])
    w_max = max(f.shape[2] for s in batch for f in s["frames"])
    l_max = max(len(s["text"]) for s in batch)
    latents = torch.zeros(len(batch), c, t_max, h_max, w_max)
    cond = torch.zeros(len(batch), t_max, dtype=torch.bool)
    timesteps = torch.zeros(len(batch), t_max)
    text = torch.zeros(len(batch), l_max, batch[0]["text"].shape[1])
    text_mask = torch.zeros(len(batch), l_max, dtype=torch.bool)
    for i, s in enumerate(batch):
        for t, f in enumerate(s["frames"]):
            latents[i, :, t, : f.shape[1], : f.shape[2]] = f
        n = len(s["frames"])
        cond[i, :n], timesteps[i, :n] = s["cond"], s["timesteps"]
        cond[i, n:] = True  # padding frames act as clean conditioning (t = 0): they carry no target
        text[i, : len(s["text"])] = s["text"]
        text_mask[i, : len(s["text"])] = True
    return dict(latents=latents, cond=cond, timesteps=timesteps, text=text, text_mask=text_mask)


# ----------------------------------------------------------------------------- one training step per method


def step_stock_padded(model, padded) -> None:
    b, _, t, h, w = padded["latents"].shape
    out = model(
        hidden_states=padded["latents"],
        timestep=padded["timesteps"].view(b, 1, t, 1, 1),
        encoder_hidden_states=padded["text"],  # raw MLLM features: the model's crossattn_proj projects them
        attention_mask=padded["text_mask"],
        condition_mask=padded["cond"].float().view(b, 1, t, 1, 1).expand(b, 1, t, h, w),
        padding_mask=torch.zeros(1, 1, h, w),
        return_dict=False,
    )[0]  # (B, C, T, H, W)
    out.square().mean().backward()


def step_packed(dit, connector, batch) -> None:
    out = dit(
        [s["frames"] for s in batch],
        [s["timesteps"] for s in batch],
        [s["cond"] for s in batch],
        [connector(s["text"]) for s in batch],
    )
    sum(o.square().mean() for sample in out for o in sample).backward()


def step_packed_code_padded(dit, connector, padded) -> None:
    latents, text = padded["latents"], padded["text"]
    out = dit(
        [list(x.unbind(1)) for x in latents],
        list(padded["timesteps"]),
        list(padded["cond"]),
        [connector(x) for x in text],  # padded text, unmasked: the padded-input cost, not a fair model
    )
    sum(o.square().mean() for sample in out for o in sample).backward()


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="toy", help="DiT size (default: toy, the ShapeWorld DiT)")
    parser.add_argument("--batch", type=int, default=16, help="conversations per step (default 16)")
    parser.add_argument("--max-frames", type=int, default=4, help="images per conversation: 1..this (default 4)")
    parser.add_argument("--min-px", type=int, default=32, help="smallest image side in pixels (default 32)")
    parser.add_argument("--max-px", type=int, default=96, help="largest image side in pixels (default 96)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="batch 8, 2 timed steps, 1 warmup: a smoke run in seconds")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup = 8, 2, 1
    if args.min_px % 16 or args.max_px % 16 or not 16 <= args.min_px <= args.max_px:
        parser.error("--min-px / --max-px must be multiples of 16 with min <= max")

    torch.set_num_threads(args.threads)
    install_padding_mask_resize_shim()
    console = Console(width=120)  # no wrapping when the output goes to a log
    spec = CONFIGS[args.config]
    config, factor = spec["config"], spec["spatial_factor"]

    torch.manual_seed(args.seed)
    model = CosmosTransformer3DModel(**config).train()
    connector = Connector.from_dit_projection(model, config["crossattn_proj_in_channels"])  # copies crossattn_proj
    split_dit = PackedCosmosDiT(model, attention="split")
    mask_dit = PackedCosmosDiT(model, attention="mask")

    batch = make_batch(args, config, factor, torch.Generator().manual_seed(args.seed))
    padded = pad_batch(batch)
    _, p_h, p_w = config["patch_size"]
    useful = sum(f.shape[1] // p_h * f.shape[2] // p_w for s in batch for f in s["frames"])
    b, _, t, h, w = padded["latents"].shape
    padded_tokens = b * t * (h // p_h) * (w // p_w)

    methods = {
        "padded, stock diffusers": lambda: step_stock_padded(model, padded),
        "packed, split attention": lambda: step_packed(split_dit, connector, batch),
        "packed, mask attention": lambda: step_packed(mask_dit, connector, batch),
        "padded, packed code": lambda: step_packed_code_padded(split_dit, connector, padded),
    }
    processed = {name: padded_tokens for name in methods} | {
        "packed, split attention": useful, "packed, mask attention": useful,
    }
    params = list(model.parameters()) + list(connector.parameters())
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for step in track(range(args.warmup + args.steps), description="fwd+bwd steps", console=console, transient=True):
        for k in range(len(names)):  # rotate the order so no method always runs first
            name = names[(step + k) % len(names)]
            for p in params:
                p.grad = None
            start = time.perf_counter()
            methods[name]()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)

    n_params = sum(p.numel() for p in split_dit.parameters())
    console.print(
        f"config {args.config} ({n_params / 1e6:.2f}M DiT params, patch {p_h}x{p_w}), {args.batch} conversations, "
        f"1-{args.max_frames} images of {args.min_px}-{args.max_px} px, {args.threads} thread(s), "
        f"median of {args.steps} steps after {args.warmup} warmup"
    )
    console.print(
        f"useful tokens {useful}; padded batch ({b}, T={t}, {h}x{w} latents) = {padded_tokens} tokens; "
        f"padding fraction {1 - useful / padded_tokens:.1%}"
    )
    table = Table("method", "tokens run", "s / step", "useful tokens / s", "vs stock padded")
    base = useful / statistics.median(times["padded, stock diffusers"])
    for name in methods:
        seconds = statistics.median(times[name])
        table.add_row(name, str(processed[name]), f"{seconds:.3f}", f"{useful / seconds:,.0f}", f"{useful / seconds / base:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
