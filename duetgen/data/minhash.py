"""MinHash signatures and an LSH index: the near-duplicate code shared by the synthetic query pool
(``duetgen/data/synthetic/dedup.py``) and the data engine's cross-page dedup (``engine/neardup.py``).

Design choices:
- Our own code, moved here from the query pool. Measured against ``datasketch`` on the same 2,000
  pages of 400 words (``benchmarks/data_engine.py --only minhash``, shared 2-core box): signatures
  ours 1.43-1.53 s, datasketch 1.03-1.09 s, so datasketch is ~1.4x faster there and, by issue
  18's rule, both users should move to it (not done yet: see docs/data-engine.md). A division-free
  Mersenne reduction was tried and was slower (2.46 s). The LSH index is the same idea as
  ``datasketch.MinHashLSH`` (bands of rows, a dict per band), with signatures kept in one numpy
  array for vectorised estimates.
- Hashes are stable across processes and machines (blake2b, never Python's salted ``hash``), so a
  signature computed in a worker means the same thing in the driver.
- MinHash with ``num_perm`` universal hashes ``(a*x + b) mod (2^61 - 1)`` over 32-bit shingle
  hashes (a, b < 2^32, so the product never overflows uint64), vectorised in numpy.
- LSH banding (``bands`` x ``rows`` = ``num_perm``) only proposes candidates; the caller decides
  (the exact Jaccard for short queries, the MinHash estimate for pages).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64((1 << 32) - 1)
_WORD_RE = re.compile(r"\w+", re.UNICODE)


def hash32(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")


def string_hashes(strings) -> np.ndarray:
    """(S,) uint64 32-bit hashes of the strings."""
    strings = list(strings)
    return np.fromiter((hash32(s) for s in strings), dtype=np.uint64, count=len(strings))


def word_shingle_hashes(text: str, k: int = 5, cache: dict[str, int] | None = None) -> np.ndarray:
    """(S,) uint64 32-bit hashes of the distinct word ``k``-grams of ``text`` (lowercased ``\\w+`` words).

    Each distinct word is hashed once (``cache`` carries the hashes across pages); a k-gram's hash
    combines its words' hashes with rotations (order matters), all in numpy.
    """
    words = _WORD_RE.findall(text.lower())
    if not words:
        return np.zeros(1, dtype=np.uint64)
    cache = {} if cache is None else cache
    w = np.fromiter((cache[x] if x in cache else cache.setdefault(x, hash32(x)) for x in words),
                    dtype=np.uint64, count=len(words))  # (W,)
    n = max(1, len(w) - k + 1)
    h = np.zeros(n, dtype=np.uint64)
    for j in range(min(k, len(w))):  # h ^= rotl32(w[i + j], 7j)
        r = np.uint64((7 * j) % 32)
        part = w[j:j + n]
        h ^= ((part << r) | (part >> (np.uint64(32) - r))) & _MASK32 if r else part
    return np.unique(h)


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self._a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """(P,) uint64 MinHash signature of (S,) 32-bit shingle hashes."""
        hv = (hashes[:, None] * self._a[None, :] + self._b[None, :]) % _MERSENNE  # (S, P)
        return (hv & _MASK32).min(axis=0)  # (P,)


class LSHIndex:
    """Signatures of the items added so far, bucketed by band; ``candidates(sig)`` = items sharing a band."""

    def __init__(self, num_perm: int = 128, bands: int = 32):
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self.num_perm, self.bands, self.rows = num_perm, bands, num_perm // bands
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.sigs = np.empty((1024, num_perm), dtype=np.uint64)  # (capacity, P), grown by doubling
        self.n = 0

    def _keys(self, sig: np.ndarray):
        for band in range(self.bands):
            yield band, sig[band * self.rows:(band + 1) * self.rows].tobytes()

    def candidates(self, sig: np.ndarray) -> np.ndarray:
        """(C,) sorted indices of the items that share at least one band with ``sig``."""
        found: set[int] = set()
        for band, key in self._keys(sig):
            found.update(self._buckets[band].get(key, ()))
        return np.fromiter(sorted(found), dtype=np.int64, count=len(found))

    def estimates(self, cand: np.ndarray, sig: np.ndarray) -> np.ndarray:
        """(C,) MinHash Jaccard estimates of ``sig`` against the candidates."""
        return (self.sigs[:self.n][cand] == sig[None, :]).mean(axis=1)

    def add(self, sig: np.ndarray) -> int:
        idx = self.n
        if idx == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.empty_like(self.sigs)])
        self.sigs[idx] = sig
        for band, key in self._keys(sig):
            self._buckets[band].setdefault(key, []).append(idx)
        self.n += 1
        return idx

    def __len__(self) -> int:
        return self.n
