"""The cross-page dedup decision's memory in the driver, per page (issue 18; neardup.py's docstring quotes it).

    python scripts/probes/dedup_memory.py 6000        # pages; every fifth one a near-copy of an earlier page

Synthetic pages of 300 words (a fixed vocabulary, seeded), sketched with the engine's ``PageSketcher``; a
near-copy changes 3 words. Prints the sketches' size once loaded and the peak during ``decide`` (tracemalloc:
Python allocations, numpy arrays included), per page, and how many pages were dropped.
"""
import random
import sys
import time
import tracemalloc

from duetgen.data.engine.neardup import NearDupPageConfig, PageSketcher, Sketch, decide

WORDS = [f"w{i}" for i in range(2000)]


def pages(n: int, rng: random.Random) -> list[str]:
    out: list[list[str]] = []
    for i in range(n):
        if i % 5 == 4:  # a near-copy of an earlier page
            words = list(rng.choice(out))
            for j in rng.sample(range(len(words)), 3):
                words[j] = rng.choice(WORDS)
        else:
            words = [rng.choice(WORDS) for _ in range(300)]
        out.append(words)
    return [" ".join(w) for w in out]


def main(n: int) -> None:
    cfg = NearDupPageConfig()
    sketch = PageSketcher(cfg)
    texts = pages(n, random.Random(0))
    tracemalloc.start()
    sketches = [Sketch(i // 50, i % 50, f"web-{i:08x}", f"http://site.example/{i}.html", f"Page {i}", 3, sketch(t))
                for i, t in enumerate(texts)]
    loaded = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    start = time.perf_counter()
    drops, _ = decide(sketches, cfg)
    peak = tracemalloc.get_traced_memory()[1]
    print(f"{n} pages: {loaded / n / 1e3:.2f} KB a page loaded; peak during decide {peak / 1e6:.1f} MB = "
          f"{peak / n / 1e3:.2f} KB a page; {time.perf_counter() - start:.2f} s; {len(drops)} dropped")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6000)
