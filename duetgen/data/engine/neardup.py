"""Cross-page near-duplicate removal: MinHash + LSH over the pages' cleaned text, across all shards.

Design choices:
- MinHash and LSH are ``datasketch`` (``MinHash``, ``MinHashLSH``; the synthetic query pool uses the
  same library): measured faster than our own numpy MinHash on the same pages (docs/decisions.md,
  "Near-duplicate MinHash/LSH is datasketch"). Its default scheme (affine32 over SHA-1 shingle
  hashes) is stable across processes and machines, so a signature computed in a worker means the
  same thing in the driver; one permutation table per sketcher is reused for every page.
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

import re
from dataclasses import dataclass

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from duetgen.data.engine.document import StageStats

_WORD_RE = re.compile(r"\w+", re.UNICODE)
SCHEME = "affine32"  # datasketch's default since 2.0; hash values are uint32


@dataclass
class NearDupPageConfig:
    enabled: bool = True
    threshold: float = 0.8  # MinHash-estimated Jaccard of word 5-gram sets at or above which pages are duplicates
    shingle_words: int = 5
    num_perm: int = 128
    bands: int = 16
    seed: int = 0


def word_shingles(text: str, k: int = 5) -> set[str]:
    """The distinct word ``k``-grams of ``text`` (lowercased ``\\w+`` words); a shorter text is one shingle."""
    words = _WORD_RE.findall(text.lower())
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


class PageSketcher:
    """Signatures of page texts, in a worker."""

    def __init__(self, cfg: NearDupPageConfig):
        self.cfg = cfg
        self._permutations = MinHash(cfg.num_perm, seed=cfg.seed, scheme=SCHEME).permutations  # drawn once

    def __call__(self, text: str) -> np.ndarray:
        m = MinHash(self.cfg.num_perm, seed=self.cfg.seed, permutations=self._permutations, scheme=SCHEME)
        m.update_batch([s.encode() for s in word_shingles(text, self.cfg.shingle_words)])
        return m.hashvalues  # (P,) uint32


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
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.num_perm // cfg.bands))
    kept: list[tuple[Sketch, LeanMinHash]] = []  # LSH key -> (sketch, its MinHash)
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
            m = LeanMinHash(seed=cfg.seed, hashvalues=s.sig, scheme=SCHEME)
            near = None
            for key in sorted(lsh.query(m)):  # LSH keys are kept-order positions: the earliest kept page first
                est = m.jaccard(kept[key][1])
                if est >= cfg.threshold:
                    near = (kept[key][0], est)
                    break
            if near is not None:
                drops[(s.shard, s.pos)] = "near_duplicate_page"
                if copies is not None:
                    copies.setdefault((near[0].shard, near[0].pos), []).append((s.shard, s.pos))
                stats.page_drops["near_duplicate_page"] += 1
                stats._example("page:near_duplicate_page",
                               {**ex, "detail": f"near {near[0].id} ({near[0].url or repr(near[0].title)}): "
                                                f"estimated Jaccard {near[1]:.2f}"})
                continue
            lsh.insert(len(kept), m, check_duplication=False)
            kept.append((s, m))
        stats.pages_out += 1
        stats.images_out += s.images
    return drops, stats
