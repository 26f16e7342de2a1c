"""GPU check of training (issue 4): stage-2 and stage-1 LoRA steps of the real preset; time, memory, MFU.

    python benchmarks/gpu_check_train.py --out benchmarks/results/gpu_check_train.json      # on a GPU
    python benchmarks/gpu_check_train.py --allow-cpu --preset tiny --out /tmp/smoke.json     # CPU smoke run

One process, one JSON object (stdout and `--out`); docs/perf.md says how to read it. Parts, in order:

0. matmul: the reference rate, `--matmul-size`^3 bf16 matmuls (8192 on a GPU) timed with CUDA events, median
   over `--matmul-repeats` batches of 5. MFU = model FLOPs / step time / this rate (not the datasheet peak).
1. build: `qwen2.5-vl-7b+cosmos-predict2.5-2b` built on meta, allocated and randomly initialised on the GPU
   in bf16 (`builder.build`). Nothing is downloaded; random weights change neither time nor memory.
2. vae: the Wan2.1 encode of the 4 stage-2 images (768x768), timed on its own (it is not in the step below).
3. stage2: one stage-2 step as `duetgen/train/stage2.py` runs it on CUDA: the trained parts (connector + DiT)
   in float32 master weights under bf16 autocast, the frozen MLLM in bf16. The MLLM (no grad) runs one packed
   forward over a `--stage2-mllm-tokens` prefix holding the 3 conditioning images (768x768 inputs, capped at
   480 px: 289 tokens each) and gives its all-layer states (L, 28 x 3,584 = 100,352) -> connector -> DiT over
   3 clean conditioning frames + 1 noisy target at 768x768 (Wan2.1 f = 8 -> 16 x 96 x 96 latents, patch 2 ->
   2,304 tokens per frame, 9,216 in all) -> flow-matching loss -> backward -> clip -> AdamW -> EMA.
   The latents are RANDOM tensors of the right shape: the VAE encode is skipped in the step (timed in 2).
   Measured plain and with per-block activation checkpointing.
4. stage1: one stage-1 step as `duetgen/train/stage1.py` runs it (packed batch, block-diagonal causal mask,
   next-token loss on the answer text), with peft LoRA (rank `--lora-rank`) on the language model's
   q/k/v/o and gate/up/down projections, base weights frozen in bf16, adapters in float32, bf16 autocast.
   The batch is `--stage1-pack` (4,096 tokens: 4 conversations holding 0-3 images). `--stage1-mode full`
   (or a LoRA failure) runs a full-parameter step on the smaller `--full-pack` instead, with bf16
   weights AND bf16 AdamW states (fp32 master weights for 8.3B parameters need 133 GB: FSDP territory).

Each step: `--warmup` steps (the first also counts FLOPs), then the median of `--steps` timed steps, with
per-phase times from CUDA events; peak memory is `torch.cuda.max_memory_allocated` since the part began.
Model FLOPs are counted from what runs (forward hooks on every Linear / Conv, a wrapper around
`F.scaled_dot_product_attention`), never from recompute: see `ModelFlops` and docs/perf.md.

Robustness: every part runs in its own try block; an error or OOM is written into the JSON and the next part
runs; the JSON is rewritten after every part, so a run cut short keeps what finished. Exit 0 when every part
ran, 1 when one failed, 2 when refused (no CUDA, unless `--allow-cpu --preset tiny`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REAL_PRESET = "qwen2.5-vl-7b+cosmos-predict2.5-2b"
SECTIONS = ("matmul", "vae", "stage2", "stage1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=REAL_PRESET)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke run on the CPU (only with --preset tiny)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (>= 1; the first counts FLOPs)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 8192 on a GPU, 256 on the CPU")
    parser.add_argument("--matmul-repeats", type=int, default=10)
    parser.add_argument("--conditioning-frames", type=int, default=3)
    parser.add_argument("--stage2-mllm-tokens", type=int, default=1024, help="MLLM prefix before the target's <BOV>")
    parser.add_argument("--no-checkpointing", action="store_true", help="stage 2: skip the checkpointed run")
    parser.add_argument("--master-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="stage 2: dtype of the trained connector + DiT weights (stage2.py keeps float32)")
    parser.add_argument("--stage1-mode", default="lora", help="comma list of lora, full")
    parser.add_argument("--stage1-pack", default="384:0,640:1,1024:2,2048:3",
                        help="tokens:images of each packed conversation (LoRA step)")
    parser.add_argument("--full-pack", default="384:0,640:1,1024:2", help="tokens:images, full-parameter step")
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; known: {list(SECTIONS)}")
    args.stage1_mode = [m.strip() for m in args.stage1_mode.split(",") if m.strip()]
    if not set(args.stage1_mode) <= {"lora", "full"}:
        parser.error(f"--stage1-mode: expected lora and/or full; got {args.stage1_mode}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first warm-up step counts FLOPs)")
    args.stage1_pack, args.full_pack = parse_pack(args.stage1_pack, parser), parse_pack(args.full_pack, parser)
    return args


def parse_pack(text: str, parser) -> list[tuple[int, int]]:
    try:
        pack = [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        parser.error(f"pack {text!r}: expected tokens:images,tokens:images,...")
    if not pack or any(len(p) != 2 or p[0] < 4 or p[1] < 0 for p in pack):
        parser.error(f"pack {text!r}: each item is tokens:images with tokens >= 4 and images >= 0")
    return pack


# ----------------------------------------------------------------------------- timing and memory


class Timeline:
    """Named points within one step: CUDA events on the GPU (stream time, no sync until read), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        """Seconds from the previous point to each named point, and "step": first point to last."""
        if self.cuda:
            torch.cuda.synchronize()
        seconds = (lambda a, b: a.elapsed_time(b) / 1000) if self.cuda else (lambda a, b: b - a)
        out = {name: seconds(a, b) for (_, a), (name, b) in zip(self.points, self.points[1:])}
        out["step"] = seconds(self.points[0][1], self.points[-1][1])
        return out


def memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}  # process-wide


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int, inner: int = 5) -> dict:
    """FLOP/s of an n x n x n matmul: 3 warm-up calls, then `repeats` batches of `inner` calls."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    rates = []
    for _ in range(repeats):
        timeline = Timeline(device)
        timeline.mark("start")
        for _ in range(inner):
            torch.matmul(a, b, out=c)
        timeline.mark("end")
        rates.append(2 * n**3 * inner / timeline.durations()["end"])
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "calls": repeats * inner,
            "tflops_median": round(statistics.median(rates) / 1e12, 2), "tflops_max": round(max(rates) / 1e12, 2),
            "tflops_min": round(min(rates) / 1e12, 2)}


# ----------------------------------------------------------------------------- model FLOPs


class ModelFlops:
    """Model FLOPs of one step, counted from the matmuls that run in its forward (docs/perf.md).

    Inside `with counter:` (wrap the FORWARD only: recompute and backward are derived, never counted):
    - every nn.Linear / nn.ConvNd call: forward 2 k n per output row (k inputs, n outputs; a conv's rows are its
      output positions); backward adds the same again for the input gradient when the input requires grad and
      again for the weight gradient when the weight does. So a trained weight with a gradient flowing into it
      costs 6 N T, a frozen weight gradients pass through (LoRA base) 4 N T, a forward-only one (no_grad) 2 N T.
    - every F.scaled_dot_product_attention call: forward 2 (d_qk + d_v) per attended (query, key) pair per head,
      the pairs being what the mask / causality allow (a packed block-diagonal causal mask counts only its
      True entries); backward 2x forward when any of q, k, v requires grad.
    Calls are attributed to the innermost of `parts` (name -> module) that is running.
    """

    KINDS = ("linear_forward", "linear_backward", "attention_forward", "attention_backward")

    def __init__(self, parts: dict[str, nn.Module]):
        self.parts = parts
        self.counts: dict[str, dict[str, int]] = {}
        self.stack: list[str] = []
        self.handles = []
        self.original_sdpa = None

    def add(self, part: str, kind: str, flops: int) -> None:
        self.counts.setdefault(part, dict.fromkeys(self.KINDS, 0))[kind] += int(flops)

    def __enter__(self) -> "ModelFlops":
        owner = {}
        for name, root in self.parts.items():
            for module in root.modules():
                owner.setdefault(id(module), name)  # first listed part wins for shared modules
            self.handles.append(root.register_forward_pre_hook(self.enter_part(name)))
            self.handles.append(root.register_forward_hook(self.leave_part, always_call=True))
        seen = set()
        for root in self.parts.values():
            for module in root.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and id(module) not in seen:
                    seen.add(id(module))
                    part = owner[id(module)]
                    hook = lambda m, a, o, part=part: self.on_matmul(part, m, a, o)  # noqa: E731
                    self.handles.append(module.register_forward_hook(hook))
        self.original_sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self.sdpa  # transformers and diffusers look it up at call time
        return self

    def __exit__(self, *exc) -> None:
        F.scaled_dot_product_attention = self.original_sdpa
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def enter_part(self, name: str):
        def hook(module, args) -> None:  # returns None: the inputs are left alone
            self.stack.append(name)
        return hook

    def leave_part(self, module, args, output) -> None:  # returns None: a hook's return value replaces the output
        self.stack.pop()

    def on_matmul(self, part: str, module: nn.Module, args, output) -> None:
        x = args[0]
        if isinstance(module, nn.Linear):
            forward = 2 * module.in_features * module.out_features * (x.numel() // module.in_features)
        else:  # conv: 2 x (weights per output channel) x output elements
            forward = 2 * module.weight[0].numel() * output.numel()
        grad = torch.is_grad_enabled()
        backward = forward * (int(grad and x.requires_grad) + int(grad and module.weight.requires_grad))
        self.add(part, "linear_forward", forward)
        self.add(part, "linear_backward", backward)

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        lq, lk = query.shape[-2], key.shape[-2]
        heads = math.prod(query.shape[:-2])  # batch x query heads (GQA: keys are shared, the work is not)
        if attn_mask is not None:
            allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
            pairs = int(torch.broadcast_to(allowed, (*query.shape[:-2], lq, lk)).sum())
        elif is_causal:  # top-left aligned, as SDPA's is_causal
            pairs = heads * sum(min(i + 1, lk) for i in range(lq))
        else:
            pairs = heads * lq * lk
        forward = 2 * pairs * (query.shape[-1] + value.shape[-1])
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        part = self.stack[-1] if self.stack else "other"
        self.add(part, "attention_forward", forward)
        self.add(part, "attention_backward", 2 * forward if grad else 0)
        return self.original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                  scale=scale, **kwargs)

    def summary(self) -> dict:
        total = sum(sum(c.values()) for c in self.counts.values())
        forward = sum(c["linear_forward"] + c["attention_forward"] for c in self.counts.values())
        return {"total": total, "forward": forward, "backward": total - forward,
                "attention": sum(c["attention_forward"] + c["attention_backward"] for c in self.counts.values()),
                "by_part": {k: dict(v) for k, v in sorted(self.counts.items())}}


# ----------------------------------------------------------------------------- running steps


def run_steps(forward, update, device: torch.device, warmup: int, steps: int, counter: ModelFlops | None) -> dict:
    """`forward(mark) -> loss`, `update(loss, mark)`; the first warm-up step's forward runs inside `counter`."""
    timed = []
    for i in range(warmup + steps):
        timeline = Timeline(device)
        timeline.mark("start")
        if i == 0 and counter is not None:
            with counter:
                loss = forward(timeline.mark)
        else:
            loss = forward(timeline.mark)
        timeline.mark("forward")
        update(loss, timeline.mark)
        durations = timeline.durations()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"step {i}: loss is {float(loss.detach())}")
        if i == warmup - 1:
            resident = memory(device)  # weights + optimiser state + EMA, after the first updates
        if i >= warmup:
            timed.append(durations)
    phases = {name: round(statistics.median(d[name] for d in timed), 4) for name in timed[0]}
    return {"step_s_median": phases.pop("step"), "step_s_all": [round(d["step"], 4) for d in timed],
            "phase_s_median": phases, "after_warmup": resident, **memory(device)}


