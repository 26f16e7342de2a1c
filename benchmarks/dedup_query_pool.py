"""Near-duplicate removal on a query pool: MinHash-LSH + exact check vs brute-force exact Jaccard.

Prints both timings on the same synthetic pool (question-like strings, ~30% light rewordings),
their ratio, whether both keep exactly the same questions, and the LSH time at the paper's pool
size (15,270 instructions, section 3.1).

    .venv/bin/python benchmarks/dedup_query_pool.py [--n 2000]
"""

import argparse
import random
import string
import time

from duetgen.data.synthetic.dedup import NearDupConfig, dedup, jaccard, shingles


def pool(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    stems = ["How do I", "What is the best way to", "Can you show me how to", "How should I"]
    out = []
    while len(out) < n:
        words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
                         for _ in range(rng.randint(5, 9)))
        q = f"{rng.choice(stems)} {words}?"
        out.append(q)
        if rng.random() < 0.3:
            i = rng.randrange(len(q))
            out.append(q[:i] + rng.choice(string.ascii_lowercase) + q[i + 1:])
    return out[:n]


def brute_force(texts: list[str], threshold: float) -> list[int]:
    sh = [shingles(t) for t in texts]
    kept: list[int] = []
    for i in range(len(texts)):
        if not any(jaccard(sh[i], sh[j]) >= threshold for j in kept):
            kept.append(i)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    cfg = NearDupConfig(threshold=0.6)
    texts = pool(args.n)
    t0 = time.perf_counter()
    kept_lsh, _ = dedup(texts, cfg)
    t_lsh = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept_bf = brute_force(texts, cfg.threshold)
    t_bf = time.perf_counter() - t0
    print(f"n={args.n}: minhash-lsh {t_lsh:.2f}s, brute force {t_bf:.2f}s, speed-up x{t_bf / t_lsh:.1f}, "
          f"kept {len(kept_lsh)} vs {len(kept_bf)}, identical={kept_lsh == kept_bf}")
    big = pool(15270, seed=1)
    t0 = time.perf_counter()
    kept, _ = dedup(big, cfg)
    print(f"n=15270 (paper's pool size): minhash-lsh {time.perf_counter() - t0:.2f}s, kept {len(kept)}")


if __name__ == "__main__":
    main()
