"""Training throughput: stage-1 tokens/s packed vs padded, and stage-2 samples/s packed, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_throughput.py [--threads 1] [--repeats 3]

Stage 1: the toy Qwen2.5-VL (random init, 4.1M parameters) takes forward + backward + AdamW steps
over the SAME set of sequences whose lengths mix like the paper's instruction data: short
questions/answers (40-160 tokens) and long multi-image answers (400-1000 tokens), 1:1.
  - packed: samples packed under a token budget (first-fit decreasing, `duetgen.data.packing`),
    one sequence per step, per-sample positions, attention per sample (causal SDPA on each sample's
    slice, `duetgen.models.packed_attention`, what stage 1 runs); "packed-mask" is the same packs with
    one dense block-diagonal 4D mask (stage 1 until session 4);
  - padded: batches of `--batch` samples in the shuffled order, padded to the longest, 2D padding mask.
Throughput counts REAL tokens only (padding is waste), wall time of the whole pass, median of repeats
interleaved packed/padded so that load from other processes hits both alike.

Stage 2: the toy DiT (4 x 128, 16 tokens per 64x64 frame) + connector takes training steps on
packs of samples with 1-4 frames (target + earlier images as conditioning frames), text of 40-300
tokens; reported as samples/s, and the padding fraction a padded batch (every sample padded to 4
frames and the longest text) would have wasted.

The machine is shared: numbers move with other load; the ratio is measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def stage1_sets(rng: np.random.Generator, n: int) -> list[int]:
    short = rng.integers(40, 161, n // 2)
    long = rng.integers(400, 1001, n - n // 2)
    lengths = np.concatenate([short, long])
    rng.shuffle(lengths)
    return lengths.tolist()


def run_stage1(model, optimizer, sequences, lengths, budget: int, batch: int, mode: str) -> tuple[float, int]:
    from duetgen.data.packing import block_diagonal_mask, cu_seqlens_from_lengths, pack_items

    real = sum(lengths)
    start = time.perf_counter()
    if mode in ("packed", "packed-mask"):
        from duetgen.models.packed_attention import PACKED_ATTENTION

        per_sample = mode == "packed"  # stage 1's path: per-sample causal SDPA; "packed-mask": the dense 4D mask
        model.config.text_config._attn_implementation = PACKED_ATTENTION if per_sample else "sdpa"
        model.model.language_model.config._attn_implementation = model.config.text_config._attn_implementation
        for pack in pack_items(lengths, budget, seed=0):
            ids = torch.cat([sequences[i] for i in pack.items])  # (T,)
            pos = torch.cat([torch.arange(lengths[i]) for i in pack.items]).expand(3, -1)[:, None]  # (3, 1, T)
            cu = cu_seqlens_from_lengths([lengths[i] for i in pack.items])
            if per_sample:
                attn = {"cu_seq_lens_q": cu.int(), "cu_seq_lens_k": cu.int()}
            else:
                attn = {"attention_mask": block_diagonal_mask(cu)[None, None]}
            logits = model(input_ids=ids[None], position_ids=pos, use_cache=False, **attn).logits[0]
            targets = ids[1:].clone()
            starts = np.cumsum([lengths[i] for i in pack.items])[:-1] - 1  # no loss across samples
            targets[torch.as_tensor(starts, dtype=torch.long)] = -100
            F.cross_entropy(logits[:-1], targets, ignore_index=-100).backward()
            optimizer.step(), optimizer.zero_grad(set_to_none=True)
    else:
        model.config.text_config._attn_implementation = "sdpa"
        model.model.language_model.config._attn_implementation = "sdpa"
        order = np.random.default_rng(0).permutation(len(lengths))
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            longest = max(lengths[i] for i in idx)
            ids = torch.zeros(len(idx), longest, dtype=torch.long)
            attn = torch.zeros(len(idx), longest, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : lengths[i]] = sequences[i]
                attn[row, : lengths[i]] = 1
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100).backward()
            optimizer.step(), optimizer.zero_grad(set_to_none=True)
    return real / (time.perf_counter() - start), real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=48, help="stage-1 sequences per pass")
    parser.add_argument("--budget", type=int, default=2048, help="stage-1 tokens per pack")
    parser.add_argument("--batch", type=int, default=4, help="stage-1 samples per padded batch")
    parser.add_argument("--stage2-steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import Qwen2_5_VLForConditionalGeneration

    from duetgen.data.packing import padding_fraction
    from duetgen.models.mllm import toy_qwen2_5_vl_config

    # --- stage 1
    rng = np.random.default_rng(0)
    lengths = stage1_sets(rng, args.n)
    model = Qwen2_5_VLForConditionalGeneration(toy_qwen2_5_vl_config(512)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sequences = [torch.randint(8, 512, (n,)) for n in lengths]
    pad = padding_fraction(lengths, args.budget, args.batch)
    results = {"packed": [], "packed-mask": [], "padded": []}
    for _ in range(args.repeats):
        for mode in results:
            tps, real = run_stage1(model, optimizer, sequences, lengths, args.budget, args.batch, mode)
            results[mode].append(tps)
    packed, padded = statistics.median(results["packed"]), statistics.median(results["padded"])
    masked = statistics.median(results["packed-mask"])
    print(f"stage 1 (toy Qwen2.5-VL 4.1M, {args.n} sequences of 40-1000 tokens, {sum(lengths)} real tokens, "
          f"{args.threads} thread(s), median of {args.repeats})")
    print(f"  packed  (budget {args.budget}):  {packed:8.0f} real tokens/s   padding if packs were padded to the budget: {pad.packed:.1%}")
    print(f"  padded  (batch {args.batch}):      {padded:8.0f} real tokens/s   padding: {pad.padded:.1%}")
    print(f"  packed, one dense 4D mask instead (the path before session 4): {masked:8.0f} real tokens/s")
    print(f"  packed / padded = {packed / padded:.2f}x   (dense-mask packed / padded = {masked / padded:.2f}x)")

    # --- stage 2
    from diffusers import CosmosTransformer3DModel

    from duetgen.diffusion.flow_matching import FlowMatchingConfig, dit_sample_inputs, flow_matching_loss, sample_time
    from duetgen.models.connector import Connector
    from duetgen.models.video_dit import PackedCosmosDiT, toy_cosmos_config

    dit = PackedCosmosDiT(CosmosTransformer3DModel(**toy_cosmos_config(48, 1024))).train()
    connector = Connector(1024, 128)
    params = list(dit.parameters()) + list(connector.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    fm = FlowMatchingConfig(parameterisation="x0")
    budget, frame_tokens = 768, 16
    samples, real_frames, real_text, padded_frames, padded_text = 0, 0, 0, 0, 0
    times = []
    for step in range(args.stage2_steps):
        frames_per = []
        while sum(frames_per) * frame_tokens < budget - 4 * frame_tokens:
            frames_per.append(int(rng.integers(1, 5)))
        texts = [int(rng.integers(40, 301)) for _ in frames_per]
        start = time.perf_counter()
        frames, tt, masks, x0s, noises, ts = [], [], [], [], [], sample_time(len(frames_per), fm)
        for n, t in zip(frames_per, ts):
            latents = [torch.randn(48, 16, 16) for _ in range(n)]
            noise = torch.randn(48, 16, 16)
            f, times_, m = dit_sample_inputs(latents[:-1], (1 - t) * latents[-1] + t * noise, t)
            frames.append(f), tt.append(times_), masks.append(m), x0s.append(latents[-1]), noises.append(noise)
        text = [connector(torch.randn(n, 1024)) for n in texts]
        out = dit(frames=frames, timesteps=tt, condition_mask=masks, text=text, targets_only=True)
        loss = torch.stack([flow_matching_loss(o[0], x, z, t, "x0") for o, x, z, t in zip(out, x0s, noises, ts)]).mean()
        loss.backward()
        optimizer.step(), optimizer.zero_grad(set_to_none=True)
        if step > 0:  # the first step warms up
            times.append(time.perf_counter() - start)
            samples += len(frames_per)
            real_frames += sum(frames_per)
            real_text += sum(texts)
            padded_frames += 4 * len(frames_per)
            padded_text += max(texts) * len(frames_per)
    print(f"stage 2 (toy DiT 4 x 128 + connector, packs of <= {budget} DiT tokens, 1-4 frames, text 40-300 tokens)")
    print(f"  packed: {samples / sum(times):6.1f} samples/s, {np.median(times):.3f} s/step; padding a batch to 4 frames and "
          f"the longest text would waste {1 - real_frames / padded_frames:.1%} of DiT tokens, "
          f"{1 - real_text / padded_text:.1%} of text tokens")


if __name__ == "__main__":
    main()
