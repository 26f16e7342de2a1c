"""Cross-page near-duplicate removal: MinHash + LSH over the pages' cleaned text, across all shards.

Design choices:
- MinHash and LSH are ``duetgen.data.minhash`` (datasketch), the same code as the synthetic query pool's
  dedup: measured faster than our own numpy MinHash on the same pages (docs/decisions.md,
  "Near-duplicate MinHash/LSH is datasketch"). Its scheme (affine32 over SHA-1 shingle hashes) is
  stable across processes and machines, so a signature computed in a worker means the same thing in
  the driver; one permutation table per sketcher is reused for every page.
- Two passes (runner.py): workers sketch every page that passed extraction, the page filter and
  the language filter (a MinHash signature of its cleaned text, ``language.page_text``); the driver
  then decides once over all signatures, and only the kept pages go on to the image and LLM stages,
  so a duplicate costs no image download and no LLM call.
- Shingles are word 5-grams (datatrove's and the Gopher/RefinedWeb default for documents); 128
  permutations in 16 bands of 8 rows put the LSH's 50 % candidate point near Jaccard 0.71, below
  the 0.8 decision threshold on the MinHash estimate (the shingles stay in the workers, so the
  estimate decides; its standard deviation at 0.8 is 0.035).
- Deterministic, whatever the sharding or the number of workers: pages are visited in order of
  record id (then input position), and a page is dropped when it is near a page kept before it
  (the earliest kept such page is named), so each cluster keeps its lowest id (and pass 2 builds the
  next copy when that one yields no record: ``copies``). A repeated id (the
  same URL twice) keeps its first occurrence (``duplicate_id``).
- Memory in the driver: ~1.0 KB per sketched page loaded (the signatures as uint32, ids) and ~5.9 KB
  per page at the decision's peak (datasketch's LSH of the kept pages, 16 band keys each, and their
  MinHashes; 35 MB for 6,000 pages: ``scripts/probes/dedup_memory.py 6000``). Linear in the input: a crawl of tens of millions of
  pages needs datatrove-style bucket files sorted on disk instead (not done).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duetgen.data.engine.document import StageStats
from duetgen.data.minhash import GreedyIndex, MinHasher, word_shingles

__all__ = ["NearDupPageConfig", "PageSketcher", "Sketch", "decide", "word_shingles"]


@dataclass
class NearDupPageConfig:
    enabled: bool = True
    threshold: float = 0.8  # MinHash-estimated Jaccard of word 5-gram sets at or above which pages are duplicates
    shingle_words: int = 5
    num_perm: int = 128
    bands: int = 16
    seed: int = 0
    shingle_hash: str = "xxh32"  # (data/minhash.py) a run's sketches are all of one hash: part of its settings


class PageSketcher:
    """Signatures of page texts, in a worker."""

    def __init__(self, cfg: NearDupPageConfig):
        self.cfg = cfg
        self._hasher = MinHasher(cfg.num_perm, cfg.seed, cfg.shingle_hash)

    def __call__(self, text: str) -> np.ndarray:
        return self._hasher(word_shingles(text, self.cfg.shingle_words)).hashvalues  # (P,) uint32


@dataclass
class Sketch:
    """One page of a shard, as the dedup decision sees it."""

    shard: int
    pos: int  # position of the page in its shard's reading order
    id: str
    url: str | None
    title: str
    images: int  # <img> items left on the page (the funnel counts images through every stage)
    sig: np.ndarray  # (P,) uint32


def decide(sketches: list[Sketch], cfg: NearDupPageConfig,
           copies: dict[tuple[int, int], list[tuple[int, int]]] | None = None,
           ) -> tuple[dict[tuple[int, int], str], StageStats]:
    """({(shard, pos) of every dropped page: reason}, the ``dedup_pages`` funnel stage). ``copies``, if given, is
    filled with {(shard, pos) of a kept page: its near-duplicates dropped for it, in id order}: pass 2 builds the
    next of them when the kept page itself yields no record."""
    stats = StageStats("dedup_pages")
    drops: dict[tuple[int, int], str] = {}
    index, hasher = GreedyIndex(cfg.num_perm, cfg.bands), MinHasher(cfg.num_perm, cfg.seed, cfg.shingle_hash)
    kept: list[Sketch] = []  # index key -> its sketch
    first_of_id: dict[str, Sketch] = {}
    for s in sorted(sketches, key=lambda s: (s.id, s.shard, s.pos)):
        stats.pages_in += 1
        stats.images_in += s.images
        ex = {"doc": s.id, "url": s.url, "title": s.title}
        if s.id in first_of_id:
            drops[(s.shard, s.pos)] = "duplicate_id"
            stats.page_drops["duplicate_id"] += 1
            stats._example("page:duplicate_id", {**ex, "detail": f"id already taken by shard {first_of_id[s.id].shard}"})
            continue
        first_of_id[s.id] = s
        if cfg.enabled:
            m = hasher.lean(s.sig)
            near = index.first_near(m, lambda key, estimate: estimate >= cfg.threshold)  # the earliest kept page
            if near is not None:
                near = (kept[near[0]], near[1])
                drops[(s.shard, s.pos)] = "near_duplicate_page"
                if copies is not None:
                    copies.setdefault((near[0].shard, near[0].pos), []).append((s.shard, s.pos))
                stats.page_drops["near_duplicate_page"] += 1
                stats._example("page:near_duplicate_page",
                               {**ex, "detail": f"near {near[0].id} ({near[0].url or repr(near[0].title)}): "
                                                f"estimated Jaccard {near[1]:.2f}"})
                continue
            index.add(m)
            kept.append(s)
        stats.pages_out += 1
        stats.images_out += s.images
    return drops, stats
