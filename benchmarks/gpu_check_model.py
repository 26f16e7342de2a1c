"""GPU check of the real DuetGen preset (issue 3): random bf16 weights on one GPU, time and peak memory.

    python benchmarks/gpu_check_model.py --out benchmarks/results/gpu_check_model.json        # on a GPU
    python benchmarks/gpu_check_model.py --allow-cpu --preset tiny --out /tmp/smoke.json       # CPU smoke run

1. Build `qwen2.5-vl-7b+cosmos-predict2.5-2b` on the meta device, allocate it on the GPU and initialise it
   there (`builder.build`: float32 init, then bf16). Nothing is downloaded; the weights are random, which
   changes neither the time nor the memory of a step.
2. One packed DiT training step (stage 2): a 768x768 target (paper section 5) with 3 clean 768x768
   conditioning frames: Wan2.1 f = 8 -> 96x96 latents -> patch 2 -> 48x48 = 2,304 tokens per frame,
   9,216 tokens in all; the text condition is `--text-tokens` all-layer MLLM states (100,352 channels)
   through the connector; flow-matching loss on the target, backward into connector + DiT. Measured
   without and with per-block activation checkpointing.
3. One MLLM forward (the stage-2 condition path: all-layer normalised states, no lm_head) of
   `--mllm-tokens` tokens holding 4 images (768x768 inputs, capped at 480 px: 289 tokens each).

Each measurement: one warm-up, then the mean of `--repeats` timed runs; peak memory is
`torch.cuda.max_memory_allocated` over the timed runs (weights included). Prints one JSON object to
stdout and writes it to `--out`. Refuses to run without a GPU unless `--allow-cpu --preset tiny`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REAL_PRESET = "qwen2.5-vl-7b+cosmos-predict2.5-2b"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=REAL_PRESET)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke run on the CPU (only with --preset tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conditioning-frames", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=2048, help="length of the DiT's text condition")
    parser.add_argument("--mllm-tokens", type=int, default=2048)
    parser.add_argument("--mllm-images", type=int, default=4)
    return parser.parse_args()


class Clock:
    """Wall time and peak memory of a block, synchronising the GPU around it."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn, repeats: int) -> dict:
        fn()  # warm-up (kernels chosen, caches filled)
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return {"seconds_mean": round(float(np.mean(times)), 4), "seconds_min": round(min(times), 4),
                **self.memory()}

    def memory(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2),
                    "allocated_gib": round(torch.cuda.memory_allocated(self.device) / 2**30, 2)}
        return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def dit_step(model, frames_hw: tuple[int, int], n_cond: int, text_tokens: int, device, dtype, seed: int = 0):
    """A closure running one packed DiT forward + backward (stage 2) on random latents and states."""
    from duetgen.diffusion.flow_matching import flow_matching_loss, make_training_example

    g = torch.Generator(device=device).manual_seed(seed)
    f = model.vae.spatial_factor
    h, w = frames_hw[0] // f, frames_hw[1] // f
    c = model.dit.latent_channels
    cond = [torch.randn(c, h, w, generator=g, device=device, dtype=dtype) for _ in range(n_cond)]
    x0 = torch.randn(c, h, w, generator=g, device=device)
    noise = torch.randn(c, h, w, generator=g, device=device)
    t = torch.tensor(0.7, device=device)
    x_t, _ = make_training_example(x0, noise, t)
    states = torch.randn(text_tokens, model.connector.in_channels, generator=g, device=device, dtype=dtype)
    times = torch.tensor([0.0] * n_cond + [0.7], device=device)
    mask = torch.arange(n_cond + 1, device=device) < n_cond
    plan = model.dit.plan([[(h, w)] * (n_cond + 1)])

    def step():
        text = model.connect(states)  # (L, 1024)
        raw = model.dit.forward_planned(plan, [cond + [x_t.to(dtype)]], [times], [mask], [text], targets_only=True)
        loss = flow_matching_loss(raw[0][0].float(), x0, noise, t, model.config.parameterisation)
        loss.backward()
        for p in model.generator_parameters():
            p.grad = None

    return step, {"latent_hw": [h, w], "frames": n_cond + 1, "tokens": sum(plan.frame_tokens),
                  "tokens_per_frame": plan.frame_tokens[-1], "text_tokens": text_tokens}


