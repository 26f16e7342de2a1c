"""Near-duplicate removal for short texts: character shingles, MinHash, LSH, exact Jaccard check.

Used on the expanded query pool (paper section 3.1: 1,500 seeds -> 15,270 diverse instructions),
where an LLM asked for "more questions" often returns rewordings of ones it already gave.

Design choices:
- Texts are normalised (lowercase, punctuation dropped, whitespace collapsed) and cut into
  character 5-gram shingles: robust to word order tweaks and small rewordings, no tokenizer.
- MinHash with ``num_perm`` universal hashes ``(a*x + b) mod (2^61 - 1)`` over 32-bit shingle
  hashes (a, b < 2^32, so the product never overflows uint64), vectorised in numpy.
- LSH banding (bands x rows = num_perm) only proposes candidate pairs; the default 32 x 4 puts
  the LSH threshold near Jaccard 0.42, well below the 0.6 decision threshold, so recall is
  high. Candidates whose MinHash estimate is more than ``prefilter_margin`` under the threshold
  (3.5 standard deviations at 128 permutations) are dropped in one vectorised step; the rest
  are checked with the *exact* shingle Jaccard: no false positives.
- Greedy and order-preserving: a text is dropped if it is near a text *kept* earlier, so seeds
  (listed first) always survive and the result is deterministic.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64((1 << 32) - 1)
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
        self.cfg = cfg or NearDupConfig()
        if self.cfg.num_perm % self.cfg.bands:
            raise ValueError(f"num_perm ({self.cfg.num_perm}) must be a multiple of bands ({self.cfg.bands})")
        rng = np.random.default_rng(self.cfg.seed)
        self._a = rng.integers(1, 1 << 32, size=self.cfg.num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 32, size=self.cfg.num_perm, dtype=np.uint64)
        self._rows = self.cfg.num_perm // self.cfg.bands
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.cfg.bands)]
        self._shingles: list[set[str]] = []
        self._sigs = np.empty((1024, self.cfg.num_perm), dtype=np.uint64)  # (capacity, P), grown by doubling

    def signature(self, sh: set[str]) -> np.ndarray:
        x = np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") for s in sh),
                        dtype=np.uint64, count=len(sh))  # (S,)
        hv = (x[:, None] * self._a[None, :] + self._b[None, :]) % _MERSENNE  # (S, P)
        return (hv & _MASK32).min(axis=0)  # (P,)

    def query(self, text: str) -> tuple[int | None, set[str], np.ndarray]:
        sh = shingles(text, self.cfg.shingle_k)
        sig = self.signature(sh)
        candidates: set[int] = set()
        for band in range(self.cfg.bands):
            key = sig[band * self._rows : (band + 1) * self._rows].tobytes()
            candidates.update(self._buckets[band].get(key, ()))
        if not candidates:
            return None, sh, sig
        cand = np.fromiter(sorted(candidates), dtype=np.int64, count=len(candidates))  # (C,)
        estimate = (self._sigs[cand] == sig[None, :]).mean(axis=1)  # (C,) MinHash Jaccard estimates
        for c in cand[estimate >= self.cfg.threshold - self.cfg.prefilter_margin].tolist():
            if jaccard(sh, self._shingles[c]) >= self.cfg.threshold:
                return c, sh, sig
        return None, sh, sig

    def add(self, text: str) -> int | None:
        """Insert ``text`` unless it is a near-duplicate; return the earlier index it duplicates."""
        dup, sh, sig = self.query(text)
        if dup is not None:
            return dup
        idx = len(self._shingles)
        self._shingles.append(sh)
        if idx == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[idx] = sig
        for band in range(self.cfg.bands):
            key = sig[band * self._rows : (band + 1) * self._rows].tobytes()
            self._buckets[band].setdefault(key, []).append(idx)
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
