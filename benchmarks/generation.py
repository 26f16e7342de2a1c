"""Interleaved generation: KV-cached decode loop vs re-prefill, and batched guidance vs two DiT calls.

One run, same model, same weights, same answer:

1. A 4-image answer (a ShapeWorld continuation prompt with a canvas) generated twice by the engine:
   with one KV cache for the whole answer, and with the baseline that re-prefills the whole history
   (prompt, text so far, every image) for every token. Prints the MLLM time of each (the engine's
   own forward timers), their ratio, and checks that both produced the same tokens.
2. Drawing the answer's last image (4 conditioning frames, its real text condition) with guidance:
   positive and negative as two samples of ONE packed DiT call per step (what the engine does)
   against two DiT calls per step. Prints both times, the ratio and the max difference of the latents.

Model: the shipped ShapeWorld checkpoint when it exists (or --model DIR), else the `toy` preset with
random weights; `--preset toy` builds the preset with random weights even when the checkpoint exists. Random weights never write <BOV>, and a trained model may not write 4: the answer's
structure is forced through the engine's documented logits_processor hook (<BOV> after every
--tokens-per-step text tokens, 4 times, then end of turn); every other token is the model's own
greedy choice, identical in both loops.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generation.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generation.py --quick      # fewer repeats
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generation.py --quick --preset toy   # random weights

GPU check (issue 5; needs a CUDA device): the real-dimension preset (Qwen2.5-VL-7B + Cosmos-Predict2.5-2B
+ Wan2.1 VAE) with random bf16 weights, one 4-image answer at 768x768 with 30 steps; prints time to
first token, per-image latency and peak memory:

    .venv/bin/python benchmarks/generation.py --gpu-check [--gpu-check-preset tiny --device cpu to dry-run]

Zero-shot step of the GPU check (issue 19; runs after the measurement above, skipped with a printed line
when no real weights are given): real weights from `--real-weights DIR` or `$DUETGEN_REAL_WEIGHTS`, either
an assembled DuetGen directory (`duetgen model assemble`, has duetgen.json) or a diffusers
Cosmos-Predict2.5 pipeline directory (has model_index.json; assembled in memory, checked against the real
preset; `--real-processor DIR` or `$DUETGEN_REAL_PROCESSOR` when the snapshot has no
preprocessor_config.json). One 768x768 text-to-image sample with the Cosmos framing (as
`duetgen generate --framing cosmos`), the model's sampler steps and guidance unless given; writes
zero_shot_cosmos.png and zero_shot_cosmos.json (prompt, seed, steps, guidance, wall time, peak GPU memory,
the model's provenance) to `--zero-shot-out DIR`, default `$OUT`:

    DUETGEN_REAL_WEIGHTS=/data/duetgen-real .venv/bin/python benchmarks/generation.py --gpu-check \
        --gpu-check-sections zero_shot --zero-shot-out /tmp/zero_shot            # the step alone
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from duetgen.data.record import ImagePart, Message, TextPart
from duetgen.diffusion.draw import draw_latent, network_x0, previous_canvas, white_canvas_latent
from duetgen.diffusion.flow_matching import dit_sample_inputs, to_x0_and_velocity
from duetgen.diffusion.sampling import sample
from duetgen.infer.engine import GenerationConfig, InterleavedEngine
from duetgen.infer.pipeline import DEFAULT_MODEL_DIR
from duetgen.models import builder, presets
from duetgen.models.duetgen import DuetGen
from duetgen.models.mllm import TokenIds
from duetgen.models.tokenizer import OFFLINE_TOKEN_IDS
from duetgen.shapeworld import world

N_IMAGES = 4


def force_structure(ids: TokenIds, n_images: int, tokens_per_step: int, stop_ids=()):
    """logits_processor: <BOV> after every `tokens_per_step` text tokens (n_images times), then <|im_end|>.

    In between, <BOV> and the end-of-turn tokens (``stop_ids``) are masked: a trained model would
    otherwise draw or stop earlier than the structure says, and the answer would depend on the checkpoint.
    """
    def processor(generated, logits):
        since = len(generated) - (max(i for i, t in enumerate(generated) if t == ids.bov) + 1 if ids.bov in generated else 0)
        images = generated.count(ids.bov)
        forced = ids.bov if images < n_images and since == tokens_per_step else (
            ids.im_end if images == n_images and since == tokens_per_step else None)
        if forced is None:
            logits = logits.clone()
            logits[[ids.bov, ids.im_end, *stop_ids]] = float("-inf")
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[forced] = 0.0
        return out
    return processor


def continuation_prompt() -> list[Message]:
    task = world.sample_task("continuation", random.Random(0))
    return [Message("user", [ImagePart(world.render(task.initial)), TextPart(task.prompt())])]


def load_model(args) -> tuple[DuetGen, str]:
    if args.preset is not None:
        if args.model is not None:
            raise SystemExit("give --model DIR or --preset NAME, not both")
        return builder.build(args.preset, device=args.device).eval(), f"{args.preset} preset, random weights"
    if args.model or (DEFAULT_MODEL_DIR / "duetgen.json").is_file():
        path = args.model or DEFAULT_MODEL_DIR
        return DuetGen.from_pretrained(path, device=args.device).eval(), str(path)
    return builder.build("toy", device=args.device).eval(), "toy preset, random weights"


# ----------------------------------------------------------------------------- 1. KV cache vs re-prefill


def kv_cache_vs_reprefill(model, args) -> dict:
    engine = InterleavedEngine(model)
    ids = TokenIds.from_tokenizer(model.tokenizer)
    config = GenerationConfig(max_new_tokens=N_IMAGES * (args.tokens_per_step + 1) + args.tokens_per_step + 1,
                              num_steps=1, guidance_scale=1.0)  # the DiT is measured in part 2
    processor = force_structure(ids, N_IMAGES, args.tokens_per_step, engine.eos_ids)
    messages = continuation_prompt()
    times = {"kv_cache": [], "recompute": []}
    tokens = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for context in (["kv_cache", "recompute"] if repeat % 2 else ["recompute", "kv_cache"]):
            finished = engine.run(messages, config, context=context, logits_processor=processor)
            assert finished.stats["images"] == N_IMAGES, finished.stats
            tokens[context] = list(engine.last_context.input_ids)
            if repeat:
                times[context].append(engine.last_context.forward_seconds)
    assert tokens["kv_cache"] == tokens["recompute"], "the two loops wrote different tokens"
    cached, naive = statistics.median(times["kv_cache"]), statistics.median(times["recompute"])
    return {"context_tokens": len(tokens["kv_cache"]), "new_tokens": finished.stats["new_tokens"],
            "kv_cache_s": cached, "recompute_s": naive, "ratio": naive / cached, "engine": engine,
            "messages": messages, "config": config, "processor": processor}


# ----------------------------------------------------------------------------- 2. batched vs two-call guidance


def two_call_denoiser(model, cond_frames, text_pos, text_neg, scale, size):
    """The baseline: the positive and the negative branch as two separate DiT calls per step.

    Everything else as `duetgen.diffusion.draw.draw_latent` does it (target frames only, the condition-frame
    and relative-x0 settings the model was trained with), so only the batching differs.
    """
    config = model.config
    cond = [f.to(text_pos.dtype) for f in cond_frames] if config.use_condition_frames else []
    previous = None
    if config.x0_relative_to_previous:
        previous = previous_canvas(cond, lambda: white_canvas_latent(model.vae, *size, model.device))

    def raw(frames, times, mask, text):
        out = model.dit(frames=[frames], timesteps=[times], condition_mask=[mask], text=[text], targets_only=True)
        return network_x0(out[0][-1], previous)

    def denoise(x_t, t):
        frames, times, mask = dit_sample_inputs(cond, x_t.to(text_pos.dtype), t)
        _, v_pos = to_x0_and_velocity(raw(frames, times, mask, text_pos), x_t, t, config.parameterisation)
        _, v_neg = to_x0_and_velocity(raw(frames, times, mask, text_neg), x_t, t, config.parameterisation)
        return v_neg + scale * (v_pos - v_neg)

    return denoise


def batched_vs_two_calls(model, part1, args) -> dict:
    """Draw the last image of part 1's answer both ways, from the same noise."""
    engine, messages = part1["engine"], part1["messages"]
    finished = engine.run(messages, part1["config"], logits_processor=part1["processor"])
    ctx = engine.last_context
    ids = engine.ids
    last_bov = max(i for i, t in enumerate(ctx.input_ids) if t == ids.bov)
    text_pos = model.connect(ctx.states(last_bov))  # (L, D_cross)
    last_image_end = max(i for i, t in enumerate(ctx.input_ids[:last_bov]) if t == ids.vision_end)
    text_neg = text_pos[:last_image_end + 1]
    pictures = [p.image for p in messages[0].content if isinstance(p, ImagePart)]
    pictures += [p.image for p in finished.content if isinstance(p, ImagePart)][:N_IMAGES - 1]
    cond = [engine.condition_latent(p) for p in pictures]  # 4 conditioning frames
    h, w = model.config.image_size
    f = model.vae.spatial_factor
    sampler = dataclasses.replace(model.config.sampler, num_steps=args.steps)
    scale = args.guidance

    def noise():
        return torch.randn(model.dit.latent_channels, h // f, w // f, generator=torch.Generator().manual_seed(0)).to(model.device)

    def batched():
        return draw_latent(model, cond, text_pos, text_neg, size=(h, w), generator=torch.Generator().manual_seed(0),
                           sampler=sampler, guidance_scale=scale)

    def two_calls():
        denoise = two_call_denoiser(model, cond, text_pos, text_neg, scale, (h, w))
        return sample(denoise, noise(), sampler)

    times = {"batched": [], "two_calls": []}
    results = {}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            for name, fn in ([("batched", batched), ("two_calls", two_calls)] if repeat % 2
                             else [("two_calls", two_calls), ("batched", batched)]):
                t0 = time.perf_counter()
                results[name] = fn()
                if repeat:
                    times[name].append(time.perf_counter() - t0)
    diff = (results["batched"] - results["two_calls"]).abs().max().item()
    b, two = statistics.median(times["batched"]), statistics.median(times["two_calls"])
    return {"cond_frames": len(cond), "text_tokens": (len(text_pos), len(text_neg)), "batched_s": b,
            "two_calls_s": two, "ratio": two / b, "max_diff": diff}


# ----------------------------------------------------------------------------- GPU check


def gpu_check(args) -> None:
    """Real-dimension preset, random weights, one 4-image answer: TTFT, per-image latency, peak memory."""
    from duetgen.infer.engine import ImageDone

    if not args.device.startswith("cuda") and args.gpu_check_preset == presets.REAL_PRESET:
        # the real preset in float32 on the host is ~40 GB and says nothing about GPU latency
        raise SystemExit("--gpu-check with the real preset needs --device cuda "
                         "(dry-run on the CPU with --gpu-check-preset tiny --device cpu)")
    preset = presets.get_preset(args.gpu_check_preset)
    if preset.tokenizer is None:
        # The real tokenizer comes with the weights; offline we use the ShapeWorld BPE and point the
        # model's special-token ids at it. Every layer keeps its real size; only the vocabulary (and so
        # embed_tokens / lm_head) shrinks from 152,064 rows to the offline tokenizer's.
        mllm = copy.deepcopy(preset.mllm)
        ids = OFFLINE_TOKEN_IDS
        mllm.image_token_id, mllm.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
        mllm.vision_start_token_id, mllm.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
        mllm.text_config.eos_token_id, mllm.text_config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
        preset = dataclasses.replace(preset, mllm=mllm, tokenizer="shapeworld", tokenizer_vocab_size=512)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    model = builder.build(preset, device=args.device, dtype=dtype).eval()
    model.vae.to(torch.float32)
    print(f"built {preset.name} with random {dtype} weights on {args.device} in {time.perf_counter() - t0:.1f} s: "
          f"{model.num_parameters()}")
    size = tuple(args.gpu_image_size or model.config.image_size)
    engine = InterleavedEngine(model)
    ids = TokenIds.from_tokenizer(model.tokenizer)
    config = GenerationConfig(max_new_tokens=N_IMAGES * (args.tokens_per_step + 1) + args.tokens_per_step + 1,
                              num_steps=args.gpu_steps, image_size=size)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    events = []
    t0 = time.perf_counter()
    finished = engine.run(continuation_prompt(), config, emit=events.append,
                          logits_processor=force_structure(ids, N_IMAGES, args.tokens_per_step, engine.eos_ids))
    total = time.perf_counter() - t0
    per_image = [e.seconds for e in events if isinstance(e, ImageDone)]
    print(f"answer: {finished.stats['new_tokens']} tokens, {finished.stats['images']} images of {size[0]}x{size[1]}, "
          f"{args.gpu_steps} steps, guidance {model.config.guidance_scale}")
    print(f"time to first token: {finished.stats['time_to_first_token_s']:.3f} s")
    print("per-image latency (DiT sampling + decode + re-encode): " + ", ".join(f"{s:.2f} s" for s in per_image))
    print(f"MLLM time {finished.stats['mllm_s']:.2f} s, total {total:.2f} s")
    if args.device.startswith("cuda"):
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved")


# ----------------------------------------------------------------------------- GPU check: zero-shot step

ZERO_SHOT_PROMPT = "A red apple on a wooden table by a window, soft morning light, photograph."
ZERO_SHOT_NAME = "zero_shot_cosmos"  # <out>/zero_shot_cosmos.png and .json


def load_real_weights(path: Path, processor: Path | None, device: str, dtype: torch.dtype) -> tuple[DuetGen, str]:
    """An assembled DuetGen directory, or a Cosmos-Predict2.5 pipeline directory assembled in memory."""
    from duetgen.models.builder import assemble_from_pipeline

    if (path / "duetgen.json").is_file():
        return DuetGen.from_pretrained(path, device=device, dtype=dtype), "duetgen directory"
    if (path / "model_index.json").is_file():
        # settings: the real preset's with Cosmos' conditioning-frame time, as `duetgen model assemble --pipeline`
        return assemble_from_pipeline(path, processor_dir=processor, device=device, dtype=dtype), "pipeline directory"
    fail(f"--real-weights {path}: neither duetgen.json (an assembled DuetGen directory) nor model_index.json "
         "(a Cosmos-Predict2.5 pipeline directory) is there")


def zero_shot_check(args) -> None:
    """Issue 19: one text-to-image sample with the Cosmos framing from real weights, saved under --zero-shot-out.

    The real DiT, connector (its pretrained crossattn_proj) and text encoder, framed as Cosmos-Predict2.5
    was trained, should draw the caption recognisably: the sanity check of a fresh assembly on a GPU
    (docs/model.md, "Real weights"). Looking at the image is the check; the JSON says how it was made.
    """
    from duetgen.models.duetgen import ModelDirectoryError

    if not args.real_weights:
        print("zero-shot step: skipped (no real weights: set DUETGEN_REAL_WEIGHTS or pass --real-weights DIR)")
        return
    weights = Path(args.real_weights)
    if not weights.is_dir():
        fail(f"--real-weights {weights}: not a directory")
    if not args.zero_shot_out:
        fail("zero-shot step: no output directory (pass --zero-shot-out DIR or set $OUT)")
    out = Path(args.zero_shot_out)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32  # the autoencoder stays float32 either way

    # 1. Load (or assemble) the real weights; every config check runs before a weight is read
    t0 = time.perf_counter()
    try:
        model, source = load_real_weights(weights, Path(args.real_processor) if args.real_processor else None,
                                          args.device, dtype)
    except ModelDirectoryError as e:  # PipelineDirectoryError too: names the file and the field
        fail(f"zero-shot step: {e}")
    model.eval()
    load_s = time.perf_counter() - t0
    print(f"zero-shot step: loaded {weights} ({source}) in {load_s:.1f} s")

    # 2. One caption, one image, the Cosmos framing: what `duetgen generate --framing cosmos` runs
    size = tuple(args.zero_shot_size)
    config = GenerationConfig(seed=args.zero_shot_seed, num_steps=args.zero_shot_steps,
                              guidance_scale=args.zero_shot_guidance, image_size=size, framing="cosmos")
    settings = config.resolve(model.config, model.pixel_multiple)
    steps, guidance = settings.sampler.num_steps, settings.guidance_for(False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    finished = InterleavedEngine(model).run([Message("user", [TextPart(args.zero_shot_prompt)])], config)
    if cuda:
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - t0
    (picture,) = [p.image for p in finished.content if isinstance(p, ImagePart)]

    # 3. The image and what made it, under the output directory
    result = {
        "prompt": args.zero_shot_prompt, "seed": args.zero_shot_seed, "steps": steps, "guidance_scale": guidance,
        "cosmos_guidance": guidance - 1,  # Cosmos' g (v = v_pos + g (v_pos - v_neg)) is our w - 1
        "solver": settings.sampler.solver, "image_size": list(size), "framing": "cosmos",
        "wall_s": round(wall_s, 3), "load_s": round(load_s, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else args.device, "dtype": str(dtype).removeprefix("torch."),
        "weights": str(weights), "source": source, "condition_frame_time": model.config.condition_frame_time,
        "provenance": model.provenance, "image": f"{ZERO_SHOT_NAME}.png", "torch": torch.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    picture.save(out / f"{ZERO_SHOT_NAME}.png")
    (out / f"{ZERO_SHOT_NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"zero-shot step: {size[0]}x{size[1]}, {steps} steps, w = {guidance}, {wall_s:.2f} s"
          + (f", peak {result['peak_gpu_memory_gib']} GiB" if cuda else "")
          + f"; wrote {out / ZERO_SHOT_NAME}.png and .json")


def fail(message: str):
    print(message, file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="DuetGen directory (default: the shipped checkpoint, else the toy preset)")
    parser.add_argument("--preset", default=None, help="build this preset with random weights instead of loading a "
                        "checkpoint (toy: the path used when no checkpoint is shipped)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda for --gpu-check, else cpu)")
    parser.add_argument("--tokens-per-step", type=int, default=16, help="text tokens before each <BOV> (a ShapeWorld step line is ~12-16)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps of the guided draw (toy default)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--gpu-check", action="store_true", help="run only the real-preset GPU check")
    parser.add_argument("--gpu-check-preset", default=presets.REAL_PRESET)
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--gpu-image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--gpu-check-sections", default="generation,zero_shot",
                        help="parts of --gpu-check to run: generation (random weights), zero_shot (real weights)")
    zero_shot = parser.add_argument_group("zero-shot step of --gpu-check (issue 19)")
    zero_shot.add_argument("--real-weights", default=os.environ.get("DUETGEN_REAL_WEIGHTS"),
                           help="assembled DuetGen directory or Cosmos-Predict2.5 pipeline directory "
                                "(default: $DUETGEN_REAL_WEIGHTS; neither: the step is skipped)")
    zero_shot.add_argument("--real-processor", default=os.environ.get("DUETGEN_REAL_PROCESSOR"),
                           help="folder with preprocessor_config.json for a pipeline directory without one "
                                "(default: $DUETGEN_REAL_PROCESSOR)")
    zero_shot.add_argument("--zero-shot-out", default=os.environ.get("OUT"),
                           help="where the image and its JSON go (default: $OUT)")
    zero_shot.add_argument("--zero-shot-prompt", default=ZERO_SHOT_PROMPT)
    zero_shot.add_argument("--zero-shot-seed", type=int, default=0)
    zero_shot.add_argument("--zero-shot-steps", type=int, default=None, help="default: the model's sampler steps")
    zero_shot.add_argument("--zero-shot-guidance", type=float, default=None,
                           help="our w (Cosmos' g + 1); default: the model's")
    zero_shot.add_argument("--zero-shot-size", type=int, nargs=2, default=(768, 768), metavar=("H", "W"))
    args = parser.parse_args()
    sections = args.gpu_check_sections.split(",")
    if not set(sections) <= {"generation", "zero_shot"}:
        parser.error(f"--gpu-check-sections {args.gpu_check_sections!r}: expected generation and/or zero_shot")
    if args.quick:
        args.repeats = 2
    if args.device is None:
        args.device = "cuda" if args.gpu_check else "cpu"
    torch.set_num_threads(torch.get_num_threads())  # honour OMP_NUM_THREADS
    if args.gpu_check:
        with torch.no_grad():
            if "generation" in sections:
                gpu_check(args)
                gc.collect()  # the random-weight model goes before the real one comes
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            if "zero_shot" in sections:
                zero_shot_check(args)
        return

    model, name = load_model(args)
    print(f"model: {name}; {torch.get_num_threads()} thread(s); median of {args.repeats} after 1 warm-up")
    with torch.no_grad():
        p1 = kv_cache_vs_reprefill(model, args)
    print(f"\n1. MLLM time of a {N_IMAGES}-image answer ({p1['new_tokens']} sampled tokens, {p1['context_tokens']} "
          f"tokens of context at the end; same tokens in both loops)")
    print(f"   re-prefill the history every token: {p1['recompute_s'] * 1000:9.1f} ms")
    print(f"   one KV cache for the whole answer:  {p1['kv_cache_s'] * 1000:9.1f} ms")
    print(f"   ratio: {p1['ratio']:.2f}x")
    p2 = batched_vs_two_calls(model, p1, args)
    print(f"\n2. Guided draw of image {N_IMAGES} ({p2['cond_frames']} conditioning frames, text {p2['text_tokens'][0]} "
          f"tokens, negative {p2['text_tokens'][1]}; {args.steps} steps, w = {args.guidance})")
    print(f"   two DiT calls per step:            {p2['two_calls_s'] * 1000:9.1f} ms")
    print(f"   one packed call (pos + neg):        {p2['batched_s'] * 1000:9.1f} ms")
    print(f"   ratio: {p2['ratio']:.2f}x   max |latent difference|: {p2['max_diff']:.2e}")


if __name__ == "__main__":
    main()
