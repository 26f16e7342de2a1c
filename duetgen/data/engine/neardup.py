"""Cross-page near-duplicate removal: MinHash + LSH over the pages' cleaned text, across all shards.

Design choices:
- Two passes (runner.py): workers sketch every page that passed extraction, the page filter and
  the language filter (a MinHash signature of its cleaned text, ``language.page_text``); the driver
  then decides once over all signatures, and only the kept pages go on to the image and LLM stages,
  so a duplicate costs no image download and no LLM call.
- Shingles are word 5-grams (datatrove's and the Gopher/RefinedWeb default for documents); 128
  permutations in 16 bands of 8 rows put the LSH's 50 % candidate point near Jaccard 0.71, below
  the 0.8 decision threshold on the MinHash estimate (the shingles stay in the workers, so the
  estimate decides; its standard deviation at 0.8 is 0.035).
- Deterministic, whatever the sharding or the number of workers: pages are visited in order of
  record id (then input position), and a page is dropped when it is near a page kept before it, so
  each cluster keeps its lowest id. A repeated id (the same URL twice) keeps its first occurrence
  (``duplicate_id``).
- Memory in the driver: ~0.6 KB per sketched page while deciding (the signatures as uint32, ids),
  plus the index of kept pages (1 KB signature + 16 band keys each). Linear in the input: a crawl
  of tens of millions of pages needs datatrove-style bucket files sorted on disk instead (not done).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duetgen.data.engine.document import StageStats
from duetgen.data.minhash import LSHIndex, MinHasher, word_shingle_hashes


@dataclass
class NearDupPageConfig:
    enabled: bool = True
    threshold: float = 0.8  # MinHash-estimated Jaccard of word 5-gram sets at or above which pages are duplicates
    shingle_words: int = 5
    num_perm: int = 128
    bands: int = 16
    seed: int = 0


class PageSketcher:
    """Signatures of page texts, in a worker (word hashes cached across the shard's pages)."""

    def __init__(self, cfg: NearDupPageConfig):
        self.cfg = cfg
        self.hasher = MinHasher(cfg.num_perm, cfg.seed)
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        if len(self.cache) > 1_000_000:  # bound the cache on a long shard
            self.cache.clear()
        h = word_shingle_hashes(text, self.cfg.shingle_words, self.cache)
        return self.hasher.signature(h).astype(np.uint32)  # (P,)


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


def decide(sketches: list[Sketch], cfg: NearDupPageConfig) -> tuple[dict[tuple[int, int], str], StageStats]:
    """({(shard, pos) of every dropped page: reason}, the ``dedup_pages`` funnel stage)."""
    stats = StageStats("dedup_pages")
    drops: dict[tuple[int, int], str] = {}
    index = LSHIndex(cfg.num_perm, cfg.bands)
    kept: list[Sketch] = []  # LSH index position -> sketch
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
            sig = s.sig.astype(np.uint64)
            cand = index.candidates(sig)
            if len(cand):
                est = index.estimates(cand, sig)
                hit = np.flatnonzero(est >= cfg.threshold)
                if len(hit):
                    k = kept[int(cand[hit[0]])]
                    drops[(s.shard, s.pos)] = "near_duplicate_page"
                    stats.page_drops["near_duplicate_page"] += 1
                    stats._example("page:near_duplicate_page",
                                   {**ex, "detail": f"near {k.id} ({k.url}): estimated Jaccard {est[hit[0]]:.2f}"})
                    continue
            index.add(sig)
            kept.append(s)
        stats.pages_out += 1
        stats.images_out += s.images
    return drops, stats