def mllm_inputs(model, n_tokens: int, n_images: int, image_hw: tuple[int, int], device, dtype, seed: int = 0):
    """A sequence of n_tokens: text of random ordinary ids around n_images vision blocks, as the renderer lays
    them out; pixels from random images of image_hw through the model's own image processor (side cap on)."""
    from PIL import Image

    from duetgen.models.mllm import rope_position_ids

    rng = np.random.default_rng(seed)
    config = model.mllm.config
    images = [Image.fromarray(rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8)) for _ in range(n_images)]
    pixel_values, grid = model.image_processor(images)
    image_tokens = [int(g.prod()) // model.image_processor.merge_size**2 for g in grid]
    text_total = n_tokens - sum(n + 2 for n in image_tokens)
    if text_total < n_images + 1:
        raise SystemExit(f"--mllm-tokens {n_tokens} is too short for {n_images} images of {image_tokens} tokens")
    chunks = np.array_split(np.arange(text_total), n_images + 1)
    # ordinary text ids: the special ids sit at the top of the vocabulary (Qwen) or at the bottom (offline BPE)
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id,
               *(i for i in (config.text_config.bos_token_id, config.text_config.eos_token_id,
                             config.text_config.pad_token_id) if i is not None)}
    vocab = config.text_config.vocab_size
    low, high = (max(special) + 1, vocab) if max(special) < vocab // 2 else (0, min(special))
    ids = []
    for i, chunk in enumerate(chunks):
        ids.extend(rng.integers(low, high, len(chunk)).tolist())
        if i < n_images:
            ids.extend([config.vision_start_token_id] + [config.image_token_id] * image_tokens[i]
                       + [config.vision_end_token_id])
    input_ids = torch.tensor(ids, device=device)
    grid = grid.to(device)
    inputs = {"input_ids": input_ids[None], "position_ids": rope_position_ids(model.mllm, input_ids, grid)[:, None],
              "pixel_values": pixel_values.to(device=device, dtype=dtype), "image_grid_thw": grid}
    return inputs, {"tokens": len(ids), "images": n_images, "image_tokens": image_tokens,
                    "input_image_hw": list(image_hw)}


def main() -> int:
    args = parse_args()
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    elif args.allow_cpu and args.preset == "tiny":
        device, dtype = torch.device("cpu"), torch.float32
    else:
        print("gpu_check_model: no CUDA device. This check needs a GPU (it builds the real 10B-parameter preset); "
              "for a CPU smoke run pass --allow-cpu --preset tiny.", file=sys.stderr)
        return 2

    from duetgen.models.mllm import layer_states
    from duetgen.models.builder import build

    clock = Clock(device)
    result = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__}

    # 1. Build: meta, then allocate + initialise on the device, then cast
    start = time.perf_counter()
    model = build(args.preset, device=device, dtype=dtype)
    clock.sync()
    result["build"] = {"seconds": round(time.perf_counter() - start, 2), "parameters": model.num_parameters(),
                       **clock.memory()}
    image_hw = tuple(model.config.image_size)

    # 2. Packed DiT forward + backward: 3 conditioning frames + 1 target at the generation size
    model.freeze_mllm()
    model.dit.train()
    step, shape = dit_step(model, image_hw, args.conditioning_frames, args.text_tokens, device, dtype)
    result["dit_forward_backward"] = {"image_hw": list(image_hw), **shape, "attention": model.dit.attention}
    for checkpointing in (False, True):
        model.dit.gradient_checkpointing = checkpointing
        key = "checkpointed" if checkpointing else "plain"
        result["dit_forward_backward"][key] = clock.measure(step, args.repeats)
        print(f"dit {key}: {result['dit_forward_backward'][key]}", file=sys.stderr)
    model.dit.gradient_checkpointing = False
    model.dit.eval()
    del step

    # 3. MLLM forward of a 2k-token sequence with 4 images: the stage-2 condition path
    inputs, shape = mllm_inputs(model, args.mllm_tokens, args.mllm_images, image_hw, device, dtype)

    @torch.no_grad()
    def forward():
        out = model.mllm.model(**inputs, output_hidden_states=True, use_cache=False)
        return layer_states(out.hidden_states)  # (1, L, n_layers * D)

    result["mllm_forward"] = {**shape, "condition_channels": model.connector.in_channels,
                              **clock.measure(forward, args.repeats)}
    print(f"mllm: {result['mllm_forward']}", file=sys.stderr)

    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