def add_mfu(result: dict, flops: dict, reference_tflops: float | None, items: float, unit: str) -> None:
    step = result["step_s_median"]
    result["achieved_tflops"] = round(flops["total"] / step / 1e12, 2)
    result["mfu"] = round(flops["total"] / step / (reference_tflops * 1e12), 4) if reference_tflops else None
    result[f"{unit}_per_s"] = round(items / step, 2)


# ----------------------------------------------------------------------------- synthetic inputs


def ordinary_id_range(model) -> tuple[int, int]:
    """[low, high) of ids that are plain text: the special ids sit at the top (Qwen) or bottom (offline BPE)."""
    from duetgen.models.tokenizer import OFFLINE_TOKEN_IDS

    config = model.mllm.config
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id,
               *(i for i in (config.text_config.bos_token_id, config.text_config.eos_token_id,
                             config.text_config.pad_token_id) if i is not None)}
    vocab = config.text_config.vocab_size
    if max(special) < vocab // 2:
        return max(special | set(OFFLINE_TOKEN_IDS.values())) + 1, vocab
    return 0, min(special)


def synthetic_sequence(model, n_tokens: int, n_images: int, image_hw: tuple[int, int], seed: int):
    """A `RenderedSequence` of exactly n_tokens laid out as the renderer lays a conversation out: a question
    (no loss), then answer text (loss) around n_images vision blocks (no loss), random pixels through the
    model's own image processor (its side cap applies). Ids are random ordinary text ids."""
    from PIL import Image

    from duetgen.models.mllm import IGNORE_INDEX, RenderedSequence

    rng = np.random.default_rng(seed)
    config = model.mllm.config
    processor = model.image_processor
    processed = [processor.process_one(Image.fromarray(rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8)))
                 for _ in range(n_images)]
    image_tokens = [int(np.prod(grid)) // processor.merge_size**2 for _, grid in processed]
    text_total = n_tokens - sum(n + 2 for n in image_tokens)
    if text_total < n_images + 2:
        raise ValueError(f"a {n_tokens}-token sequence cannot hold {n_images} images of {image_tokens} tokens "
                         f"and text around them")
    low, high = ordinary_id_range(model)
    chunks = np.array_split(np.arange(text_total), n_images + 2)  # question, answer text around each image
    ids, labels = [], []
    for i, chunk in enumerate(chunks):
        text = rng.integers(low, high, len(chunk)).tolist()
        ids += text
        labels += text if i > 0 else [IGNORE_INDEX] * len(text)
        if 1 <= i <= n_images:
            pads = [config.image_token_id] * image_tokens[i - 1]
            block = [config.vision_start_token_id, *pads, config.vision_end_token_id]
            ids += block
            labels += [IGNORE_INDEX] * len(block)
    return RenderedSequence(
        input_ids=torch.tensor(ids), labels=torch.tensor(labels),
        pixel_values=torch.from_numpy(np.concatenate([p for p, _ in processed])) if processed else None,
        image_grid_thw=torch.tensor([g for _, g in processed], dtype=torch.long) if processed else None,
        record_id=f"synthetic-{seed}",
    )


def count_parameters(module: nn.Module) -> dict:
    params = {id(p): p for p in module.parameters()}.values()
    return {"trained": sum(p.numel() for p in params if p.requires_grad),
            "frozen": sum(p.numel() for p in params if not p.requires_grad)}


def flop_parts(model) -> dict[str, nn.Module]:
    inner = model.mllm.model
    return {"mllm_vision": inner.visual, "mllm_text": inner.language_model, "lm_head": model.mllm.lm_head,
            "connector": model.connector, "dit": model.dit}


# ----------------------------------------------------------------------------- the parts


def check_vae(model, args, device, autocast) -> dict:
    """Wan2.1 encode of the stage-2 step's 4 images (not part of the timed step, which uses random latents)."""
    h, w = model.config.image_size
    g = torch.Generator(device=device).manual_seed(1)
    pixels = [torch.rand(3, h, w, device=device, generator=g) * 2 - 1 for _ in range(args.conditioning_frames + 1)]

    @torch.no_grad()
    def forward(mark):
        with autocast:
            latents = model.vae.encode_list(pixels)
        return torch.stack([z.float().mean() for z in latents]).sum()

    result = run_steps(forward, lambda loss, mark: None, device, args.warmup, args.steps, counter=None)
    result["images"], result["image_hw"] = len(pixels), [h, w]
    result["autoencoder"] = type(model.vae).__name__
    return result


def check_stage2(model, args, device, autocast, reference) -> dict:
    from duetgen.diffusion.flow_matching import dit_sample_inputs, flow_matching_loss, make_training_example
    from duetgen.train.optim import EMA, clip_grad_norm, make_adamw
    from duetgen.train.stage2 import mllm_states

    model.freeze_mllm()
    trainable = nn.ModuleDict({"connector": model.connector, "dit": model.dit}).train()  # as stage2.py
    if device.type == "cuda":
        trainable.to(getattr(torch, args.master_dtype))
    h, w = model.config.image_size
    f = model.vae.spatial_factor
    c = model.dit.latent_channels
    g = torch.Generator(device=device).manual_seed(0)
    latents = [torch.randn(c, h // f, w // f, device=device, generator=g) for _ in range(args.conditioning_frames + 1)]
    cond, x0 = latents[:-1], latents[-1]  # random stand-ins for VAE latents (module docstring)
    noise = torch.randn(x0.shape, device=device, generator=g)
    t = torch.tensor(0.7, device=device)
    x_t, _ = make_training_example(x0, noise, t)
    frames, times, mask = dit_sample_inputs(cond, x_t, t)
    prefix = synthetic_sequence(model, args.stage2_mllm_tokens, args.conditioning_frames, (h, w), seed=2)
    optimizer = make_adamw(trainable, lr=1e-5, weight_decay=0.01)
    ema = EMA(trainable, decay=0.9999)

    def forward(mark):
        with autocast:
            states = mllm_states(model.mllm, [prefix])[0]  # (L, n_layers * D), no grad
            mark("condition")
            text = model.connector(states)  # (L, D_cross), as stage2.pack_loss
            out = model.dit(frames=[frames], timesteps=[times], condition_mask=[mask], text=[text], targets_only=True)
            return flow_matching_loss(out[0][0], x0, noise, t, model.config.parameterisation)

    def update(loss, mark):
        loss.backward()
        mark("backward")
        clip_grad_norm(trainable.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(trainable)
        mark("optimizer")

    plan = model.dit.plan([[tuple(x.shape[-2:]) for x in frames]])
    result = {
        "image_hw": [h, w], "latent_chw": list(x0.shape), "frames": len(frames), "dit_tokens": plan.num_tokens,
        "tokens_per_frame": plan.frame_tokens[-1], "mllm_tokens": len(prefix),
        "mllm_image_tokens": [int(grid.prod()) // model.image_processor.merge_size**2 for grid in prefix.image_grid_thw],
        "condition_channels": model.connector.in_channels, "attention": model.dit.attention,
        "parameterisation": model.config.parameterisation, "trained_dtype": str(next(trainable.parameters()).dtype),
        "parameters": {"trained": count_parameters(trainable)["trained"],
                       "frozen_mllm": count_parameters(model.mllm)["frozen"]},
        "latents": "random (VAE encode skipped in the step; see the vae part)",
    }
    flops = None
    modes = [False] if args.no_checkpointing else [False, True]
    for checkpointing in modes:
        key = "checkpointed" if checkpointing else "plain"
        model.dit.gradient_checkpointing = checkpointing
        counter = ModelFlops(flop_parts(model)) if flops is None else None
        try:
            result[key] = run_steps(forward, update, device, args.warmup, args.steps, counter)
        except Exception as e:  # noqa: BLE001 -- the other mode may still run (an OOM plain, checkpointed fits)
            result[key] = error_entry(e)
        finally:
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)
        if counter is not None and "error" not in result[key]:
            flops = counter.summary()
        if "error" not in result[key] and flops is not None:
            add_mfu(result[key], flops, reference, items=1, unit="samples")
        progress(f"stage2 {key}: {result[key]}")
    model.dit.gradient_checkpointing = False
    result["model_flops"] = flops
    del optimizer, ema
    return result


def check_stage1(model, args, device, autocast, reference, mode: str) -> dict:
    from duetgen.train.optim import clip_grad_norm, make_adamw
    from duetgen.train.common import pack_inputs
    from duetgen.train.stage1 import next_token_loss

    mllm = model.mllm
    h, w = model.config.image_size
    pack = args.stage1_pack if mode == "lora" else args.full_pack
    seqs = [synthetic_sequence(model, n, k, (h, w), seed=10 + i) for i, (n, k) in enumerate(pack)]
    inputs = pack_inputs(mllm, seqs)  # (1, T) ids, (3, 1, T) mrope positions, (1, 1, T, T) block-diagonal mask
    result = {"mode": mode, "tokens": int(inputs["input_ids"].shape[1]), "conversations": len(seqs),
              "images": sum(k for _, k in pack), "supervised_tokens": int((inputs["labels"] != -100).sum()),
              "pack": [list(p) for p in pack], "attention_mask": "dense block-diagonal causal (stage1.py)"}
    lora = None
    if mode == "lora":
        import peft

        from duetgen.train.lora import LANGUAGE_MODEL_TARGETS as targets  # language model only, not the ViT's MLP
        config = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                 target_modules=targets)
        lora = peft.get_peft_model(mllm, config)  # wraps in place: `mllm` now runs through the LoRA layers
        result["lora"] = {"peft": peft.__version__, "rank": args.lora_rank, "alpha": 2 * args.lora_rank,
                          "target_modules": targets,
                          "adapter_dtype": str(next(p.dtype for p in mllm.parameters() if p.requires_grad))}
    else:
        mllm.requires_grad_(True)
        result["weights_and_adam_state_dtype"] = str(next(mllm.parameters()).dtype)
    mllm.train()
    result["parameters"] = count_parameters(mllm)
    optimizer = make_adamw(mllm, lr=1e-5, weight_decay=0.0)
    trained = [p for p in mllm.parameters() if p.requires_grad]

    def forward(mark):
        with autocast:
            loss, _ = next_token_loss(mllm, inputs)
        return loss

    def update(loss, mark):
        loss.backward()
        mark("backward")
        clip_grad_norm(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")

    counter = ModelFlops(flop_parts(model))
    try:
        result["step"] = run_steps(forward, update, device, args.warmup, args.steps, counter)
        result["model_flops"] = counter.summary()
        add_mfu(result["step"], result["model_flops"], reference, items=result["tokens"], unit="tokens")
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        if lora is not None:
            lora.unload()  # back to the plain model, LoRA layers removed
        mllm.requires_grad_(False)
        free_memory(device)
    return result


# ----------------------------------------------------------------------------- main


def progress(message: str) -> None:
    print(f"[gpu_check_train {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def error_entry(e: BaseException) -> dict:
    oom = isinstance(e, torch.cuda.OutOfMemoryError)
    return {"error": ("out of memory: " if oom else f"{type(e).__name__}: ") + str(e)[:800], "oom": oom,
            "traceback": traceback.format_exc().splitlines()[-12:]}


def has_error(entry) -> bool:
    return isinstance(entry, dict) and ("error" in entry or any(has_error(v) for v in entry.values()))


def run_part(result: dict, name: str, fn, args, device) -> None:
    """result[name] = fn(), or the error (type, message, last frames); then the JSON is rewritten."""
    start = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as e:  # noqa: BLE001 -- one failed part must not lose the others (module docstring)
        result[name] = error_entry(e)
    if has_error(result[name]):
        result["failed"].append(name)
    free_memory(device)
    if isinstance(result[name], dict):
        result[name]["part_wall_s"] = round(time.perf_counter() - start, 2)
    progress(f"{name}: {json.dumps(result[name])[:2000]}")
    write_json(result, args.out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    elif args.allow_cpu and args.preset == "tiny":
        device, dtype = torch.device("cpu"), torch.float32
    else:
        print("gpu_check_train: no CUDA device. This check needs a GPU (it trains steps of the real 10B-parameter "
              "preset); for a CPU smoke run pass --allow-cpu --preset tiny.", file=sys.stderr)
        return 2
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")  # as stage1/2.py

    import diffusers
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError as e:
        peft_version = f"not importable: {e}"
    result = {
        "script": "benchmarks/gpu_check_train.py", "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "diffusers": diffusers.__version__, "peft": peft_version,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "failed": [],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        result["capability"] = f"{props.major}.{props.minor}"
    write_json(result, args.out)

    reference = None
    if "matmul" in args.sections:
        size = args.matmul_size or (8192 if device.type == "cuda" else 256)
        run_part(result, "matmul", lambda: matmul_rate(device, dtype, size, args.matmul_repeats), args, device)
        reference = result["matmul"].get("tflops_median")
    if not set(args.sections) & {"vae", "stage2", "stage1"}:
        print(json.dumps(result, indent=2))
        return 1 if result["failed"] else 0

    from duetgen.models.builder import build

    holder = {}

    def build_model():
        start = time.perf_counter()
        holder["model"] = build(args.preset, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"seconds": round(time.perf_counter() - start, 2), "parameters": holder["model"].num_parameters(),
                **memory(device)}

    run_part(result, "build", build_model, args, device)
    model = holder.get("model")
    if model is not None:
        if "vae" in args.sections:
            run_part(result, "vae", lambda: check_vae(model, args, device, autocast), args, device)
        if "stage2" in args.sections:
            run_part(result, "stage2", lambda: check_stage2(model, args, device, autocast, reference), args, device)
        if "stage1" in args.sections:
            # the DiT side is done: free it, stage 1 trains the MLLM alone
            model.connector.to("meta")
            model.dit.to("meta")
            model.vae.to("meta")
            free_memory(device)
            for mode in args.stage1_mode:
                name = f"stage1_{mode}"
                run_part(result, name, lambda: check_stage1(model, args, device, autocast, reference, mode), args, device)
                if (mode == "lora" and name in result["failed"] and not result[name].get("oom")
                        and "full" not in args.stage1_mode):
                    progress("the LoRA step failed; measuring a full-parameter step instead (--full-pack)")
                    result["stage1_full_note"] = "run because the LoRA step failed (see stage1_lora.error)"
                    run_part(result, "stage1_full",
                             lambda: check_stage1(model, args, device, autocast, reference, "full"), args, device)
    print(json.dumps(result, indent=2))
    write_json(result, args.out)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
