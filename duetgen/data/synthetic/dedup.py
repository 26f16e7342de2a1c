"""Near-duplicate removal for short texts: character shingles, MinHash, LSH, exact Jaccard check.

Used on the expanded query pool (paper section 3.1: 1,500 seeds -> 15,270 diverse instructions),
where an LLM asked for "more questions" often returns rewordings of ones it already gave.

Design choices:
- Texts are normalised (lowercase, punctuation dropped, whitespace collapsed) and cut into
  character 5-gram shingles: robust to word order tweaks and small rewordings, no tokenizer.
- MinHash and the LSH index are ``datasketch`` (``MinHash``, ``MinHashLSH``), the library the data
  engine's cross-page dedup uses too (measured faster than our own: docs/decisions.md); one
  permutation table per index, reused for every text.
- LSH banding (bands x rows = num_perm) only proposes candidate pairs; the default 32 x 4 puts
  the LSH threshold near Jaccard 0.42, well below the 0.6 decision threshold, so recall is
  high. Candidates whose MinHash estimate is more than ``prefilter_margin`` under the threshold
  (3.5 standard deviations at 128 permutations) are dropped in one vectorised step; the rest
  are checked with the *exact* shingle Jaccard: no false positives.
- Greedy and order-preserving: a text is dropped if it is near a text *kept* earlier, so seeds
  (listed first) always survive and the result is deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from datasketch import MinHash, MinHashLSH

_PUNCT_RE = re.compile(r"[^\w\s]", re.UNICODE)
_WS_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _WS_RE.sub(" ", _PUNCT_RE.sub(" ", text.lower())).strip()


def shingles(text: str, k: int = 5) -> set[str]:
    t = normalize(text)
    if len(t) <= k:
        return {t}
    return {t[i : i + k] for i in range(len(t) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass
class NearDupConfig:
    threshold: float = 0.6  # exact shingle Jaccard at or above which two texts are near-duplicates
    shingle_k: int = 5  # characters per shingle
    num_perm: int = 128  # MinHash signature length
    bands: int = 32  # LSH bands; rows per band = num_perm // bands
    seed: int = 0  # MinHash permutation seed (changes candidates, never the exact decision)
    prefilter_margin: float = 0.15  # skip exact checks of candidates estimated this far below threshold


class NearDupIndex:
    """Incremental index: ``add(text)`` returns the index of an earlier near-duplicate or None."""

    def __init__(self, cfg: NearDupConfig | None = None):
        self.cfg = cfg = cfg or NearDupConfig()
        if cfg.num_perm % cfg.bands:
            raise ValueError(f"num_perm ({cfg.num_perm}) must be a multiple of bands ({cfg.bands})")
        self._lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.num_perm // cfg.bands))
        self._permutations = MinHash(cfg.num_perm, seed=cfg.seed, scheme="affine32").permutations  # drawn once
        self._shingles: list[set[str]] = []
        self._minhashes: list[MinHash] = []

    def signature(self, sh: set[str]) -> MinHash:
        m = MinHash(self.cfg.num_perm, seed=self.cfg.seed, permutations=self._permutations, scheme="affine32")
        m.update_batch([s.encode() for s in sh])
        return m

    def query(self, text: str) -> tuple[int | None, set[str], MinHash]:
        sh = shingles(text, self.cfg.shingle_k)
        m = self.signature(sh)
        for c in sorted(self._lsh.query(m)):  # keys are positions among the kept texts: earliest first
            if m.jaccard(self._minhashes[c]) < self.cfg.threshold - self.cfg.prefilter_margin:
                continue  # the estimate is too far below the threshold to be worth the exact check
            if jaccard(sh, self._shingles[c]) >= self.cfg.threshold:
                return c, sh, m
        return None, sh, m

    def add(self, text: str) -> int | None:
        """Insert ``text`` unless it is a near-duplicate; return the earlier index it duplicates."""
        dup, sh, m = self.query(text)
        if dup is not None:
            return dup
        self._lsh.insert(len(self._shingles), m, check_duplication=False)
        self._shingles.append(sh)
        self._minhashes.append(m)
        return None

    def __len__(self) -> int:
        return len(self._shingles)


def dedup(texts: list[str], cfg: NearDupConfig | None = None) -> tuple[list[int], dict[int, int]]:
    """(indices kept, {dropped index: index of the kept text it duplicates}), in input order."""
    index = NearDupIndex(cfg)
    kept: list[int] = []
    dropped: dict[int, int] = {}
    for i, t in enumerate(texts):
        dup = index.add(t)
        if dup is None:
            kept.append(i)
        else:
            dropped[i] = kept[dup]
    return kept, dropped
