"""Packing: padding waste (packed vs padded-to-longest) and packing time (segment-tree FFD vs naive first fit).

    .venv/bin/python benchmarks/packing_padding.py

Length mix like the paper's stage-1 data (section 4.1): mostly short question/answer turns, some
long multi-image answers (each image ~ 256-1024 vision tokens). Everything is measured in this run.
"""

from __future__ import annotations

import time

import numpy as np

from duetgen.data.packing import pack_items, padding_fraction


def paper_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    short = rng.integers(32, 256, size=int(n * 0.7))                      # text-only turns
    long = rng.integers(1, 5, size=n - len(short)) * rng.integers(256, 1024, size=n - len(short)) \
        + rng.integers(64, 512, size=n - len(short))                       # 1-4 images + their text
    return rng.permutation(np.concatenate([short, long]))


def naive_first_fit(lengths: np.ndarray, budget: int) -> int:
    rooms: list[int] = []
    for n in sorted(lengths.tolist(), reverse=True):
        for k, room in enumerate(rooms):
            if n <= room:
                rooms[k] -= n
                break
        else:
            rooms.append(budget - n)
    return len(rooms)


def main() -> None:
    budget = 8192
    lengths = paper_like_lengths(20_000)
    lengths = lengths[lengths <= budget]
    print(f"{len(lengths)} samples, mean {lengths.mean():.0f} tokens, max {lengths.max()}, budget {budget}")
    for batch_size in (4, 8, 16):
        r = padding_fraction(lengths, budget, batch_size=batch_size)
        print(f"padding fraction  batch {batch_size:>2} padded-to-longest {r.padded:6.1%}   "
              f"packed (FFD, padded to budget) {r.packed:6.2%}   ratio {r.padded / max(r.packed, 1e-9):7.1f}x")
    greedy = padding_fraction(lengths, budget, batch_size=8, strategy="greedy")
    print(f"packed with greedy (next fit, order kept): {greedy.packed:.2%} padding")

    small = lengths
    t0 = time.perf_counter()
    naive = naive_first_fit(small, budget)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    tree = len(pack_items(small, budget))
    t_tree = time.perf_counter() - t0
    print(f"first-fit decreasing on {len(small)} samples: naive {t_naive:.3f}s, segment tree {t_tree:.3f}s "
          f"({t_naive / t_tree:.1f}x), packs {naive} vs {tree}")
    big = paper_like_lengths(200_000, seed=1)
    big = big[big <= budget]
    for strategy in ("ffd", "greedy"):
        t0 = time.perf_counter()
        n = len(pack_items(big, budget, strategy=strategy))
        print(f"{strategy:>6} on {len(big)} samples: {time.perf_counter() - t0:.2f}s, {n} packs")


if __name__ == "__main__":
    main()
