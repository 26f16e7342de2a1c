"""Stage 2's text condition on ShapeWorld: what one pack's MLLM work costs, three ways, in one run.

    python benchmarks/stage2_condition.py [--model checkpoints/shapeworld-toy] [--packs 6] [--threads 1]

The MLLM is frozen in stage 2, so every condition is a prefix of the record's own states. Per pack of
~24 records (a 768-token DiT pack of the toy run), timed alternately:
  - packed: all prefixes in one packed forward with a block-diagonal 4D mask (stage 2 until session 4);
  - per record: one forward per record up to its last <BOV> (`stage2.ConditionStates`, first epoch);
  - kept: the stored states sliced (`ConditionStates`, every later epoch).
Prints the median seconds per pack and the ratios against "packed" measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "shapeworld-toy"), help="DuetGen directory (its mllm/)")
    parser.add_argument("--packs", type=int, default=6)
    parser.add_argument("--pack-size", type=int, default=24, help="records per pack (toy run: ~24)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from duetgen.shapeworld.world import generate
    from duetgen.train import stage2
    from duetgen.models.builder import load_mllm
    from duetgen.train.common import load_records, render

    mllm, tokenizer, processor = load_mllm(Path(args.model) / "mllm")
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "d", args.packs * args.pack_size, seed=0, split="train", progress=False,
                 kinds=["how-to", "continuation", "text-to-image", "editing"])
        items = load_records([str(Path(tmp) / "d")])
        rendered = [render(it, tokenizer, processor) for it in items]
    keys = [(str(ds.root), rec.id) for ds, rec in items]
    targets = [r.bov_positions[-1] for r in rendered]  # the longest condition of each record
    packs = [list(range(i, i + args.pack_size)) for i in range(0, len(items), args.pack_size)]
    kept = stage2.ConditionStates(mllm)
    for i in range(len(items)):
        kept.prefix(keys[i], rendered[i], targets[i])

    times = {"packed": [], "per record": [], "kept": []}
    for pack in packs:
        start = time.perf_counter()
        stage2.mllm_states(mllm, [rendered[i].prefix(targets[i]) for i in pack])
        times["packed"].append(time.perf_counter() - start)
        fresh = stage2.ConditionStates(mllm)
        start = time.perf_counter()
        for i in pack:
            fresh.prefix(keys[i], rendered[i], targets[i])
        times["per record"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in pack:
            kept.prefix(keys[i], rendered[i], targets[i])
        times["kept"].append(time.perf_counter() - start)
    base = statistics.median(times["packed"])
    tokens = statistics.mean(sum(targets[i] for i in p) for p in packs)
    print(f"stage-2 text condition, {args.pack_size} records per pack (~{tokens:.0f} MLLM tokens), {args.threads} thread(s), "
          f"median of {len(packs)} packs")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:11s} {m:8.4f} s/pack   packed / this = {base / m:8.1f}x")
    print(f"  kept states: {kept.nbytes / len(items) / 1024:.0f} KB per record (fp16)")


if __name__ == "__main__":
    main()
